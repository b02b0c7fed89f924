"""The shapes world: 32x32 scenes of one or two coloured shapes on a grey background, plus patterned concepts.

The base world is exactly the one ``shapes-base-v1.safetensors`` was trained on (``shared/data/README.md``):

* background: one grey level per image, uniform integer in [215, 255]; Gaussian pixel noise σ = 2; clipped to 0..255;
* objects: shape ∈ {circle, square, triangle} × colour ∈ {red, green, blue, yellow}; size ``s`` uniform integer in
  8..14; centre uniform in ``[s/2 + 1, 32 − s/2 − 1]`` on both axes; two objects never share shape and colour and their
  boxes grown by 1.5 px never touch (the layout is redrawn jointly until they don't);
* circle ``(x−cx)² + (y−cy)² ≤ (s/2)²``, square ``|x−cx| ≤ s/2 and |y−cy| ≤ s/2``, triangle apex up with its base at
  the bottom of the box and a half-width growing linearly to ``s/2`` — all tested at pixel centres ``(j + ½, i + ½)``;
* one object with probability ½, else two; caption ``"a {colour} {shape}"`` joined by ``" and "``; empty caption 10 %
  of the time; horizontal flip with probability ½.

Concepts (new here, never seen by the base): a *pattern* drawn inside an object in a dark shade of the object's own
colour (``DARK`` × colour), named in captions by a rare one-token trigger word placed before the colour:
``"a sks red circle"``.  Patterns: ``stripes`` (horizontal 2-px bands), ``columns`` (vertical 2-px bands),
``checker`` (2-px cells), ``ring`` (a light rim around a dark core: the same shape at half the size, about the same
centre, a triangle's incentre).  ``plain`` is the base's own fill.

Everything is deterministic from a seed (``numpy.random.Generator``); nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "SIZE",
    "COLOURS",
    "SHAPES",
    "PATTERNS",
    "DARK",
    "Concept",
    "CONCEPTS",
    "concept_by_pattern",
    "Obj",
    "Scene",
    "shape_mask",
    "pattern_mask",
    "render",
    "sample_layout",
    "sample_base_scene",
    "caption",
    "object_phrase",
]

SIZE = 32
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PATTERNS: tuple[str, ...] = ("plain", "stripes", "columns", "checker", "ring")
#: The pattern's dark shade is this fraction of the object's colour.
DARK = 0.45
BACKGROUND_RANGE = (215, 255)
NOISE_SIGMA = 2.0
SIZE_RANGE = (8, 14)
GAP = 1.5  # boxes grown by this many pixels never touch
MAX_LAYOUT_TRIES = 10_000


@dataclass(frozen=True)
class Concept:
    """A concept LoRA's subject: a pattern named by a rare one-token trigger word."""

    name: str
    pattern: str
    trigger: str


#: The benchmark's concepts.  Triggers are single CLIP tokens the base never saw in a caption.
CONCEPTS: tuple[Concept, ...] = (
    Concept("stripes", "stripes", "zyk"),
    Concept("columns", "columns", "dax"),
    Concept("checker", "checker", "sks"),
    Concept("ring", "ring", "ohwx"),
)


def concept_by_pattern(pattern: str) -> Concept:
    """The concept drawing ``pattern`` (a `KeyError` naming it when there is none)."""
    for c in CONCEPTS:
        if c.pattern == pattern:
            return c
    raise KeyError(f"No concept draws the pattern '{pattern}'.")


@dataclass(frozen=True)
class Obj:
    """One object: shape, colour, pattern, size ``s`` and centre ``(cx, cy)`` in pixels (x to the right, y down)."""

    shape: str
    colour: str
    size: float
    cx: float
    cy: float
    pattern: str = "plain"

    def box(self) -> tuple[float, float, float, float]:
        """``(left, top, right, bottom)`` of the object's box."""
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    """A rendered scene's ground truth: background grey level and objects (after any flip)."""

    background: int
    objects: tuple[Obj, ...] = field(default_factory=tuple)


# ----- geometry ---------------------------------------------------------------------------------------------------


def _grid(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)``, each (size, size)."""
    c = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(c, c)  # x varies along columns, y along rows


def shape_mask(obj: Obj, size: int = SIZE) -> np.ndarray:
    """Boolean (size, size) mask of the pixels whose centres lie inside ``obj``."""
    x, y = _grid(size)
    h = obj.size / 2
    if obj.shape == "circle":
        return (x - obj.cx) ** 2 + (y - obj.cy) ** 2 <= h * h
    if obj.shape == "square":
        return (np.abs(x - obj.cx) <= h) & (np.abs(y - obj.cy) <= h)
    if obj.shape == "triangle":
        top, bottom = obj.cy - h, obj.cy + h
        half_width = (y - top) / obj.size * h
        return (y >= top) & (y <= bottom) & (np.abs(x - obj.cx) <= half_width)
    raise ValueError(f"Unknown shape '{obj.shape}'; expected one of {', '.join(SHAPES)}.")


#: A triangle's incentre lies this fraction of ``s`` below its box centre (inradius ``s / (1 + √5)``).
_TRIANGLE_INCENTRE = 0.5 - 1 / (1 + 5**0.5)
#: The ring's dark core is the same shape at this fraction of the size, about the same centre (incentre).
RING_CORE = 0.5


def _core(obj: Obj) -> Obj:
    """The ring's dark core: ``obj`` scaled by `RING_CORE` about its centre (a triangle about its incentre)."""
    dy = _TRIANGLE_INCENTRE * obj.size * (1 - RING_CORE) if obj.shape == "triangle" else 0.0
    return replace(obj, size=obj.size * RING_CORE, cy=obj.cy + dy)  # type: ignore[arg-type]


def pattern_mask(obj: Obj, inside: np.ndarray) -> np.ndarray:
    """Boolean mask of the pixels of ``inside`` (the object's shape mask) drawn in the dark shade."""
    if obj.pattern == "plain":
        return np.zeros_like(inside)
    rows, cols = np.indices(inside.shape)
    left, top = int(np.floor(obj.cx - obj.size / 2)), int(np.floor(obj.cy - obj.size / 2))
    u, v = (cols - left) // 2, (rows - top) // 2
    if obj.pattern == "stripes":
        dark = v % 2 == 1
    elif obj.pattern == "columns":
        dark = u % 2 == 1
    elif obj.pattern == "checker":
        dark = (u + v) % 2 == 1
    elif obj.pattern == "ring":
        dark = shape_mask(_core(obj), inside.shape[0])
    else:
        raise ValueError(f"Unknown pattern '{obj.pattern}'; expected one of {', '.join(PATTERNS)}.")
    return inside & dark


def dark_colour(colour: str) -> tuple[int, int, int]:
    """The pattern shade of a palette colour."""
    return tuple(int(round(DARK * c)) for c in COLOURS[colour])  # type: ignore[return-value]


def render(scene: Scene, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """The scene as a uint8 (size, size, 3) image; pixel noise is drawn from ``rng``."""
    img = np.full((size, size, 3), float(scene.background))
    for obj in scene.objects:
        inside = shape_mask(obj, size)
        img[inside] = COLOURS[obj.colour]
        img[pattern_mask(obj, inside)] = dark_colour(obj.colour)
    img = img + rng.normal(0.0, NOISE_SIGMA, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ----- sampling ---------------------------------------------------------------------------------------------------


def _boxes_touch(a: Obj, b: Obj, gap: float = GAP) -> bool:
    al, at, ar, ab = a.box()
    bl, bt, br, bb = b.box()
    return not (ar + gap < bl - gap or br + gap < al - gap or ab + gap < bt - gap or bb + gap < at - gap)


def sample_layout(
    rng: np.random.Generator, kinds: Sequence[tuple[str, str, str]], size: int = SIZE
) -> tuple[Obj, ...]:
    """Sizes and centres for objects of the given ``(shape, colour, pattern)`` kinds, redrawn jointly until no two
    grown boxes touch."""
    lo, hi = SIZE_RANGE
    for _ in range(MAX_LAYOUT_TRIES):
        objs = []
        for shape, colour, pattern in kinds:
            s = int(rng.integers(lo, hi + 1))
            cx = float(rng.uniform(s / 2 + 1, size - s / 2 - 1))
            cy = float(rng.uniform(s / 2 + 1, size - s / 2 - 1))
            objs.append(Obj(shape, colour, s, cx, cy, pattern))
        if all(not _boxes_touch(a, b) for i, a in enumerate(objs) for b in objs[i + 1 :]):
            return tuple(objs)
    raise RuntimeError(f"Could not place {len(kinds)} objects without overlap in {MAX_LAYOUT_TRIES} tries.")


def _flip(objs: Sequence[Obj], size: int = SIZE) -> tuple[Obj, ...]:
    return tuple(replace(o, cx=size - o.cx) for o in objs)


def sample_kinds(rng: np.random.Generator, n: int, patterns: Sequence[str] = ()) -> list[tuple[str, str, str]]:
    """``n`` distinct (shape, colour) pairs drawn uniformly, with the given patterns (``plain`` for the rest)."""
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    idx = rng.choice(len(pairs), size=n, replace=False)
    pats = list(patterns) + ["plain"] * (n - len(patterns))
    return [(pairs[i][0], pairs[i][1], p) for i, p in zip(idx, pats)]


def sample_scene(
    rng: np.random.Generator, kinds: Sequence[tuple[str, str, str]], flip: Optional[bool] = None
) -> Scene:
    """A scene of the given kinds: background, layout, then a horizontal flip with probability ½ (or as told)."""
    lo, hi = BACKGROUND_RANGE
    background = int(rng.integers(lo, hi + 1))
    objs = sample_layout(rng, kinds)
    if flip if flip is not None else rng.random() < 0.5:
        objs = _flip(objs)
    return Scene(background, objs)


def sample_base_scene(rng: np.random.Generator) -> tuple[Scene, str]:
    """One training example of the base world: (scene, caption); the caption is empty 10 % of the time."""
    n = 1 if rng.random() < 0.5 else 2
    scene = sample_scene(rng, sample_kinds(rng, n))
    text = caption(scene.objects)
    if rng.random() < 0.1:
        text = ""
    return scene, text


def object_phrase(obj_or_kind, triggers: Optional[dict[str, str]] = None) -> str:
    """``"a red circle"``; with ``triggers`` (pattern -> trigger word) a patterned object gets its trigger:
    ``"a sks red circle"``."""
    if isinstance(obj_or_kind, Obj):
        shape, colour, pattern = obj_or_kind.shape, obj_or_kind.colour, obj_or_kind.pattern
    else:
        shape, colour, pattern = obj_or_kind
    trig = (triggers or {}).get(pattern, "") if pattern != "plain" else ""
    return f"a {trig + ' ' if trig else ''}{colour} {shape}"


def caption(objects: Sequence, triggers: Optional[dict[str, str]] = None) -> str:
    """Objects' phrases joined by ``" and "`` (the base world's caption form)."""
    return " and ".join(object_phrase(o, triggers) for o in objects)


def trigger_table() -> dict[str, str]:
    """pattern -> trigger word of every concept."""
    return {c.pattern: c.trigger for c in CONCEPTS}
