"""Typed CLoRA settings: LoRA bindings, style LoRAs, the schedule and mask options.

Three forms of the same settings, all lossless:

* the dataclasses below (what the engine reads);
* a *flat* dict with human-readable keys for A1111/Forge infotext (``to_flat`` / ``from_flat``), e.g.::

      CLoRA: True, CLoRA version: 2, CLoRA 1 LoRA: cat_v1, CLoRA 1 subject: cat, CLoRA 1 trigger: sks,
      CLoRA 1 weight: 0.9, CLoRA style 1 LoRA: ink, CLoRA style 1 weight: 0.8, CLoRA style 1 mode: whole,
      CLoRA refine at: "0,0.1,0.2"

  Options at their default value are left out; the enable flag and every binding's LoRA, subject and weight are always
  written (trigger and text-encoder weight only when set), and so is ``CLoRA version: 2``, the format version (left
  out only of the bare ``CLoRA: False`` of default settings).  An infotext without ``CLoRA version`` was written
  before the version existed (version 1), when the options of `LEGACY_OPTIONS` did not exist: their keys, missing
  there, mean the old behaviour (the values in `LEGACY_OPTIONS`) instead of today's defaults.  Several subjects of
  one binding are joined with ``|`` (``cat|kitten``): a comma would be taken by infotext as the end of the value.
  Numbers are written as A1111 writes them, ``1`` for a whole number (an ``int`` in the dict) and Python's shortest
  exact form otherwise (``0.8``), so they read back bit for bit; infotexts written as ``1.0`` (older versions) read
  the same.  ``from_flat`` accepts every value as a string as well (the infotext text round trip turns everything
  into strings, possibly JSON-quoted).  Two quirks of A1111's infotext parser are not worked around: a value shaped
  like ``512x512`` is split into two keys, and a value that starts and ends with ``"`` loses its quotes;
* a *named-field* JSON dict for the API (``to_json`` / ``from_json``, schema in ``json_schema()``).

Fractions of the step count (``opt_end``, ``refine_at``, ``mask_start``) become step indices through
``optimise_steps(n)``, ``refine_steps(n)`` and ``mask_start_step(n)``; with the defaults and the authors' 100 DDIM
steps they give the latent updates at steps 0..49 and refinement at steps 0, 10 and 20.

Construction only normalises (sequences to tuples, whitespace, ints to floats); ``validate()`` checks everything and
raises `SettingsError` with one sentence per problem.  ``from_flat`` and ``from_json`` validate what they build.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Union

__all__ = [
    "SettingsError",
    "Binding",
    "StyleLora",
    "CloraSettings",
    "MAX_BINDINGS",
    "MAX_STYLES",
    "MAX_REFINE_POINTS",
    "WEIGHT_RANGE",
    "STEP_SIZE_MAX",
    "TEMPERATURE_MAX",
    "REFINE_ITERS_MAX",
    "MORPHOLOGIES",
    "STYLE_MODES",
    "SUBJECT_SEPARATOR",
    "MAPS_FROM",
    "GRAD_MEMORY",
    "GRAD_MEMORY_AUTO_LARGE",
    "MAP_LAYERS",
    "FLAT_VERSION",
    "LEGACY_OPTIONS",
    "json_schema",
]

MAX_BINDINGS = 8
MAX_STYLES = 4
MAX_REFINE_POINTS = 16
WEIGHT_RANGE = (-4.0, 4.0)
STEP_SIZE_MAX = 1000.0
TEMPERATURE_MAX = 10.0
REFINE_ITERS_MAX = 100
MORPHOLOGIES = ("none", "open", "close", "dilate", "erode")
STYLE_MODES = ("whole", "subjects")
SUBJECT_SEPARATOR = "|"
#: Values of ``maps_from``: the mean over the negative-prompt and prompt rows (``both``), or the prompt rows only.
MAPS_FROM = ("both", "cond")
#: Values of ``grad_memory``: how a gradient pass keeps its activations (see `CloraSettings`).
GRAD_MEMORY = ("auto", "batched", "per_variant", "checkpoint", "per_variant_checkpoint")
#: What ``grad_memory = "auto"`` means for UNets with a vector conditioning (SDXL); others get ``"batched"``.
GRAD_MEMORY_AUTO_LARGE = "checkpoint"
#: Values of ``map_layers``: which cross-attention layers at the map size (H/32) give the maps of the loss and the
#: masks: every one (the authors' choice), or those of one part of the UNet (see `CloraSettings`).
MAP_LAYERS = ("all", "down", "mid", "up")
#: Version of the flat (infotext) form that `CloraSettings.to_flat` writes as ``CLoRA version``.
FLAT_VERSION = 2
#: The options added with flat version 2, and the values that give the behaviour from before them: what an infotext
#: without ``CLoRA version`` (and an old 67-value positional argument list) means for them.
LEGACY_OPTIONS: dict[str, Any] = {"maps_from": "cond", "predict_after_update": True, "negative_te_lora": False}

#: Characters that would be read as A1111 emphasis syntax (or as the subject separator) once put into a prompt.
_FORBIDDEN_IN_SUBJECT = "()[]\\|"
_FORBIDDEN_IN_TRIGGER = "()[]\\"
_PREFIX = "CLoRA"

Number = Union[int, float]
FlatValue = Union[str, int, float, bool]


class SettingsError(ValueError):
    """Invalid CLoRA settings; the message is meant for the user as it is (one sentence per problem)."""


# ----- normalisation helpers (construction) ---------------------------------------------------------------


def _clean_text(value: Any) -> Any:
    """Collapse runs of whitespace and strip; non-strings are returned unchanged (validation reports them)."""
    return " ".join(value.split()) if isinstance(value, str) else value


def _as_number(value: Any) -> Any:
    """ints become floats so that equal settings compare equal; anything else is left for validation."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _as_subjects(value: Any) -> tuple:
    """A string is split on ``|``; any other iterable becomes a tuple of cleaned strings."""
    if isinstance(value, str):
        items: Iterable[Any] = value.split(SUBJECT_SEPARATOR)
    elif value is None:
        items = ()
    else:
        items = value
    return tuple(_clean_text(s) for s in items)


def _flat_number(x: Any) -> Any:
    """A number as A1111 writes it into infotext: ``1`` (an ``int``) for a whole float, ``0.8`` otherwise; ``str``
    of the result is the shortest exact text (``1``, ``0.8``, ``20``, ``1e-07``), which `_parse_float` reads back
    bit for bit."""
    negative_zero = x == 0 and math.copysign(1.0, x) < 0 if isinstance(x, float) else False
    if isinstance(x, float) and math.isfinite(x) and x.is_integer() and abs(x) < 2**53 and not negative_zero:
        return int(x)
    return x


def _fmt_float(x: float) -> str:
    """Shortest exact text of a float, without a trailing ``.0`` (``0``, ``0.1``, ``20``, ``1e-07``)."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _range_problem(
    name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> Optional[str]:
    """A sentence when ``value`` is not a finite number in the interval, else ``None``."""
    if not _is_number(value):
        return f"{name} must be a number, got {value!r}."
    too_low = value <= lo if lo_open else value < lo
    too_high = value >= hi if hi_open else value > hi
    if too_low or too_high:
        left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
        return f"{name} must be in {left}{_fmt_float(lo)}, {_fmt_float(hi)}{right}, got {_fmt_float(value)}."
    return None


# ----- the dataclasses ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    """One LoRA bound to one concept of the prompt.

    lora: the LoRA's name as the host knows it (file stem).
    subjects: words or phrases of the prompt naming the concept (one or more, e.g. ``("cat",)`` or ``("red car",)``);
        matched case-insensitively as whole words.  A single string is split on ``|`` (``"cat|kitten"``).
    triggers: words inserted before the subject in this LoRA's own prompt variant (may be empty).
    weight: the LoRA's strength on the UNet.
    te_weight: its strength on the text encoder; ``None`` means the same as ``weight``.
    """

    lora: str
    subjects: tuple[str, ...]
    triggers: str = ""
    weight: float = 1.0
    te_weight: Optional[float] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora", _clean_text(self.lora))
        object.__setattr__(self, "subjects", _as_subjects(self.subjects))
        object.__setattr__(self, "triggers", _clean_text(self.triggers if self.triggers is not None else ""))
        object.__setattr__(self, "weight", _as_number(self.weight))
        object.__setattr__(self, "te_weight", _as_number(self.te_weight))

    def label(self, number: int) -> str:
        """``Binding 2 (LoRA 'dog_v1')`` — how messages name this binding (``number`` is 1-based)."""
        if isinstance(self.lora, str) and self.lora:
            return f"Binding {number} (LoRA '{self.lora}')"
        return f"Binding {number}"

    def problems(self, number: int) -> list[str]:
        """Sentences describing what is wrong with this binding (empty when it is valid)."""
        who = self.label(number)
        out: list[str] = []
        if not isinstance(self.lora, str) or not self.lora:
            out.append(f"{who}: no LoRA name given.")
        if not self.subjects:
            out.append(f"{who}: no subject word given.")
        seen: set[str] = set()
        for s in self.subjects:
            if not isinstance(s, str):
                out.append(f"{who}: subject {s!r} is not text.")
                continue
            if not s:
                out.append(f"{who}: an empty subject word was given.")
                continue
            bad = sorted({c for c in s if c in _FORBIDDEN_IN_SUBJECT})
            if bad:
                out.append(f"{who}: subject '{s}' must not contain {' '.join(bad)}.")
            if s.lower() in seen:
                out.append(f"{who}: subject '{s}' is given twice.")
            seen.add(s.lower())
        if not isinstance(self.triggers, str):
            out.append(f"{who}: trigger words must be text, got {self.triggers!r}.")
        else:
            bad = sorted({c for c in self.triggers if c in _FORBIDDEN_IN_TRIGGER})
            if bad:
                out.append(f"{who}: trigger words '{self.triggers}' must not contain {' '.join(bad)}.")
        lo, hi = WEIGHT_RANGE
        p = _range_problem(f"{who}: weight", self.weight, lo, hi)
        if p:
            out.append(p)
        if self.te_weight is not None:
            p = _range_problem(f"{who}: text-encoder weight", self.te_weight, lo, hi)
            if p:
                out.append(p)
        return out


@dataclass(frozen=True)
class StyleLora:
    """A LoRA applied beside the bindings.

    mode ``"whole"``: on every variant's rows (the whole image); ``"subjects"``: only on the variants of the bindings
    whose subjects are named in ``subjects`` (case-insensitive).
    """

    lora: str
    weight: float = 0.8
    mode: str = "whole"
    subjects: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora", _clean_text(self.lora))
        object.__setattr__(self, "weight", _as_number(self.weight))
        object.__setattr__(self, "mode", _clean_text(self.mode))
        object.__setattr__(self, "subjects", _as_subjects(self.subjects))

    def label(self, number: int) -> str:
        if isinstance(self.lora, str) and self.lora:
            return f"Style LoRA {number} ('{self.lora}')"
        return f"Style LoRA {number}"

    def problems(self, number: int, bound_subjects: set[str]) -> list[str]:
        """Sentences describing what is wrong (``bound_subjects``: lower-cased subjects of all bindings)."""
        who = self.label(number)
        out: list[str] = []
        if not isinstance(self.lora, str) or not self.lora:
            out.append(f"{who}: no LoRA name given.")
        lo, hi = WEIGHT_RANGE
        p = _range_problem(f"{who}: weight", self.weight, lo, hi)
        if p:
            out.append(p)
        if self.mode not in STYLE_MODES:
            out.append(f"{who}: mode {self.mode!r} is not one of {', '.join(STYLE_MODES)}.")
        elif self.mode == "whole" and self.subjects:
            out.append(f"{who}: subjects are only used in mode 'subjects' (mode is 'whole').")
        elif self.mode == "subjects" and not self.subjects:
            out.append(f"{who}: mode 'subjects' needs at least one subject word.")
        for s in self.subjects:
            if not isinstance(s, str) or not s:
                out.append(f"{who}: subject {s!r} is empty or not text.")
            elif s.lower() not in bound_subjects:
                out.append(f"{who}: '{s}' is not the subject of any binding.")
        return out


@dataclass(frozen=True)
class CloraSettings:
    """Everything CLoRA needs besides the prompt.

    enabled: run CLoRA at all.
    bindings: LoRA -> concept bindings (at most `MAX_BINDINGS`); binding k is prompt variant k+1.
    styles: style LoRAs (at most `MAX_STYLES`).
    step_size: z-space step size of the latent update (the authors' ``step_size``); 0 disables the update.
    opt_end: fraction of the steps during which the latent is updated (the authors' ``max_iter_to_alter`` / steps).
    refine_at: fractions of the steps at which iterative refinement runs (the authors' ``iterative_steps`` / steps).
    refine_iters: extra update iterations at each refinement step.
    temperature: NT-Xent temperature.
    mask_threshold: λ of the masks (a map is kept where it exceeds λ times its maximum).
    mask_morphology: one of `MORPHOLOGIES`.
    mask_start: fraction of the steps before the masked fusion starts (the authors' ``apply_mask_after`` / steps).
    lora_on_uncond: the binding LoRAs also run on the unconditional rows (the authors' behaviour).
    show_previews: produce attention/mask preview images.
    maps_from: which rows of each variant give the attention maps of the loss and the masks: ``"both"`` the mean
        over its negative-prompt (uncond) and prompt (cond) rows, as the authors compute; ``"cond"`` the prompt rows.
    predict_after_update: at a step with a latent update, False fuses the prediction of the forward pass before the
        (last) update, applied to the updated latent (the authors' way; that pass also gave the maps); True runs one
        more forward pass on the updated latent.
    negative_te_lora: True encodes the negative prompt once per variant with the text-encoder LoRAs of that
        variant's negative-prompt rows (its LoRA when ``lora_on_uncond`` is on, and the style LoRAs), as the authors
        do; False encodes it once without any LoRA for all variants.
    grad_memory: how a gradient pass (the latent update) keeps the activations its backward pass needs; every mode
        gives the same gradient up to float rounding, they differ in memory and time (bench/sdxl_memory.py).
        ``"batched"``: one pass over all rows, everything kept until the backward pass.  ``"per_variant"``: a
        no-grad pass over all rows gives the maps and the loss, then one gradient pass per variant over its rows
        alone (one variant's activations alive at a time; one more forward up to the last H/32 layer).
        ``"checkpoint"``: one pass over all rows, each ResBlock and transformer block keeping only its input and
        running again during the backward pass.  ``"per_variant_checkpoint"``: both.  ``"auto"``: ``"batched"``
        for SD1/SD2, `GRAD_MEMORY_AUTO_LARGE` for SDXL (a UNet with a vector conditioning).
    map_layers: which cross-attention layers at the map size (H/32) are averaged into the maps of the loss and the
        masks: ``"all"`` (the authors' choice; SD1.5: 5 layers, SDXL: 60), ``"down"`` those of the down path
        (``input_blocks``; SD1.5: 2, SDXL: 20), ``"mid"`` the middle block's (SDXL: 10; SD1 has none at H/32),
        ``"up"`` the up path's (``output_blocks``; SD1.5: 3, SDXL: 30).  A gradient pass stops after the last chosen
        layer, so ``"down"`` and ``"mid"`` make latent updates cheaper (bench/sdxl_memory.py).
    `LEGACY_OPTIONS` holds the values of maps_from, predict_after_update and negative_te_lora that give the behaviour
    from before they existed.
    """

    enabled: bool = False
    bindings: tuple[Binding, ...] = ()
    styles: tuple[StyleLora, ...] = ()
    step_size: float = 20.0
    opt_end: float = 0.5
    refine_at: tuple[float, ...] = (0.0, 0.1, 0.2)
    refine_iters: int = 20
    temperature: float = 0.5
    mask_threshold: float = 0.4
    mask_morphology: str = "none"
    mask_start: float = 0.0
    lora_on_uncond: bool = True
    show_previews: bool = False
    maps_from: str = "both"
    predict_after_update: bool = False
    negative_te_lora: bool = True
    grad_memory: str = "auto"
    map_layers: str = "all"

    def __post_init__(self) -> None:
        object.__setattr__(self, "bindings", tuple(self.bindings))
        object.__setattr__(self, "styles", tuple(self.styles))
        refine = self.refine_at
        refine = (refine,) if _is_number(refine) else tuple(refine)
        object.__setattr__(self, "refine_at", tuple(_as_number(x) for x in refine))
        for name in ("step_size", "opt_end", "temperature", "mask_threshold", "mask_start"):
            object.__setattr__(self, name, _as_number(getattr(self, name)))
        object.__setattr__(self, "mask_morphology", _clean_text(self.mask_morphology))
        object.__setattr__(self, "maps_from", _clean_text(self.maps_from))
        object.__setattr__(self, "grad_memory", _clean_text(self.grad_memory))
        object.__setattr__(self, "map_layers", _clean_text(self.map_layers))

    # ----- validation ---------------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Every problem, one sentence each, naming the field or the binding; empty when the settings are valid."""
        out: list[str] = []
        for name in ("enabled", "lora_on_uncond", "show_previews", "predict_after_update", "negative_te_lora"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"Setting {name} must be true or false, got {getattr(self, name)!r}.")
        if len(self.bindings) > MAX_BINDINGS:
            out.append(f"At most {MAX_BINDINGS} LoRA bindings are supported; {len(self.bindings)} were given.")
        if len(self.styles) > MAX_STYLES:
            out.append(f"At most {MAX_STYLES} style LoRAs are supported; {len(self.styles)} were given.")
        if self.enabled is True and not self.bindings:
            out.append("It is enabled, but no LoRA is bound to a subject.")
        owner: dict[str, int] = {}
        for number, b in enumerate(self.bindings, start=1):
            if not isinstance(b, Binding):
                out.append(f"Binding {number} is not a Binding, got {type(b).__name__}.")
                continue
            out.extend(b.problems(number))
            for s in b.subjects:
                if not isinstance(s, str) or not s:
                    continue
                first = owner.setdefault(s.lower(), number)
                if first != number:
                    out.append(
                        f"Subject '{s}' is bound twice: {self.bindings[first - 1].label(first)} and "
                        f"{b.label(number)}."
                    )
        bound = set(owner)
        for number, st in enumerate(self.styles, start=1):
            if not isinstance(st, StyleLora):
                out.append(f"Style LoRA {number} is not a StyleLora, got {type(st).__name__}.")
                continue
            out.extend(st.problems(number, bound))
        for name, lo, hi, lo_open in (
            ("step_size", 0.0, STEP_SIZE_MAX, False),
            ("opt_end", 0.0, 1.0, False),
            ("temperature", 0.0, TEMPERATURE_MAX, True),
            ("mask_start", 0.0, 1.0, False),
        ):
            p = _range_problem(f"Setting {name}", getattr(self, name), lo, hi, lo_open=lo_open)
            if p:
                out.append(p)
        p = _range_problem("Setting mask_threshold", self.mask_threshold, 0.0, 1.0, lo_open=True, hi_open=True)
        if p:
            out.append(p)
        if len(self.refine_at) > MAX_REFINE_POINTS:
            out.append(
                f"Setting refine_at holds {len(self.refine_at)} points; at most {MAX_REFINE_POINTS} are supported."
            )
        for x in self.refine_at:
            p = _range_problem("Setting refine_at: each point", x, 0.0, 1.0)
            if p:
                out.append(p)
        it = self.refine_iters
        if not isinstance(it, int) or isinstance(it, bool) or not 0 <= it <= REFINE_ITERS_MAX:
            out.append(f"Setting refine_iters must be a whole number in 0..{REFINE_ITERS_MAX}, got {it!r}.")
        if self.mask_morphology not in MORPHOLOGIES:
            out.append(f"Setting mask_morphology {self.mask_morphology!r} is not one of {', '.join(MORPHOLOGIES)}.")
        if self.maps_from not in MAPS_FROM:
            out.append(f"Setting maps_from {self.maps_from!r} is not one of {', '.join(MAPS_FROM)}.")
        if self.grad_memory not in GRAD_MEMORY:
            out.append(f"Setting grad_memory {self.grad_memory!r} is not one of {', '.join(GRAD_MEMORY)}.")
        if self.map_layers not in MAP_LAYERS:
            out.append(f"Setting map_layers {self.map_layers!r} is not one of {', '.join(MAP_LAYERS)}.")
        return out

    def validate(self) -> "CloraSettings":
        """Return ``self`` when valid, else raise `SettingsError` listing every problem."""
        problems = self.problems()
        if problems:
            raise SettingsError(" ".join(problems))
        return self

    # ----- schedule ---------------------------------------------------------------------------------

    def optimise_steps(self, n_steps: int) -> range:
        """Step indices (0-based, of ``n_steps``) at which the latent is updated: ``0 .. floor(opt_end·n) - 1``."""
        return range(_fraction_to_step(self.opt_end, n_steps))

    def refine_steps(self, n_steps: int) -> tuple[int, ...]:
        """Sorted distinct step indices with refinement: ``floor(f·n)`` for each ``f`` in ``refine_at``, kept only
        where the latent is updated at all (inside `optimise_steps`)."""
        end = _fraction_to_step(self.opt_end, n_steps)
        steps = {_fraction_to_step(f, n_steps) for f in self.refine_at}
        return tuple(sorted(s for s in steps if s < end))

    def mask_start_step(self, n_steps: int) -> int:
        """First step index (0-based) at which the masked fusion applies: ``floor(mask_start·n)``."""
        return _fraction_to_step(self.mask_start, n_steps)

    # ----- flat form (infotext) -------------------------------------------------------------------------

    def to_flat(self) -> dict[str, FlatValue]:
        """Infotext form: ``{"CLoRA": True, "CLoRA version": 2, "CLoRA 1 LoRA": "cat_v1", ...}`` (see the module
        docstring)."""
        out: dict[str, FlatValue] = {_PREFIX: self.enabled, _VERSION_KEY: FLAT_VERSION}
        for i, b in enumerate(self.bindings, start=1):
            out[f"{_PREFIX} {i} LoRA"] = b.lora
            out[f"{_PREFIX} {i} subject"] = SUBJECT_SEPARATOR.join(b.subjects)
            if b.triggers:
                out[f"{_PREFIX} {i} trigger"] = b.triggers
            out[f"{_PREFIX} {i} weight"] = _flat_number(b.weight)
            if b.te_weight is not None:
                out[f"{_PREFIX} {i} TE weight"] = _flat_number(b.te_weight)
        for i, st in enumerate(self.styles, start=1):
            out[f"{_PREFIX} style {i} LoRA"] = st.lora
            out[f"{_PREFIX} style {i} weight"] = _flat_number(st.weight)
            out[f"{_PREFIX} style {i} mode"] = st.mode
            if st.subjects:
                out[f"{_PREFIX} style {i} subjects"] = SUBJECT_SEPARATOR.join(st.subjects)
        defaults = CloraSettings()
        for name, (key, kind) in _FLAT_OPTIONS.items():
            value = getattr(self, name)
            if value == getattr(defaults, name):
                continue
            if kind == "floats":
                out[key] = ",".join(_fmt_float(x) for x in value) if value else "none"
            else:
                out[key] = _flat_number(value)
        if self.enabled is False and len(out) == 2:
            del out[_VERSION_KEY]  # the bare "CLoRA: False" of default settings reads as default settings
        return out

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], *, strict: bool = True) -> "CloraSettings":
        """Settings from the flat form; keys not starting with ``CLoRA`` are ignored (a whole infotext dict may be
        passed).  Unknown ``CLoRA ...`` keys raise `SettingsError` unless ``strict`` is False.  Validated.

        ``CLoRA version``: without it, a flat form holding any CLoRA key but a bare ``CLoRA: False`` is version 1
        (written before the key existed), whose missing keys of `LEGACY_OPTIONS` take those old values; with it (or
        without any CLoRA key) missing keys take the defaults.  A version above `FLAT_VERSION` reads as the current
        one (its unknown keys are what ``strict`` is about); a version that is not a whole number >= 1 is an error,
        or, unless ``strict``, read as the current one."""
        enabled: Any = False
        version: Optional[int] = None
        other_keys = False
        binding_fields: dict[int, dict[str, Any]] = {}
        style_fields: dict[int, dict[str, Any]] = {}
        options: dict[str, Any] = {}
        unknown: list[str] = []
        for key, raw in flat.items():
            if not isinstance(key, str) or not (key == _PREFIX or key.startswith(_PREFIX + " ")):
                continue
            value = _unquote(raw)
            if key == _PREFIX:
                enabled = _parse_bool(key, value)
                continue
            other_keys = True
            if key == _VERSION_KEY:
                version = _parse_version(key, value, strict)
                continue
            m = _BINDING_KEY.match(key)
            if m:
                binding_fields.setdefault(int(m.group(1)), {})[m.group(2)] = (key, value)
                continue
            m = _STYLE_KEY.match(key)
            if m:
                style_fields.setdefault(int(m.group(1)), {})[m.group(2)] = (key, value)
                continue
            name = _FLAT_KEY_TO_FIELD.get(key)
            if name is None:
                unknown.append(key)
                continue
            options[name] = _parse_option(key, _FLAT_OPTIONS[name][1], value)
        if unknown and strict:
            raise SettingsError(f"Unknown CLoRA infotext key{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}.")
        if version is None:
            version = 1 if (other_keys or enabled is True) else FLAT_VERSION
        if version == 1:
            options = {**LEGACY_OPTIONS, **options}
        bindings = tuple(_binding_from_flat(i, binding_fields[i]) for i in _numbers_in_order(binding_fields, "CLoRA"))
        styles = tuple(_style_from_flat(i, style_fields[i]) for i in _numbers_in_order(style_fields, "CLoRA style"))
        return cls(enabled=enabled, bindings=bindings, styles=styles, **options).validate()

    # ----- named-field form (API) ---------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The API's named-field form (every field present; JSON-serialisable)."""
        return {
            "enabled": self.enabled,
            "bindings": [
                {"lora": b.lora, "subjects": list(b.subjects), "triggers": b.triggers, "weight": b.weight,
                 "te_weight": b.te_weight}
                for b in self.bindings
            ],
            "styles": [
                {"lora": s.lora, "weight": s.weight, "mode": s.mode, "subjects": list(s.subjects)} for s in self.styles
            ],
            "step_size": self.step_size,
            "opt_end": self.opt_end,
            "refine_at": list(self.refine_at),
            "refine_iters": self.refine_iters,
            "temperature": self.temperature,
            "mask_threshold": self.mask_threshold,
            "mask_morphology": self.mask_morphology,
            "mask_start": self.mask_start,
            "lora_on_uncond": self.lora_on_uncond,
            "show_previews": self.show_previews,
            "maps_from": self.maps_from,
            "predict_after_update": self.predict_after_update,
            "negative_te_lora": self.negative_te_lora,
            "grad_memory": self.grad_memory,
            "map_layers": self.map_layers,
        }

    @classmethod
    def from_json(cls, data: Union[Mapping[str, Any], str]) -> "CloraSettings":
        """Settings from the named-field form (a dict or its JSON text).  Missing fields take their defaults (also
        those of `LEGACY_OPTIONS`: a caller wanting the old behaviour sets them); unknown keys are errors naming the
        key.  Validated."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise SettingsError(f"Settings are not valid JSON: {exc.msg} (line {exc.lineno}).") from None
        if not isinstance(data, Mapping):
            raise SettingsError(f"Settings must be a JSON object, got {type(data).__name__}.")
        _reject_unknown(data, _JSON_FIELDS, "Settings")
        kwargs: dict[str, Any] = {}
        for name, kind in _JSON_FIELDS.items():
            if name not in data or name in ("bindings", "styles"):
                continue
            kwargs[name] = _parse_option(f"Setting {name}", kind, data[name])
        kwargs["bindings"] = tuple(
            _binding_from_json(i, item)
            for i, item in enumerate(_as_list(data.get("bindings", []), "Setting bindings"), 1)
        )
        kwargs["styles"] = tuple(
            _style_from_json(i, item) for i, item in enumerate(_as_list(data.get("styles", []), "Setting styles"), 1)
        )
        return cls(**kwargs).validate()

    @staticmethod
    def json_schema() -> dict[str, Any]:
        """JSON schema of the named-field form (see the module-level `json_schema`)."""
        return json_schema()


def _fraction_to_step(fraction: float, n_steps: int) -> int:
    """``floor(fraction · n_steps)`` clamped to ``0..n_steps``, tolerant of float error (0.29·100 -> 29)."""
    if n_steps < 0:
        raise ValueError(f"the number of steps must be >= 0, got {n_steps}")
    return max(0, min(n_steps, math.floor(fraction * n_steps + 1e-6)))


# ----- flat-form tables and parsers ----------------------------------------------------------------------

#: field -> (infotext key, kind); only the scalar options (bindings and styles have numbered keys).
_FLAT_OPTIONS: dict[str, tuple[str, str]] = {
    "step_size": ("CLoRA step size", "float"),
    "opt_end": ("CLoRA opt end", "float"),
    "refine_at": ("CLoRA refine at", "floats"),
    "refine_iters": ("CLoRA refine iters", "int"),
    "temperature": ("CLoRA temperature", "float"),
    "mask_threshold": ("CLoRA mask threshold", "float"),
    "mask_morphology": ("CLoRA mask morphology", "str"),
    "mask_start": ("CLoRA mask start", "float"),
    "lora_on_uncond": ("CLoRA LoRA on uncond", "bool"),
    "show_previews": ("CLoRA previews", "bool"),
    "maps_from": ("CLoRA maps from", "str"),
    "predict_after_update": ("CLoRA predict after update", "bool"),
    "negative_te_lora": ("CLoRA negative TE LoRA", "bool"),
    "grad_memory": ("CLoRA grad memory", "str"),
    "map_layers": ("CLoRA attention layers", "str"),
}
_VERSION_KEY = "CLoRA version"
_FLAT_KEY_TO_FIELD = {key: name for name, (key, _) in _FLAT_OPTIONS.items()}
_BINDING_KEY = re.compile(r"^CLoRA (\d+) (LoRA|subject|trigger|weight|TE weight)$")
_STYLE_KEY = re.compile(r"^CLoRA style (\d+) (LoRA|weight|mode|subjects)$")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _unquote(value: Any) -> Any:
    """Strip one level of JSON quoting (infotext quotes values holding commas or colons) and whitespace."""
    if isinstance(value, str):
        text = value.strip()
        if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
            try:
                decoded = json.loads(text)
            except json.JSONDecodeError:
                return text
            return decoded.strip() if isinstance(decoded, str) else decoded
        return text
    return value


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise SettingsError(f"{name}: {value!r} is not true or false.")


def _parse_float(name: str, value: Any) -> float:
    if _is_number(value):
        return float(value)
    if isinstance(value, str):
        try:
            x = float(value)
        except ValueError:
            pass
        else:
            if math.isfinite(x):
                return x
    raise SettingsError(f"{name}: {value!r} is not a number.")


def _parse_int(name: str, value: Any) -> int:
    x = _parse_float(name, value)
    if x != int(x):
        raise SettingsError(f"{name}: {value!r} is not a whole number.")
    return int(x)


def _parse_version(name: str, value: Any, strict: bool) -> int:
    """The flat form's version: a whole number >= 1, capped at `FLAT_VERSION` (a newer infotext reads as the current
    version).  Anything else is an error, or, unless ``strict``, the current version."""
    try:
        version = _parse_int(name, value)
        if version < 1:
            raise SettingsError(f"{name}: {value!r} is not a version number (1, 2, ...).")
    except SettingsError:
        if strict:
            raise
        return FLAT_VERSION
    return min(version, FLAT_VERSION)


def _parse_floats(name: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "none"):
            return ()
        return tuple(_parse_float(name, part.strip()) for part in text.split(","))
    if isinstance(value, (list, tuple)):
        return tuple(_parse_float(name, x) for x in value)
    return (_parse_float(name, value),)


def _parse_str(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    raise SettingsError(f"{name}: {value!r} is not text.")


def _parse_option(name: str, kind: str, value: Any) -> Any:
    if kind == "bool":
        return _parse_bool(name, value)
    if kind == "float":
        return _parse_float(name, value)
    if kind == "int":
        return _parse_int(name, value)
    if kind == "floats":
        return _parse_floats(name, value)
    return _parse_str(name, value)


def _numbers_in_order(groups: Mapping[int, Any], what: str) -> list[int]:
    """1..n, checking that the numbered keys have no gaps."""
    numbers = sorted(groups)
    expected = list(range(1, len(numbers) + 1))
    if numbers != expected:
        missing = sorted(set(range(1, (max(numbers) if numbers else 0) + 1)) - set(numbers))
        detail = f"{what} {missing[0]} is missing" if missing else f"{what} 0 is not a valid number"
        raise SettingsError(f"The {what} keys must be numbered 1, 2, 3... without gaps: {detail}.")
    return numbers


def _binding_from_flat(number: int, parts: Mapping[str, tuple[str, Any]]) -> Binding:
    if "LoRA" not in parts:
        raise SettingsError(f"Binding {number}: the key 'CLoRA {number} LoRA' is missing.")
    key, lora = parts["LoRA"]
    kwargs: dict[str, Any] = {"lora": _parse_str(key, lora)}
    if "subject" in parts:
        key, value = parts["subject"]
        kwargs["subjects"] = _parse_str(key, value)
    else:
        kwargs["subjects"] = ()
    if "trigger" in parts:
        key, value = parts["trigger"]
        kwargs["triggers"] = _parse_str(key, value)
    if "weight" in parts:
        key, value = parts["weight"]
        kwargs["weight"] = _parse_float(key, value)
    if "TE weight" in parts:
        key, value = parts["TE weight"]
        kwargs["te_weight"] = _parse_float(key, value)
    return Binding(**kwargs)


def _style_from_flat(number: int, parts: Mapping[str, tuple[str, Any]]) -> StyleLora:
    if "LoRA" not in parts:
        raise SettingsError(f"Style LoRA {number}: the key 'CLoRA style {number} LoRA' is missing.")
    key, lora = parts["LoRA"]
    kwargs: dict[str, Any] = {"lora": _parse_str(key, lora)}
    if "weight" in parts:
        key, value = parts["weight"]
        kwargs["weight"] = _parse_float(key, value)
    if "mode" in parts:
        key, value = parts["mode"]
        kwargs["mode"] = _parse_str(key, value)
    if "subjects" in parts:
        key, value = parts["subjects"]
        kwargs["subjects"] = _parse_str(key, value)
    return StyleLora(**kwargs)


# ----- named-field form tables and parsers -------------------------------------------------------------

_JSON_FIELDS: dict[str, str] = {
    "enabled": "bool",
    "bindings": "list",
    "styles": "list",
    **{name: kind for name, (_, kind) in _FLAT_OPTIONS.items()},
}
_BINDING_FIELDS = ("lora", "subjects", "triggers", "weight", "te_weight")
_STYLE_FIELDS = ("lora", "weight", "mode", "subjects")


def _reject_unknown(data: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    unknown = [str(k) for k in data if k not in set(known)]
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise SettingsError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {names}.")


def _as_list(value: Any, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    raise SettingsError(f"{name} must be a list, got {type(value).__name__}.")


def _subjects_from_json(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return _as_subjects(value)
    if isinstance(value, (list, tuple)):
        return tuple(_parse_str(name, s) for s in value)
    raise SettingsError(f"{name} must be a list of words, got {value!r}.")


def _binding_from_json(number: int, item: Any) -> Binding:
    who = f"Binding {number}"
    if not isinstance(item, Mapping):
        raise SettingsError(f"{who} must be an object with the keys {', '.join(_BINDING_FIELDS)}.")
    _reject_unknown(item, _BINDING_FIELDS, who)
    if "lora" not in item:
        raise SettingsError(f"{who}: the key 'lora' is missing.")
    te = item.get("te_weight")
    return Binding(
        lora=_parse_str(f"{who}: lora", item["lora"]),
        subjects=_subjects_from_json(f"{who}: subjects", item.get("subjects", ())),
        triggers=_parse_str(f"{who}: triggers", item.get("triggers", "")),
        weight=_parse_float(f"{who}: weight", item.get("weight", 1.0)),
        te_weight=None if te is None else _parse_float(f"{who}: te_weight", te),
    )


def _style_from_json(number: int, item: Any) -> StyleLora:
    who = f"Style LoRA {number}"
    if not isinstance(item, Mapping):
        raise SettingsError(f"{who} must be an object with the keys {', '.join(_STYLE_FIELDS)}.")
    _reject_unknown(item, _STYLE_FIELDS, who)
    if "lora" not in item:
        raise SettingsError(f"{who}: the key 'lora' is missing.")
    return StyleLora(
        lora=_parse_str(f"{who}: lora", item["lora"]),
        weight=_parse_float(f"{who}: weight", item.get("weight", 0.8)),
        mode=_parse_str(f"{who}: mode", item.get("mode", "whole")),
        subjects=_subjects_from_json(f"{who}: subjects", item.get("subjects", ())),
    )


def json_schema() -> dict[str, Any]:
    """JSON schema (draft 2020-12) of the named-field form `CloraSettings.to_json` writes and ``from_json`` reads.

    ``from_json`` is a little more lenient than the schema (numbers given as strings, subjects as one
    ``|``-separated string); cross-field rules (distinct subjects, style subjects naming a binding, at least one
    binding when enabled) are checked by ``validate`` only.
    """
    lo, hi = WEIGHT_RANGE
    weight = {"type": "number", "minimum": lo, "maximum": hi}
    fraction = {"type": "number", "minimum": 0, "maximum": 1}
    words = {"type": "array", "items": {"type": "string", "minLength": 1}}
    binding = {
        "type": "object",
        "additionalProperties": False,
        "required": ["lora", "subjects"],
        "properties": {
            "lora": {"type": "string", "minLength": 1, "description": "LoRA name (file stem)"},
            "subjects": {**words, "minItems": 1, "description": "words/phrases of the prompt naming the concept"},
            "triggers": {"type": "string", "description": "words inserted before the subject in this LoRA's variant"},
            "weight": {**weight, "default": 1.0},
            "te_weight": {"anyOf": [weight, {"type": "null"}], "default": None,
                          "description": "text-encoder weight; null: same as weight"},
        },
    }
    style = {
        "type": "object",
        "additionalProperties": False,
        "required": ["lora"],
        "properties": {
            "lora": {"type": "string", "minLength": 1},
            "weight": {**weight, "default": 0.8},
            "mode": {"enum": list(STYLE_MODES), "default": "whole"},
            "subjects": {**words, "description": "mode 'subjects': the binding subjects whose variants get it"},
        },
    }
    d = CloraSettings()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "CLoRA settings",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "enabled": {"type": "boolean", "default": d.enabled},
            "bindings": {"type": "array", "items": binding, "maxItems": MAX_BINDINGS},
            "styles": {"type": "array", "items": style, "maxItems": MAX_STYLES},
            "step_size": {"type": "number", "minimum": 0, "maximum": STEP_SIZE_MAX, "default": d.step_size},
            "opt_end": {**fraction, "default": d.opt_end},
            "refine_at": {"type": "array", "items": fraction, "maxItems": MAX_REFINE_POINTS,
                          "default": list(d.refine_at)},
            "refine_iters": {"type": "integer", "minimum": 0, "maximum": REFINE_ITERS_MAX, "default": d.refine_iters},
            "temperature": {"type": "number", "exclusiveMinimum": 0, "maximum": TEMPERATURE_MAX,
                            "default": d.temperature},
            "mask_threshold": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1,
                               "default": d.mask_threshold},
            "mask_morphology": {"enum": list(MORPHOLOGIES), "default": d.mask_morphology},
            "mask_start": {**fraction, "default": d.mask_start},
            "lora_on_uncond": {"type": "boolean", "default": d.lora_on_uncond},
            "show_previews": {"type": "boolean", "default": d.show_previews},
            "maps_from": {"enum": list(MAPS_FROM), "default": d.maps_from,
                          "description": "attention maps (loss and masks) from the mean of the negative-prompt and "
                                         "prompt rows ('both') or the prompt rows only ('cond', the old behaviour)"},
            "predict_after_update": {"type": "boolean", "default": d.predict_after_update,
                                     "description": "true: one more forward pass on the updated latent (the old "
                                                    "behaviour); false: the prediction of the pass before the update"},
            "negative_te_lora": {"type": "boolean", "default": d.negative_te_lora,
                                 "description": "true: the negative prompt encoded per variant with its text-encoder "
                                                "LoRAs; false: encoded once without LoRA (the old behaviour)"},
            "grad_memory": {"enum": list(GRAD_MEMORY), "default": d.grad_memory,
                            "description": "how gradient passes keep activations (same result up to float "
                                           "rounding): 'batched' all rows at once, 'per_variant' one variant's rows "
                                           "at a time, 'checkpoint' blocks recomputed in the backward pass, "
                                           "'per_variant_checkpoint' both, 'auto' batched for SD1/SD2 and "
                                           f"{GRAD_MEMORY_AUTO_LARGE} for SDXL"},
            "map_layers": {"enum": list(MAP_LAYERS), "default": d.map_layers,
                           "description": "cross-attention layers at H/32 averaged into the maps: 'all' (the "
                                          "authors'), or those of the UNet's 'down' path, 'mid' block or 'up' path; "
                                          "'down'/'mid' stop gradient passes earlier (cheaper)"},
        },
    }

