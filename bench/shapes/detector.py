"""Read the objects of a shapes-world image back: shape, colour, pattern, box — analytically, no learning.

Steps, for a uint8 (H, W, 3) image:

1. background: the per-channel median of the image's border pixels (generated backgrounds come out tinted);
2. foreground: pixels farther than `FG_DISTANCE` (RGB Euclidean) from the background; 8-connected components of at
   least `MIN_AREA` pixels are objects (smaller specks are ignored);
3. colour: every pixel of a component votes for the nearest of the 8 reference colours (the 4 palette colours and
   their dark pattern shades); the object's colour is the hue with most votes;
   dark pixels: a two-means split of the object's brightness (channel sum) — of its interior when the light group is
   only a sliver of blended edge pixels — kept when the dark group is at most `_SHADE_RATIO` as bright as the light one — relative,
   because generated images come out tinted and darkened;
4. shape: from the component's fill of its bounding box and its taper (mean width of the bottom third of its rows
   over that of the top third): a triangle tapers, a square fills its box, a circle is in between;
5. pattern: from the dark pixels — their fraction (``plain`` below `_PLAIN_DARK`); ``ring`` when they form one blob
   inside a light rim; else from the rates of light/dark changes between horizontal and between vertical neighbours
   inside the object: ``stripes`` (vertical changes, few horizontal ones), ``columns`` (the other way round),
   ``checker`` (both), ``other`` (neither: blotches, noise).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .world import COLOURS, DARK

__all__ = ["Detected", "detect", "FG_DISTANCE", "MIN_AREA", "kinds_of"]

FG_DISTANCE = 60.0
MIN_AREA = 12
_HUES = tuple(COLOURS)
_LIGHT = np.array([COLOURS[h] for h in _HUES], dtype=np.float64)
_DARK = np.round(DARK * _LIGHT)
_REFS = np.concatenate([_LIGHT, _DARK])  # index i < 4: light hue i; i >= 4: dark hue i - 4

# Shape thresholds (fill of the bounding box, taper = bottom-third width / top-third width).
_TRIANGLE_TAPER = 2.5
_TRIANGLE_FILL = 0.67
_CIRCLE_FILL = 0.73
_SQUARE_FILL = 0.9
# Pattern thresholds.
_PLAIN_DARK = 0.08
_SHADE_RATIO = 0.7
_BANDS = 0.2  # transition rate (light/dark changes per neighbour pair) from which a direction is banded
_ANISOTROPY = 0.5  # bands run one way when the other direction changes at most this fraction as often
_RING_RIM_DARK = 0.25
_RING_CORE_DARK = 0.8
_SLIVER = 0.15  # a light group this small (share of the object) is blended edge pixels: split the interior instead
_MIN_INTERIOR = 12  # fewest interior pixels that split is learnt from


@dataclass(frozen=True)
class Detected:
    """One object found in an image."""

    shape: str
    colour: str
    pattern: str  # "plain", "stripes", "columns", "checker", "ring" or "other"
    area: int
    box: tuple[int, int, int, int]  # (left, top, right, bottom), inclusive pixel indices
    dark_fraction: float = 0.0

    @property
    def kind(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.pattern)


_STEPS8 = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)
_STEPS4 = ((-1, 0), (1, 0), (0, -1), (0, 1))


def _background(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]]).astype(np.float64)
    return np.median(border, axis=0)


def _components(mask: np.ndarray, diagonal: bool = True) -> tuple[np.ndarray, int]:
    """8-connected (4-connected without ``diagonal``) labelling, 1..n with 0 = none, by flood fill; the images are
    tiny, so plain Python is fast enough."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    steps = _STEPS8 if diagonal else _STEPS4
    n = 0
    for i in range(h):
        for j in range(w):
            if not mask[i, j] or labels[i, j]:
                continue
            n += 1
            stack = [(i, j)]
            labels[i, j] = n
            while stack:
                y, x = stack.pop()
                for dy, dx in steps:
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                        labels[yy, xx] = n
                        stack.append((yy, xx))
    return labels, n


def _erode(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1, constant_values=False)
    out = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            out &= p[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def _shape(comp: np.ndarray) -> str:
    rows = np.nonzero(comp.any(axis=1))[0]
    cols = np.nonzero(comp.any(axis=0))[0]
    sub = comp[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    fill = sub.sum() / sub.size
    widths = sub.sum(axis=1).astype(np.float64)
    third = max(1, len(widths) // 3)
    taper = widths[-third:].mean() / max(widths[:third].mean(), 1.0)
    corners = int(sub[0, 0]) + int(sub[0, -1]) + int(sub[-1, 0]) + int(sub[-1, -1])
    if fill < _TRIANGLE_FILL or (taper >= _TRIANGLE_TAPER and fill < _CIRCLE_FILL):
        return "triangle"
    if fill >= _SQUARE_FILL and corners >= 3:
        return "square"
    return "circle"


def _blobs(mask: np.ndarray) -> int:
    """Number of 4-connected groups of at least 2 pixels."""
    labels, n = _components(mask, diagonal=False)
    return int(sum((labels == k).sum() >= 2 for k in range(1, n + 1)))


def _transition_rate(dark: np.ndarray, comp: np.ndarray, axis: int) -> float:
    """Fraction of neighbouring pixel pairs along ``axis`` (both inside the object) whose darkness differs."""
    if axis == 1:
        both = comp[:, 1:] & comp[:, :-1]
        diff = dark[:, 1:] != dark[:, :-1]
    else:
        both = comp[1:] & comp[:-1]
        diff = dark[1:] != dark[:-1]
    n = both.sum()
    return float((diff & both).sum() / n) if n else 0.0


def _two_means(vals: np.ndarray) -> Optional[tuple[float, float, float]]:
    """``(cut, dark mean, light mean)`` of a two-means split of ``vals``; None when one group is empty."""
    lo, hi = float(vals.min()), float(vals.max())
    cut = (lo + hi) / 2
    for _ in range(20):
        dark_vals, light_vals = vals[vals < cut], vals[vals >= cut]
        if not len(dark_vals) or not len(light_vals):
            return None
        new = (dark_vals.mean() + light_vals.mean()) / 2
        if abs(new - cut) < 1e-3:
            break
        cut = new
    return cut, float(dark_vals.mean()), float(light_vals.mean())


def _dark_pixels(px: np.ndarray, comp: np.ndarray) -> tuple[np.ndarray, float]:
    """The object's dark pixels, relative to its own brightness (generated images come out tinted and darkened as a
    whole): two-means on the channel sum inside the object; the split counts only when the dark group is at most
    `_SHADE_RATIO` as bright as the light group (the rendered shade is `DARK` = 0.45 of the colour).

    When the light group is a sliver (at most `_SLIVER` of the object), it is the edge pixels of a generated object
    blending with the light background, not a fill: the split is then learnt again on the object's interior."""
    v = px.sum(axis=-1)
    split = _two_means(v[comp])
    if split is not None and float((v[comp] >= split[0]).mean()) <= _SLIVER:
        interior = _erode(comp)
        if interior.sum() >= _MIN_INTERIOR:
            split = _two_means(v[interior])
    if split is None:
        return np.zeros_like(comp), 1.0
    cut, dark_mean, light_mean = split
    ratio = dark_mean / max(light_mean, 1e-6)
    if ratio > _SHADE_RATIO:
        return np.zeros_like(comp), ratio
    return comp & (v < cut), ratio


def _pattern(dark: np.ndarray, comp: np.ndarray) -> tuple[str, float]:
    frac = float(dark[comp].mean())
    if frac < _PLAIN_DARK:
        return "plain", frac
    rim = comp & ~_erode(comp)
    rim_dark = float(dark[rim].mean()) if rim.any() else 1.0
    inner = float((dark & ~rim).sum() / max(dark.sum(), 1))
    if rim_dark <= _RING_RIM_DARK and inner >= _RING_CORE_DARK and _blobs(dark & ~rim) == 1:
        return "ring", frac
    th = _transition_rate(dark, comp, axis=1)
    tv = _transition_rate(dark, comp, axis=0)
    if tv >= _BANDS and th <= _ANISOTROPY * tv:
        return "stripes", frac
    if th >= _BANDS and tv <= _ANISOTROPY * th:
        return "columns", frac
    if th >= _BANDS and tv >= _BANDS:
        return "checker", frac
    return "other", frac


def detect(img: np.ndarray, background: Optional[Sequence[float]] = None) -> list[Detected]:
    """Objects in a uint8 (H, W, 3) image, largest first."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"detect expects an (H, W, 3) image, got shape {img.shape}.")
    px = img.astype(np.float64)
    bg = np.asarray(background, dtype=np.float64) if background is not None else _background(img)
    fg = np.linalg.norm(px - bg, axis=-1) > FG_DISTANCE
    labels, n = _components(fg)
    dist = np.linalg.norm(px[:, :, None, :] - _REFS[None, None], axis=-1)  # (H, W, 8)
    nearest = dist.argmin(-1)
    out = []
    for k in range(1, n + 1):
        comp = labels == k
        area = int(comp.sum())
        if area < MIN_AREA:
            continue
        votes = np.bincount(nearest[comp] % len(_HUES), minlength=len(_HUES))
        hue = int(votes.argmax())
        dark, _ratio = _dark_pixels(px, comp)
        pattern, frac = _pattern(dark, comp)
        ys, xs = np.nonzero(comp)
        out.append(
            Detected(
                shape=_shape(comp),
                colour=_HUES[hue],
                pattern=pattern,
                area=area,
                box=(int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())),
                dark_fraction=frac,
            )
        )
    out.sort(key=lambda d: -d.area)
    return out


def kinds_of(found: Sequence[Detected]) -> list[tuple[str, str, str]]:
    """``(shape, colour, pattern)`` of each detection, sorted (for comparing with a ground truth)."""
    return sorted(d.kind for d in found)


def random_scenes(seed: int, n: int):
    """``n`` rendered scenes of one or two objects (alternating) with random patterns, plain included: the
    detector's ground truth.  Yields ``(scene, image)``."""
    from .world import PATTERNS, render, sample_kinds, sample_scene

    rng = np.random.default_rng(seed)
    for i in range(n):
        count = 1 + i % 2
        patterns = [PATTERNS[int(rng.integers(len(PATTERNS)))] for _ in range(count)]
        scene = sample_scene(rng, sample_kinds(rng, count, patterns))
        yield scene, render(scene, rng)


def ground_truth_accuracy(n: int = 2000, seed: int = 2024) -> tuple[float, list]:
    """Share of `random_scenes` read exactly right (every object's shape, colour and pattern, and the count), and the
    misread ones as ``(truth, found)``."""
    wrong = []
    for scene, img in random_scenes(seed, n):
        truth = sorted((o.shape, o.colour, o.pattern) for o in scene.objects)
        found = kinds_of(detect(img))
        if found != truth:
            wrong.append((truth, found))
    return 1 - len(wrong) / n, wrong


if __name__ == "__main__":  # python -m bench.shapes.detector [n] [seed]
    import sys

    n_, seed_ = (int(sys.argv[1]) if len(sys.argv) > 1 else 2000), (int(sys.argv[2]) if len(sys.argv) > 2 else 2024)
    acc, misses = ground_truth_accuracy(n_, seed_)
    print(f"detector accuracy on {n_} rendered scenes (seed {seed_}): {100 * acc:.2f} %")
    for truth, found in misses:
        print(f"  truth {truth} read as {found}")
