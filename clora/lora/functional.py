"""LoRA applied to parameters a forward hook cannot reach, without writing them: ``W + ΔW`` passed to
``torch.func.functional_call``.

Per-row forward hooks (`rows.LoraRows`) need a module whose forward is called with the rows it transforms.  Some
layers are not like that: ``torch.nn.MultiheadAttention`` (open_clip's text tower, SDXL's second text encoder in
A1111) reads its fused ``in_proj_weight`` (q, k and v stacked) and its ``out_proj.weight`` directly in
``F.multi_head_attention_forward``; ``out_proj``'s forward is never called.  For such models each set of LoRAs (one
prompt variant) is applied by building ``{parameter name: W + Σ weight·scale·ΔW}`` for the parameters it touches and
running the model with them through ``torch.func.functional_call``.  A q/k/v delta lands in its slice of the fused
weight (`ParamTarget.span`).  The model's own parameters are never written; ``functional_call`` puts them back when
the call ends, also when it raises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from .types import LoraError, LoraModule

__all__ = ["ParamTarget", "lora_parameters", "call_with_loras", "run_with_loras"]


@dataclass(frozen=True)
class ParamTarget:
    """One LoRA module bound to (a row slice of) one parameter.

    param: the parameter's name relative to the model (``transformer.resblocks.0.attn.in_proj_weight``).
    span: ``(start, length)`` of the output rows the module updates (q, k or v of a fused in-projection), or ``None``
          for the whole parameter.
    lora_index: which LoRA of the caller's list the module belongs to.
    module: the LoRA module.
    """

    param: str
    span: Optional[tuple[int, int]]
    lora_index: int
    module: LoraModule

    def target_shape(self, weight: torch.Tensor) -> tuple[int, ...]:
        if self.span is None:
            return tuple(weight.shape)
        return (self.span[1], *weight.shape[1:])


def lora_parameters(model: nn.Module, targets: Sequence[ParamTarget],
                    loras: Iterable[tuple[int, float]]) -> dict[str, torch.Tensor]:
    """New tensors ``W + Σ weight·ΔW`` for every parameter the LoRAs ``loras`` (``(lora_index, weight)``) touch.

    ``ΔW`` is each module's dense delta (scale included) in the parameter's dtype; the parameters themselves are only
    read.  Parameters no chosen LoRA touches are not in the result (``functional_call`` keeps the model's own)."""
    weights: dict[int, float] = {}
    for index, w in loras:
        weights[int(index)] = weights.get(int(index), 0.0) + float(w)
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for t in targets:
        w = weights.get(t.lora_index)
        if not w:
            continue
        if t.param not in params:
            raise LoraError(f"The model has no parameter {t.param!r} (LoRA module {t.module.key}).")
        base = params[t.param].detach()
        new = out.get(t.param)
        if new is None:
            new = base.clone()
        part = base if t.span is None else base.narrow(0, *t.span)
        delta = t.module.dense_delta(part) * w
        if t.span is None:
            new = new + delta
        else:
            start, length = t.span
            new = torch.cat([new[:start], new[start:start + length] + delta, new[start + length:]])
        out[t.param] = new
    return out


def call_with_loras(model: nn.Module, targets: Sequence[ParamTarget], loras: Iterable[tuple[int, float]],
                    *args: Any, **kwargs: Any) -> Any:
    """``model(*args, **kwargs)`` with the LoRAs ``loras`` applied (see `lora_parameters`); a plain call when none
    touches the model.  The model's parameters are the same objects with the same values afterwards."""
    params = lora_parameters(model, targets, loras)
    if not params:
        return model(*args, **kwargs)
    return torch.func.functional_call(model, params, args, kwargs, strict=False)


class _Run(nn.Module):
    """Holds ``model`` as a child so that ``functional_call`` can give it other parameters while ``fn`` runs."""

    def __init__(self, model: nn.Module, fn) -> None:
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self) -> Any:
        return self._fn()


def run_with_loras(model: nn.Module, targets: Sequence[ParamTarget], loras: Iterable[tuple[int, float]], fn) -> Any:
    """``fn()`` (code that calls ``model`` somewhere inside, e.g. a host's own text encoding) while ``model``'s
    parameters read ``W + ΔW`` for the LoRAs ``loras``: ``torch.func.functional_call`` swaps the parameter attributes
    for the call and puts the originals back when it ends, also when it raises; nothing is written.  A plain
    ``fn()`` when no chosen LoRA touches the model."""
    params = lora_parameters(model, targets, loras)
    if not params:
        return fn()
    return torch.func.functional_call(_Run(model, fn), {f"model.{k}": v for k, v in params.items()}, (), strict=False)
