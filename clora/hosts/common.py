"""Host-independent pieces of the WebUI glue: bound-LoRA tags, condition padding, row dictionaries, errors."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch

from ..errors import user_message

__all__ = [
    "CloraError",
    "strip_lora_tags",
    "pad_tokens",
    "rows_cond",
    "step_from_calls",
    "RunReport",
    "is_finite_conditioning",
]


class CloraError(RuntimeError):
    """A problem the user must fix; raised from inside the host's sampling so the UI and the API show the message.

    Its message is always in the user-facing form of `clora.errors.user_message` (``"CLoRA: "`` once, then a
    capitalised sentence), whatever text or exception it is built from."""

    def __init__(self, message: Any = "") -> None:
        super().__init__(user_message(message))


_LORA_TAG = re.compile(r"<(lora|lyco):([^:>]+)((?::[^>]*)?)>", re.IGNORECASE)


def strip_lora_tags(prompt: str, names: Iterable[str]) -> tuple[str, list[str]]:
    """Remove ``<lora:NAME...>`` tags of the given LoRA names (case-insensitive) so the host does not merge them.

    Returns the new prompt and the tags removed (for the infotext note).  Tags of other LoRAs stay.
    """
    wanted = {n.lower() for n in names}
    removed: list[str] = []

    def repl(m: re.Match) -> str:
        if m.group(2).strip().lower() in wanted:
            removed.append(m.group(0))
            return ""
        return m.group(0)

    return _LORA_TAG.sub(repl, prompt), removed


def pad_tokens(conds: Sequence[torch.Tensor], empty_chunk: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """Pad (N, T_i, D) conditionings to the longest T by appending encoded empty chunks (as the hosts do for
    cond/uncond); without an empty chunk, the last token vector is repeated."""
    t_max = max(c.shape[1] for c in conds)
    out = []
    for c in conds:
        missing = t_max - c.shape[1]
        if missing == 0:
            out.append(c)
            continue
        if empty_chunk is not None and missing % empty_chunk.shape[1] == 0:
            pad = empty_chunk.to(c).expand(c.shape[0], -1, -1).repeat(1, missing // empty_chunk.shape[1], 1)
        else:
            pad = c[:, -1:].expand(-1, missing, -1)
        out.append(torch.cat([c, pad], dim=1))
    return out


def is_finite_conditioning(value: Any) -> bool:
    """Whether every tensor in a host conditioning (a tensor, a dict of tensors such as SDXL's ``crossattn`` and
    ``vector``, a prompt schedule: lists of objects with a ``cond``) is free of NaN and inf."""
    if torch.is_tensor(value):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return all(is_finite_conditioning(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(is_finite_conditioning(v) for v in value)
    cond = getattr(value, "cond", None)
    return cond is None or is_finite_conditioning(cond)


def rows_cond(template: Any, crossattn: torch.Tensor, index: torch.Tensor, key: str = "c_crossattn") -> Any:
    """A host condition for new rows: ``crossattn`` for the text, every other tensor of ``template`` (image
    conditioning, ...) gathered with ``index`` (one source row per new row)."""
    if isinstance(template, dict):
        out = {}
        for k, v in template.items():
            if k == key:
                out[k] = [crossattn] if isinstance(v, list) else crossattn
            elif isinstance(v, list):
                out[k] = [t.index_select(0, index.to(t.device)) if torch.is_tensor(t) else t for t in v]
            elif torch.is_tensor(v):
                out[k] = v.index_select(0, index.to(v.device))
            else:
                out[k] = v
        return out
    return crossattn


def step_from_calls(calls: int, steps: int, total_calls: Optional[int]) -> int:
    """Sampler step of the ``calls``-th model evaluation (0-based), for samplers that evaluate the model
    ``total_calls`` times over ``steps`` steps (second-order samplers: about twice per step)."""
    if not total_calls or total_calls <= steps:
        return min(calls, max(steps - 1, 0))
    return min(int(calls * steps / total_calls), steps - 1)


@dataclass
class RunReport:
    """What one generation did, for the infotext and previews."""

    notes: list[str] = field(default_factory=list)
    losses: list[tuple[int, float, Optional[float]]] = field(default_factory=list)
    previews: list[Any] = field(default_factory=list)
