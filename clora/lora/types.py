"""The in-memory form of one LoRA file: typed modules that know how to compute their update.

Nothing here knows about hosts or module trees; `keymap` resolves `LoraModule.key` against a model and
`rows` applies modules to batch rows.  Every module exposes the same two operations:

* ``dense_delta(weight)`` -> the full ``ΔW`` (shape of ``weight``), scale included, for merging references,
  for types that have no cheap factored form (LoHa, LoKr), and for DoRA (which depends on ``weight``).
* ``factors()`` -> ``(down, mid, up)`` for plain low-rank modules (``mid`` may be ``None``), or ``None`` when the
  module must be applied through its dense delta.

``scale`` is ``alpha / rank`` (``1.0`` when the file has no alpha), exactly as kohya and A1111 use it.  The user's
per-binding weight is *not* part of the module; `rows` multiplies it in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["LoraError", "LoraModule", "LoraFile"]


class LoraError(ValueError):
    """A LoRA file cannot be used; the message is meant for the user as it is."""


@dataclass
class LoraModule:
    """One target module's update.

    key: canonical kohya-style stem of the target, e.g. ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``
         or ``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` (peft/diffusers names are converted to this form).
    kind: ``"lora"`` (incl. LoCon and CP ``lora_mid``), ``"loha"``, ``"lokr"``.
    tensors: the file's tensors for this module under short names (``down``, ``up``, ``mid`` for lora;
             ``hada_w1_a`` ... for LoHa; ``lokr_w1`` ... for LoKr).
    alpha: the file's alpha or ``None``.
    dora_scale: DoRA magnitude vector, or ``None``.
    dora_axis: ``"out"`` when the file's format fixes the magnitude to one value per output channel (peft's
               ``lora_magnitude_vector``, stored ``(out,)`` for a Linear and ``(1, out, 1, 1)`` for a Conv2d), ``None``
               when the axis is read from the magnitude's shape (kohya/LyCORIS ``dora_scale``; see `dense.dora_axis`).
    """

    key: str
    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: Optional[float] = None
    dora_scale: Optional[torch.Tensor] = None
    dora_axis: Optional[str] = None

    # ----- shared helpers -------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        t = self.tensors
        if self.kind == "lora":
            return int(t["down"].shape[0])
        if self.kind == "loha":
            return int(t["hada_w1_b"].shape[0])
        if self.kind == "lokr":
            for name in ("lokr_w1_b", "lokr_w2_b"):
                if name in t:
                    return int(t[name].shape[0])
            return 0
        raise LoraError(f"unknown LoRA module kind {self.kind!r}")

    @property
    def scale(self) -> float:
        if self.alpha is None:
            return 1.0
        r = self.rank
        if self.kind == "lokr" and r == 0:  # full kronecker factors: alpha does not apply
            return 1.0
        return float(self.alpha) / r if r else 1.0

    def factors(self) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]]:
        """``(down, mid, up)`` for factored application, ``None`` when only the dense delta is available."""
        if self.kind != "lora" or self.dora_scale is not None:
            return None
        t = self.tensors
        return t["down"], t.get("mid"), t["up"]

    def dense_delta(self, weight: torch.Tensor) -> torch.Tensor:
        """Full ``ΔW`` in the shape, dtype and device of ``weight`` (scale included, user weight not)."""
        from .dense import dense_delta  # local import keeps this module tiny

        return dense_delta(self, weight)


@dataclass
class LoraFile:
    """A parsed LoRA file.

    name: file stem (what the hosts call the LoRA).
    family: ``"sd1"``, ``"sd2"``, ``"sdxl"`` or ``"unknown"``.
    layout: ``"kohya"``, ``"peft"``, ``"diffusers"`` ... (how the keys were written).
    modules: canonical key -> module.
    metadata: the safetensors header metadata (strings).
    trigger_words: suggestions from the metadata, most frequent first.
    skipped_keys: tensor keys that belong to no usable module (unknown module types such as IA3/OFT, incomplete
                  modules); counted, never silently dropped.
    user_metadata: the A1111 user-metadata sidecar ``<stem>.json`` (``activation text``, ``sd version`` ...), if any.
    """

    name: str
    path: str
    family: str
    layout: str
    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    trigger_words: list[str] = field(default_factory=list)
    skipped_keys: list[str] = field(default_factory=list)
    user_metadata: dict[str, object] = field(default_factory=dict)

    @property
    def has_text_encoder(self) -> bool:
        return any(k.startswith("lora_te") for k in self.modules)

    @property
    def has_unet(self) -> bool:
        return any(k.startswith("lora_unet") for k in self.modules)


def is_linear(module) -> bool:
    """A linear layer: ``nn.Linear``, or any module shaped like one (``in_features``, ``out_features`` and a
    ``(out_features, in_features)`` weight) — hosts build their UNets from their own Linear classes (Forge's
    operations are plain ``nn.Module``s that call ``F.linear``).  Feature detection, not class names."""
    import torch.nn as nn

    if isinstance(module, nn.Linear):
        return True
    w = getattr(module, "weight", None)
    fin, fout = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return (
        isinstance(fin, int) and isinstance(fout, int) and isinstance(w, torch.Tensor) and tuple(w.shape) == (fout, fin)
    )


def is_conv2d(module) -> bool:
    import torch.nn as nn

    return isinstance(module, nn.Conv2d)


def is_target(module) -> bool:
    """A module a LoRA can target (Linear-like or Conv2d)."""
    return is_linear(module) or is_conv2d(module)
