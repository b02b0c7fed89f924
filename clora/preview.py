"""Preview images: attention maps and fusion masks per binding (PIL only; used by the runner and the WebUI glue)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["PALETTE", "colour_of", "heatmap", "legend", "mask_overlay", "attention_grid"]

#: One colour per variant: the base (background) first, then the bindings.
PALETTE = [
    (128, 128, 128), (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
]


def colour_of(variant: int) -> tuple[int, int, int]:
    """The colour of variant ``variant`` (0: the base prompt, 1..: the bindings in order)."""
    return PALETTE[variant % len(PALETTE)]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable built-in font
    except TypeError:
        return ImageFont.load_default()


def legend(entries: Sequence[tuple[tuple[int, int, int], str]], width: int):
    """A key strip ``width`` pixels wide: one coloured swatch and its text per entry, wrapped onto as many lines as
    needed (the colour key of the mask overlay and of the attention grid)."""
    from PIL import Image, ImageDraw

    size = max(10, min(20, width // 32))
    font = _font(size)
    pad, box, line = 4, size, size + 6
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placed, x, y = [], pad, pad
    for colour, text in entries:
        text_w = int(probe.textlength(text, font=font)) if hasattr(probe, "textlength") else 6 * len(text)
        item_w = box + 4 + text_w + 2 * pad
        if x > pad and x + item_w > width:
            x, y = pad, y + line
        placed.append((x, y, colour, text))
        x += item_w
    img = Image.new("RGB", (width, y + line + pad), (24, 24, 24))
    d = ImageDraw.Draw(img)
    for x, y, colour, text in placed:
        d.rectangle([x, y + 1, x + box, y + 1 + box], fill=tuple(colour), outline=(255, 255, 255))
        d.text((x + box + 4, y), text, fill=(255, 255, 255), font=font)
    return img


def _with_legend(img, entries):
    from PIL import Image

    key = legend(entries, img.width)
    out = Image.new("RGB", (img.width, img.height + key.height), (24, 24, 24))
    out.paste(img, (0, 0))
    out.paste(key, (0, img.height))
    return out


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


def mask_overlay(image, masks: torch.Tensor, labels: Sequence[str], alpha: float = 0.45,
                 concepts: Optional[Sequence[str]] = None):
    """Colour each variant's mask over ``image``, with a colour key below it (one swatch per LoRA: ``label``, or
    ``label: concept`` when ``concepts`` — one per binding — are given).  masks: (V, 1, h, w) or (V, h, w) 0/1;
    labels one per variant (the base first)."""
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
        colour += m[v][..., None] * np.array(colour_of(v), dtype=np.float64)
        count += m[v][..., None]
    covered = count > 0
    colour = np.where(covered, colour / np.maximum(count, 1), base)
    out = np.where(covered, base * (1 - alpha) + colour * alpha, base)
    img = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    entries = []
    for v in range(1, m.shape[0]):
        text = str(labels[v]) if v < len(labels) else f"LoRA {v}"
        if concepts is not None and v - 1 < len(concepts) and concepts[v - 1]:
            text = f"{text}: {concepts[v - 1]}"
        entries.append((colour_of(v), text))
    entries.append(((0, 0, 0), "uncoloured: base prompt"))
    return _with_legend(img, entries)


def attention_grid(
    maps: torch.Tensor,
    groups: Sequence[Sequence[Sequence[int]]],
    concept_labels: Sequence[str],
    variant_labels: Sequence[str],
    cell: int = 128,
    masks: Optional[torch.Tensor] = None,
):
    """Grid of attention maps: one row per concept, one column per variant (+ a mask column when given, each mask
    in its LoRA's overlay colour), with a colour key below: which colour is which LoRA and concept.

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
            mk = m[k + 1].numpy().astype(np.float64)[..., None]
            tinted = (mk * np.array(colour_of(k + 1), dtype=np.float64)).round().astype(np.uint8)
            tile = Image.fromarray(tinted).resize((cell, cell), Image.NEAREST)
            grid.paste(_label(tile, f"mask {concept_labels[k]}"), (V * cell, k * cell))
    entries = [(colour_of(k + 1), f"{variant_labels[k + 1] if k + 1 < len(variant_labels) else f'LoRA {k + 1}'}: "
                f"{concept_labels[k]}") for k in range(len(groups))]
    return _with_legend(grid, entries)
