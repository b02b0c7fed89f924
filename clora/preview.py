"""Preview images: attention maps and fusion masks per binding (PIL only; used by the runner and the WebUI glue)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["PALETTE", "heatmap", "mask_overlay", "attention_grid"]

#: One colour per variant: the base (background) first, then the bindings.
PALETTE = [
    (128, 128, 128), (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
]


def heatmap(a: np.ndarray) -> np.ndarray:
    """Min-max normalised map -> RGB uint8 (a blue→cyan→yellow→red ramp)."""
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    t = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    stops = np.array([[0, 0, 128], [0, 160, 255], [255, 230, 0], [220, 20, 20]], dtype=np.float64)
    pos = t * (len(stops) - 1)
    i = np.clip(pos.astype(int), 0, len(stops) - 2)
    f = (pos - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).round().astype(np.uint8)


def _label(img, text: str):
    from PIL import ImageDraw

    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, img.width, 12], fill=(0, 0, 0))
    d.text((2, 0), text[:40], fill=(255, 255, 255))
    return img


def mask_overlay(image, masks: torch.Tensor, labels: Sequence[str], alpha: float = 0.45):
    """Colour each variant's mask over ``image``.  masks: (V, 1, h, w) or (V, h, w) 0/1; labels one per variant."""
    from PIL import Image

    m = masks.detach().float().cpu()
    if m.dim() == 4:
        m = m[:, 0]
    W, H = image.size
    m = torch.nn.functional.interpolate(m[None], size=(H, W), mode="nearest")[0].numpy()
    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    colour = np.zeros_like(base)
    count = np.zeros(base.shape[:2] + (1,))
    for v in range(1, m.shape[0]):  # the base variant's region is left as it is
        colour += m[v][..., None] * np.array(PALETTE[v % len(PALETTE)], dtype=np.float64)
        count += m[v][..., None]
    covered = count > 0
    colour = np.where(covered, colour / np.maximum(count, 1), base)
    out = np.where(covered, base * (1 - alpha) + colour * alpha, base)
    img = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    legend = ", ".join(f"{labels[v]}" for v in range(1, m.shape[0]))
    return _label(img, f"masks: {legend}")


def attention_grid(
    maps: torch.Tensor,
    groups: Sequence[Sequence[Sequence[int]]],
    concept_labels: Sequence[str],
    variant_labels: Sequence[str],
    cell: int = 128,
    masks: Optional[torch.Tensor] = None,
):
    """Grid of attention maps: one row per concept, one column per variant (+ a mask column when given).

    maps: (V, h, w, T) for one image; groups as in the loss (concept -> variant -> token positions).
    """
    from PIL import Image

    maps = maps.detach().float().cpu()
    V = maps.shape[0]
    cols = V + (1 if masks is not None else 0)
    grid = Image.new("RGB", (cols * cell, len(groups) * cell), (0, 0, 0))
    for k, per_variant in enumerate(groups):
        for v in range(V):
            toks = list(per_variant[v])
            a = maps[v][..., toks].mean(-1).numpy() if toks else np.zeros(maps.shape[1:3])
            tile = Image.fromarray(heatmap(a)).resize((cell, cell), Image.NEAREST)
            grid.paste(_label(tile, f"{concept_labels[k]} | {variant_labels[v]}"), (v * cell, k * cell))
        if masks is not None:
            m = masks.detach().float().cpu()
            m = m[:, 0] if m.dim() == 4 else m
            mk = (m[k + 1].numpy() * 255).astype(np.uint8)
            tile = Image.fromarray(mk).convert("RGB").resize((cell, cell), Image.NEAREST)
            grid.paste(_label(tile, f"mask {concept_labels[k]}"), (V * cell, k * cell))
    return grid
