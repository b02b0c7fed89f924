"""Fusion masks from cross-attention maps, and the masked fusion of per-variant noise predictions.

For prompt variant ``v`` (one per LoRA; index 0 is the base prompt) with mask tokens ``S_v``::

    M_v = ∪_{t ∈ S_v} [A_t >= λ · max A_t]          (per image; max over the h×w map of token t)
    M_v = morphology(M_v)                            (optional, 3×3 square structuring element)
    M_0 = M_0 ∪ ¬(∪_v M_v)                           (the base covers whatever no mask covers)
    masks = nearest_resize(M, latent size)

and the fused prediction is ``Σ_v M_v · ε_v / Σ_v M_v``.

Threshold: ``>=`` (a pixel exactly at ``λ · max`` is in); the authors' code uses ``>``.  The two differ only on
ties, which for real-valued attention means the maximum itself when ``λ = 1``.  A variant without tokens gets an
empty mask before the base rule.

Morphology border convention: the 3×3 window is clipped to the image (max-pooling with implicit ``-inf`` padding),
so pixels outside the image never count.  For dilation this is the same as an outside value of 0; for erosion the
same as an outside value of 1, i.e. erosion does not eat masks from the image border.  Opening is erosion then
dilation, closing dilation then erosion.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["MORPHOLOGY", "threshold_masks", "apply_morphology", "fusion_masks", "fuse"]

MORPHOLOGY = ("none", "open", "close", "dilate", "erode")


def _dilate(m: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(m, kernel_size=3, stride=1, padding=1)


def _erode(m: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.max_pool2d(1.0 - m, kernel_size=3, stride=1, padding=1)


def apply_morphology(masks: torch.Tensor, op: str) -> torch.Tensor:
    """Binary morphology with a 3×3 square on float 0/1 masks of shape (..., h, w) (border: see module doc)."""
    if op not in MORPHOLOGY:
        raise ValueError(f"Unknown mask morphology {op!r}; choose one of {', '.join(MORPHOLOGY)}.")
    if op == "none":
        return masks
    shape = masks.shape
    m = masks.reshape(-1, 1, shape[-2], shape[-1])
    if op == "dilate":
        m = _dilate(m)
    elif op == "erode":
        m = _erode(m)
    elif op == "open":
        m = _dilate(_erode(m))
    else:  # close
        m = _erode(_dilate(m))
    return m.reshape(shape)


def _check_tokens(mask_tokens: Sequence[Sequence[int]], variants: int, tokens: int) -> None:
    if len(mask_tokens) != variants:
        raise ValueError(f"Mask tokens were given for {len(mask_tokens)} prompt variants, but there are {variants} variants.")
    for v, positions in enumerate(mask_tokens):
        for t in positions:
            if not 0 <= int(t) < tokens:
                raise ValueError(f"Mask token position {t} of variant {v} is outside the prompt's {tokens} tokens.")


def threshold_masks(maps: torch.Tensor, mask_tokens: Sequence[Sequence[int]], threshold: float) -> torch.Tensor:
    """Union over each variant's tokens of ``A_t >= threshold · max A_t``; maps (B, V, h, w, T) -> (B, V, h, w)."""
    b, v, h, w, t = maps.shape
    _check_tokens(mask_tokens, v, t)
    out = torch.zeros(b, v, h, w, dtype=torch.bool, device=maps.device)
    for vi, positions in enumerate(mask_tokens):
        if not positions:
            continue
        idx = torch.as_tensor([int(p) for p in positions], dtype=torch.long, device=maps.device)
        sel = maps[:, vi].index_select(-1, idx)  # (B, h, w, k)
        peak = sel.amax(dim=(1, 2), keepdim=True)
        out[:, vi] = (sel >= threshold * peak).any(dim=-1)
    return out


def fusion_masks(
    maps: torch.Tensor,
    mask_tokens: Sequence[Sequence[int]],
    threshold: float = 0.4,
    morphology: str = "none",
    size: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Float 0/1 fusion masks, (V, 1, H, W) for maps (V, h, w, T), or (B, V, 1, H, W) for maps (B, V, h, w, T).

    mask_tokens: one list of token positions per variant (the base, index 0, usually ``[]``).
    threshold: λ in ``A_t >= λ · max A_t``.
    morphology: ``"none" | "open" | "close" | "dilate" | "erode"``.
    size: ``(H, W)`` of the latent for a nearest resize, or ``None`` to keep ``(h, w)``.
    The result is computed without gradient and in the dtype of ``maps`` (float32 for non-float input).
    """
    if morphology not in MORPHOLOGY:
        raise ValueError(f"Unknown mask morphology {morphology!r}; choose one of {', '.join(MORPHOLOGY)}.")
    if maps.dim() not in (4, 5):
        raise ValueError(f"fusion_masks expects maps of shape (V, h, w, T) or (B, V, h, w, T), got {tuple(maps.shape)}.")
    single = maps.dim() == 4
    with torch.no_grad():
        m5 = maps.detach().unsqueeze(0) if single else maps.detach()
        dtype = m5.dtype if m5.is_floating_point() else torch.float32
        masks = threshold_masks(m5, mask_tokens, threshold).to(dtype)  # (B, V, h, w)
        masks = apply_morphology(masks, morphology)
        uncovered = masks.amax(dim=1) == 0
        masks[:, 0] = torch.where(uncovered, torch.ones_like(masks[:, 0]), masks[:, 0])
        if size is not None:
            bsz, v, h, w = masks.shape
            masks = F.interpolate(masks.reshape(bsz * v, 1, h, w), size=tuple(size), mode="nearest").reshape(
                bsz, v, *size
            )
        masks = masks.unsqueeze(2)  # (B, V, 1, H, W)
    return masks[0] if single else masks


def fuse(preds: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Masked average over variants: ``Σ_v m_v · p_v / Σ_v m_v``.

    preds: (V, B, C, H, W) or (V, C, H, W), variants first.  masks: broadcastable to ``preds`` with variants first,
    e.g. (V, 1, H, W) or (V, B, 1, H, W) (the batched output of :func:`fusion_masks` is (B, V, 1, H, W): pass
    ``masks.transpose(0, 1)``).  A pixel no mask covers (impossible after the base rule) falls back to ``preds[0]``.
    """
    if masks.shape[0] != preds.shape[0]:
        raise ValueError(f"fuse got {preds.shape[0]} predictions but {masks.shape[0]} masks; give one mask per variant.")
    m = masks.to(dtype=preds.dtype, device=preds.device)
    num = (m * preds).sum(dim=0)
    den = m.sum(dim=0).expand_as(num)
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, preds[0])
