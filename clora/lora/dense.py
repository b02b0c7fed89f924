"""Dense weight updates ``ΔW`` for every LoRA module kind, written from the maths.

All functions compute in float32 (float64 when the weight is float64) on the weight's device and return a tensor of
the weight's shape, dtype and device.  ``module.scale`` (``alpha / rank``) is included; the user's per-binding weight
is not (callers multiply it in).

Conventions (``W`` has shape ``(out, in)`` for Linear, ``(out, in, kh, kw)`` for Conv2d):

* **lora / LoCon** (kohya ``lora_down``/``lora_up``, peft ``lora_A``/``lora_B``): ``down`` is ``(r, in)`` or
  ``(r, in, kh, kw)``, ``up`` is ``(out, r)`` or ``(out, r, 1, 1)``; ``ΔW = up @ down`` with ``down`` flattened to
  ``(r, in·kh·kw)`` — a ``kh×kw`` conv to ``r`` channels followed by a ``1×1`` conv is one ``kh×kw`` conv.
* **CP / Tucker** (kohya ``lora_mid``): ``down`` ``(r, in, 1, 1)``, ``mid`` ``(r, r, kh, kw)``, ``up`` ``(out, r, 1, 1)``:
  ``ΔW[o,i,h,w] = Σ_ab up[o,a]·mid[a,b,h,w]·down[b,i]`` (the three convs composed).
* **LoHa** (LyCORIS ``hada_*``): ``ΔW = (w1a @ w1b) ⊙ (w2a @ w2b)`` with ``w·a`` ``(out, r)`` and ``w·b`` ``(r, in·kh·kw)``.
  With Tucker cores ``hada_t1``/``hada_t2`` ``(r, r, kh, kw)`` the factors are transposed (``w·a`` ``(r, out)``,
  ``w·b`` ``(r, in)``) and each product is ``Σ_ab t[a,b,h,w]·wb[b,i]·wa[a,o]``.  ``rank`` is ``hada_w1_b.shape[0]``.
* **LoKr** (LyCORIS ``lokr_*``): ``w1 = lokr_w1`` or ``lokr_w1_a @ lokr_w1_b`` (``(a, c)``), ``w2 = lokr_w2`` or
  ``lokr_w2_a @ lokr_w2_b`` (``(b, d·kh·kw)``) or, with a Tucker core ``lokr_t2``, ``Σ t2·w2_b·w2_a`` as for LoHa;
  ``ΔW = kron(w1, w2)`` reshaped to ``W`` (``out = a·b``, ``in = c·d``).  Kronecker of a 2-D ``w1`` with ``w2``
  flattened over ``(d, kh, kw)`` and reshaped equals the 4-D Kronecker product used by LyCORIS.  ``alpha / rank``
  applies only when a factor is decomposed (see ``LoraModule.scale``).
* **DoRA** (``dora_scale`` magnitude ``m``): ``ΔW_eff = m · (W + sΔW) / ‖W + sΔW‖ − W``.  The norm axis follows the
  stored magnitude's shape:

  - ``(out,)``, ``(out, 1)`` or ``(out, 1, 1, 1)``: one norm per **output row** (over ``in·kh·kw``).  This is
    LyCORIS with ``wd_on_out=True`` (the kohya/LyCORIS default since LyCORIS 2.2) and peft's Linear DoRA.
  - ``(1, in)`` or ``(1, in, 1, 1)``: one norm per **input column** (over ``out·kh·kw``): early LyCORIS DoRA files,
    which A1111's ``network.apply_weight_decompose`` computes (it transposes ``W`` before the norm).

  peft is the exception the shape cannot tell: its ``lora_magnitude_vector`` is always one value per **output**
  channel, stored ``(out,)`` for a Linear but ``(1, out, 1, 1)`` for a Conv2d (``weight.norm(dim=(1, 2, 3))``
  transposed) — the shape of the per-input-column layout.  The reader marks such modules ``dora_axis="out"``
  (`LoraModule.dora_axis`), and a declared axis wins over the shape.

  Any other shape raises `LoraError`.  No epsilon is added to the norm.

  The user's weight ``w`` multiplies the finished ``ΔW_eff`` (``w·ΔW_eff``), as A1111 (``finalize_updown``) and Forge
  (``weight_decompose``: ``W + strength·(W_dora − W)``) do for ``<lora:name:w>``.  LyCORIS's multiplier and peft's
  ``scale_lora_layers`` instead scale ``sΔW`` inside the normalisation; at ``w = 1`` all agree.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .types import LoraError, LoraModule

__all__ = ["dense_delta", "raw_delta", "apply_dora", "dora_axis", "delta_rows", "shape_problem"]

Shape = tuple[int, ...]


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _up_matrix(up: torch.Tensor, key: str) -> torch.Tensor:
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise LoraError(f"LoRA module {key}: up factor has a {tuple(up.shape[2:])} kernel; only 1x1 is supported")
    if up.dim() not in (2, 4):
        raise LoraError(f"LoRA module {key}: up factor has shape {tuple(up.shape)}")
    return up.reshape(up.shape[0], up.shape[1])


def _tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """``Σ_ab core[a,b,h,w]·wb[b,i]·wa[a,o]`` -> ``(o, i, h, w)`` (LyCORIS Tucker product, ``wa`` ``(r, out)``, ``wb`` ``(r, in)``)."""
    return torch.einsum("abhw,bi,ao->oihw", core, wb.reshape(wb.shape[0], -1), wa.reshape(wa.shape[0], -1))


def _lokr_factors(module: LoraModule, dev: torch.device, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    t = {k: v.to(device=dev, dtype=dt) for k, v in module.tensors.items()}
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
    else:
        w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"].reshape(t["lokr_w2_b"].shape[0], -1)
    return w1.reshape(w1.shape[0], -1), w2


def raw_delta(module: LoraModule, dev: torch.device, dt: torch.dtype) -> torch.Tensor:
    """The unscaled update in the module's natural shape (``(out, in)``, ``(out, in·k·k)`` or ``(out, in, kh, kw)``)."""
    t = {k: v.to(device=dev, dtype=dt) for k, v in module.tensors.items()}
    key = module.key
    if module.kind == "lora":
        down, up, mid = t["down"], t["up"], t.get("mid")
        up2 = _up_matrix(up, key)
        if mid is None:
            if up2.shape[1] != down.shape[0]:
                raise LoraError(f"LoRA module {key}: up {tuple(up.shape)} and down {tuple(down.shape)} ranks differ")
            return up2 @ down.reshape(down.shape[0], -1)
        if mid.dim() != 4 or down.dim() != 4 or tuple(down.shape[2:]) != (1, 1):
            raise LoraError(f"LoRA module {key}: lora_mid {tuple(mid.shape)} needs a 1x1 down, got {tuple(down.shape)}")
        return torch.einsum("oa,abhw,bi->oihw", up2, mid, down.reshape(down.shape[0], -1))
    if module.kind == "loha":
        if "hada_t1" in t and "hada_t2" in t:
            w1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            w2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            w1 = t["hada_w1_a"] @ t["hada_w1_b"].reshape(t["hada_w1_b"].shape[0], -1)
            w2 = t["hada_w2_a"] @ t["hada_w2_b"].reshape(t["hada_w2_b"].shape[0], -1)
        if w1.shape != w2.shape:
            raise LoraError(f"LoRA module {key}: LoHa products have shapes {tuple(w1.shape)} and {tuple(w2.shape)}")
        return w1 * w2
    if module.kind == "lokr":
        w1, w2 = _lokr_factors(module, dev, dt)
        return torch.kron(w1.contiguous(), w2.reshape(w2.shape[0], -1).contiguous())
    raise LoraError(f"LoRA module {key}: unknown module kind {module.kind!r}")


def delta_rows(module: LoraModule) -> tuple[int, int]:
    """``(out, in·kh·kw)`` of the module's ``ΔW``, from tensor shapes only (no arithmetic on the values)."""
    t = module.tensors
    if module.kind == "lora":
        down, up, mid = t["down"], t["up"], t.get("mid")
        rest = down[0].numel() if mid is None else down.shape[1] * math.prod(mid.shape[2:])
        return int(up.shape[0]), int(rest)
    if module.kind == "loha":
        if "hada_t1" in t:
            return int(t["hada_w1_a"].shape[1]), int(t["hada_w1_b"].shape[1] * math.prod(t["hada_t1"].shape[2:]))
        return int(t["hada_w1_a"].shape[0]), int(t["hada_w1_b"][0].numel())
    if module.kind == "lokr":
        w1 = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:
            b, rest2 = t["lokr_w2"].shape[0], t["lokr_w2"][0].numel()
        elif "lokr_t2" in t:
            b = t["lokr_w2_a"].shape[1]
            rest2 = t["lokr_w2_b"].shape[1] * math.prod(t["lokr_t2"].shape[2:])
        else:
            b, rest2 = t["lokr_w2_a"].shape[0], t["lokr_w2_b"][0].numel()
        return int(w1[0] * b), int(w1[1] * rest2)
    raise LoraError(f"LoRA module {module.key}: unknown module kind {module.kind!r}")


def dora_axis(magnitude_shape: Shape, weight_shape: Shape, declared: Optional[str] = None) -> str:
    """``"out"`` (norm per output row) or ``"in"`` (norm per input column) for a DoRA magnitude shape; see module doc.

    ``declared`` is the axis the file's format fixes (`LoraModule.dora_axis`, ``"out"`` for peft); the shape must
    then hold one value per channel of that axis, with every other dimension 1.
    """
    m, w = tuple(magnitude_shape), tuple(weight_shape)
    out, inp = w[0], w[1] if len(w) > 1 else 1
    if declared is not None:
        n = out if declared == "out" else inp
        if declared in ("out", "in") and math.prod(m) == n and sum(s != 1 for s in m) <= 1 and len(m) <= len(w):
            return declared
        raise LoraError(f"DoRA magnitude of shape {m} cannot be interpreted for a weight of shape {w}: "
                        f"its format stores one value per {'output' if declared == 'out' else 'input'} channel "
                        f"({n})")
    if m == (out,) or (len(m) == len(w) and m[0] == out and all(s == 1 for s in m[1:])):
        return "out"
    if len(m) == len(w) and len(w) >= 2 and m[0] == 1 and m[1] == inp and all(s == 1 for s in m[2:]):
        return "in"
    raise LoraError(f"DoRA magnitude of shape {m} cannot be interpreted for a weight of shape {w}: "
                    f"expected ({out},), ({out}, 1...) or (1, {inp}, 1...)")


def shape_problem(module: LoraModule, weight_shape: Shape) -> Optional[str]:
    """``None`` when the module's update fits a weight of ``weight_shape``, else a short reason."""
    w = tuple(int(s) for s in weight_shape)
    try:
        out, rest = delta_rows(module)
    except (KeyError, IndexError) as exc:
        return f"incomplete tensors ({exc})"
    want = (w[0], math.prod(w[1:]))
    if (out, rest) != want:
        return f"update is {out}x{rest}, the module's weight {w} needs {want[0]}x{want[1]}"
    if module.kind == "lora" and module.tensors["down"].shape[1] != (w[1] if len(w) > 1 else 1):
        return f"down factor {tuple(module.tensors['down'].shape)} does not take {w[1]} input channels"
    if module.dora_scale is not None:
        try:
            dora_axis(tuple(module.dora_scale.shape), w, module.dora_axis)
        except LoraError as exc:
            return str(exc)
    return None


def apply_dora(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
               declared: Optional[str] = None) -> torch.Tensor:
    """``m · (W + ΔW) / ‖W + ΔW‖ − W`` with the norm axis chosen by `dora_axis` (``delta`` already scaled)."""
    axis = dora_axis(tuple(magnitude.shape), tuple(weight.shape), declared)
    w = weight.detach().to(device=delta.device, dtype=delta.dtype)
    merged = w + delta
    ones = [1] * (w.dim() - 1)
    if axis == "out":
        norm = merged.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *ones)
        mag = magnitude.to(device=delta.device, dtype=delta.dtype).reshape(w.shape[0], *ones)
    else:
        norm = merged.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, w.shape[1], *ones[1:])
        mag = magnitude.to(device=delta.device, dtype=delta.dtype).reshape(1, w.shape[1], *ones[1:])
    return merged * (mag / norm) - w


def dense_delta(module: LoraModule, weight: torch.Tensor) -> torch.Tensor:
    """Full ``ΔW`` for ``module`` applied to ``weight``: shape, dtype and device of ``weight``; scale included.

    Raises `LoraError` when the module's shapes do not fit ``weight``.
    """
    problem = shape_problem(module, tuple(weight.shape))
    if problem is not None:
        raise LoraError(f"LoRA module {module.key} does not fit its target: {problem}")
    dt = _compute_dtype(weight)
    delta = raw_delta(module, weight.device, dt).reshape(weight.shape) * module.scale
    if module.dora_scale is not None:
        delta = apply_dora(weight, delta, module.dora_scale, module.dora_axis)
    return delta.to(weight.dtype)
