"""The CLoRA accordion of the WebUI (A1111 / Forge) and the one conversion between its arguments and `CloraSettings`.

Two halves:

* gradio-free (importable anywhere, used by the script, the API and the tests): `ARG_NAMES`, `args_to_settings`,
  `settings_to_args`, `is_enabled`, `apply_overrides`, `paste_value`;
* `build_ui`, which imports gradio (and, when present, the WebUI's ``modules.ui_components``) inside the function.

The positional arguments
------------------------
The script's arguments are the components returned by `build_ui`, in exactly the order of `ARG_NAMES` (this order is
the API's ``alwayson_scripts["clora"]["args"]`` order; keep it stable and only append)::

    enabled,
    b1_lora, b1_subjects, b1_triggers, b1_weight, b1_te_weight,   ... up to b8_...   (MAX_BINDINGS rows)
    s1_lora, s1_weight, s1_mode, s1_subjects,                      ... up to s4_...   (MAX_STYLES rows)
    step_size, opt_end, refine_at, refine_iters, temperature, mask_threshold, mask_morphology, mask_start,
    lora_on_uncond, show_previews,
    maps_from, predict_after_update, negative_te_lora                              (appended in version 2)
    grad_memory                                                                    (appended later in version 2)
    map_layers                                                                     (appended after grad_memory)

* a LoRA value of ``""``, ``"None"`` or ``None`` means "no LoRA";
* a binding or style row whose text fields are all empty is skipped (rows may be left blank anywhere);
* subjects: several words/phrases separated by ``|`` (``"cat | kitten"``);
* ``te_weight``: a number, or empty for "same as the weight";
* style mode: ``"whole"`` / ``"subjects"`` (the labels ``"whole image"`` / ``"these subjects"`` are accepted too);
* ``refine_at``: comma-separated fractions of the steps (empty or ``none``: no refinement);
* ``maps_from``: ``"both"`` / ``"cond"`` (the labels of `MAPS_FROM_LABELS` are accepted too);
* ``grad_memory``: one of `clora.settings.GRAD_MEMORY`; lists without it (`PRE_GRAD_MEMORY_ARG_COUNT` values) take
  its default, which computes what those versions computed.
* ``map_layers``: one of `clora.settings.MAP_LAYERS`; lists without it (`PRE_MAP_LAYERS_ARG_COUNT` values, or
  `PRE_GRAD_MEMORY_ARG_COUNT`) take its default ``all``, which is what those versions computed.

Lists from before version 2 (`LEGACY_ARG_COUNT` values, without the last three) keep their meaning: the three
options take their old values (`clora.settings.LEGACY_OPTIONS`), not the defaults.  Such a list arrives in two
ways: as it is (`LEGACY_ARG_COUNT` values), or through the WebUI's API, which fills the positions a request leaves
out with the ``value`` of the components of a fresh `build_ui` call.  The ``maps_from`` component's ``value`` is
therefore `API_FILLER_MAPS_FROM`, the default ``"both"`` as a str subclass that only this filling can pass on (the
UI sends plain text; so does JSON): seeing it, `args_to_settings` knows the request stopped before ``maps_from``.

Instead of the positional list, the API may pass the named JSON form (`CloraSettings.to_json`) as the *first*
argument: ``"args": [{"enabled": true, "bindings": [...]}]``; the remaining positions (filled by the WebUI with the
UI defaults) are then ignored.  Unknown keys are errors.

Which rows are visible in the UI is UI state only (hidden counters, not arguments); hiding a row clears it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

from .errors import user_message
from .settings import (
    GRAD_MEMORY,
    LEGACY_OPTIONS,
    MAP_LAYERS,
    MAX_BINDINGS,
    MAX_REFINE_POINTS,
    MAX_STYLES,
    MORPHOLOGIES,
    REFINE_ITERS_MAX,
    STEP_SIZE_MAX,
    SUBJECT_SEPARATOR,
    TEMPERATURE_MAX,
    WEIGHT_RANGE,
    Binding,
    CloraSettings,
    SettingsError,
    StyleLora,
)

__all__ = [
    "ARG_NAMES",
    "BINDING_FIELDS",
    "STYLE_FIELDS",
    "OPTION_FIELDS",
    "NO_LORA",
    "STYLE_MODE_LABELS",
    "MAPS_FROM_LABELS",
    "LEGACY_ARG_COUNT",
    "PRE_GRAD_MEMORY_ARG_COUNT",
    "PRE_MAP_LAYERS_ARG_COUNT",
    "API_FILLER_MAPS_FROM",
    "args_to_settings",
    "settings_to_args",
    "is_enabled",
    "nothing_chosen",
    "apply_overrides",
    "paste_value",
    "paste_function",
    "suggested_triggers",
    "build_ui",
]

#: Per-binding argument fields, in order (argument names are ``b{n}_{field}``).
BINDING_FIELDS = ("lora", "subjects", "triggers", "weight", "te_weight")
#: Per-style argument fields, in order (``s{n}_{field}``).
STYLE_FIELDS = ("lora", "weight", "mode", "subjects")
#: The global options, in order; the names are `CloraSettings` field names.
OPTION_FIELDS = (
    "step_size", "opt_end", "refine_at", "refine_iters", "temperature", "mask_threshold", "mask_morphology",
    "mask_start", "lora_on_uncond", "show_previews", "maps_from", "predict_after_update", "negative_te_lora",
    "grad_memory", "map_layers",
)
#: How many positional arguments there were before version 2 added the last three options (`LEGACY_OPTIONS`).
LEGACY_ARG_COUNT = 67
#: How many positional arguments there were before ``grad_memory`` was appended (version 2 lists without it).
PRE_GRAD_MEMORY_ARG_COUNT = 70
#: How many positional arguments there were before ``map_layers`` was appended.
PRE_MAP_LAYERS_ARG_COUNT = 71

#: The stable order of the script's positional arguments (see the module docstring).
ARG_NAMES: tuple[str, ...] = (
    ("enabled",)
    + tuple(f"b{n}_{f}" for n in range(1, MAX_BINDINGS + 1) for f in BINDING_FIELDS)
    + tuple(f"s{n}_{f}" for n in range(1, MAX_STYLES + 1) for f in STYLE_FIELDS)
    + OPTION_FIELDS
)
_ARG_INDEX = {name: i for i, name in enumerate(ARG_NAMES)}

#: What the LoRA dropdowns show for "no LoRA".
NO_LORA = "None"
#: Style mode value -> label shown in the radio.
STYLE_MODE_LABELS = {"whole": "whole image", "subjects": "these subjects"}
_STYLE_LABEL_TO_MODE = {label: mode for mode, label in STYLE_MODE_LABELS.items()}
#: ``maps_from`` value -> label shown in the radio.
MAPS_FROM_LABELS = {"both": "prompt + negative rows", "cond": "prompt rows only"}
_MAPS_FROM_LABEL_TO_VALUE = {label: value for value, label in MAPS_FROM_LABELS.items()}


class _ApiFiller(str):
    """The text of a component ``value`` that marks where the WebUI's API filled in a position a request left out."""

    __slots__ = ()


#: The ``value`` of the ``maps_from`` radio (see the module docstring): ``"both"``, but recognisably the API's filler.
API_FILLER_MAPS_FROM = _ApiFiller(CloraSettings().maps_from)

#: UI-only components (not arguments) that infotext paste also restores: how many rows are shown.
_COUNT_NAMES = ("bindings_shown", "styles_shown")


# ----- argument parsing helpers ---------------------------------------------------------------------------


def _text(value: Any, what: str) -> str:
    """A text field: ``None`` is empty; numbers are written out; anything else is an error naming the field."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise SettingsError(f"{what} must be text, got {value!r}.")


def _lora_name(value: Any, what: str) -> str:
    text = _text(value, what)
    return "" if text == NO_LORA else text


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise SettingsError(f"{what} must be a number, got {value!r}.")
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            raise SettingsError(f"{what} must be a number, got {value!r}.") from None
    else:
        raise SettingsError(f"{what} must be a number, got {value!r}.")
    if not math.isfinite(x):
        raise SettingsError(f"{what} must be a finite number, got {value!r}.")
    return x


def _whole(value: Any, what: str) -> int:
    x = _number(value, what)
    if x != int(x):
        raise SettingsError(f"{what} must be a whole number, got {value!r}.")
    return int(x)


def _flag(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise SettingsError(f"{what} must be true or false, got {value!r}.")


def _subjects(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        parts = [_text(v, what) for v in value]
    else:
        parts = _text(value, what).split(SUBJECT_SEPARATOR)
    return tuple(p for p in (" ".join(s.split()) for s in parts) if p)


def _optional_number(value: Any, what: str) -> Optional[float]:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    return _number(value, what)


def _fractions(value: Any, what: str) -> tuple[float, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(_number(v, what) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (_number(value, what),)
    text = _text(value, what)
    if text.lower() in ("", "none"):
        return ()
    parts = [t.strip() for t in text.split(",")]
    if len(parts) > MAX_REFINE_POINTS:
        raise SettingsError(f"{what} holds {len(parts)} points; at most {MAX_REFINE_POINTS} are supported.")
    return tuple(_number(t, f"{what}: point {t!r}") for t in parts)


def _style_mode(value: Any, what: str) -> str:
    text = _text(value, what)
    return _STYLE_LABEL_TO_MODE.get(text, text)


def _maps_from(value: Any, what: str) -> str:
    text = _text(value, what)
    return _MAPS_FROM_LABEL_TO_VALUE.get(text, text)


def _fmt_number(x: float) -> str:
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


# ----- args -> settings -------------------------------------------------------------------------------------


def _binding_from_args(n: int, row: Mapping[str, Any]) -> Optional[Binding]:
    """Binding row ``n`` (1-based), or ``None`` when all its text fields are empty."""
    who = f"Binding {n}"
    lora = _lora_name(row["lora"], f"{who}: LoRA")
    subjects = _subjects(row["subjects"], f"{who}: subject words")
    triggers = _text(row["triggers"], f"{who}: trigger words")
    te = row["te_weight"]
    if not lora and not subjects and not triggers and (te is None or str(te).strip() == ""):
        return None
    label = f"{who} (LoRA '{lora}')" if lora else who
    return Binding(
        lora=lora,
        subjects=subjects,
        triggers=triggers,
        weight=_number(row["weight"], f"{label}: weight"),
        te_weight=_optional_number(te, f"{label}: TE weight"),
    )


def _style_from_args(n: int, row: Mapping[str, Any]) -> Optional[StyleLora]:
    """Style row ``n`` (1-based), or ``None`` when it names no LoRA and no subject."""
    who = f"Style LoRA {n}"
    lora = _lora_name(row["lora"], f"{who}: LoRA")
    subjects = _subjects(row["subjects"], f"{who}: subjects")
    if not lora and not subjects:
        return None
    label = f"{who} ('{lora}')" if lora else who
    return StyleLora(
        lora=lora,
        weight=_number(row["weight"], f"{label}: weight"),
        mode=_style_mode(row["mode"], f"{label}: mode"),
        subjects=subjects,
    )


def _settings_from_positional(args: Sequence[Any]) -> CloraSettings:
    if len(args) not in (len(ARG_NAMES), PRE_MAP_LAYERS_ARG_COUNT, PRE_GRAD_MEMORY_ARG_COUNT, LEGACY_ARG_COUNT):
        raise SettingsError(
            f"The script takes {len(ARG_NAMES)} positional arguments (see ARG_NAMES; the {PRE_MAP_LAYERS_ARG_COUNT}, "
            f"{PRE_GRAD_MEMORY_ARG_COUNT} and {LEGACY_ARG_COUNT} of older versions are read too) or one JSON object, "
            f"got {len(args)} arguments."
        )
    d = CloraSettings()
    a = {"grad_memory": d.grad_memory, "map_layers": d.map_layers, **dict(zip(ARG_NAMES, args))}
    if len(args) == LEGACY_ARG_COUNT or isinstance(a["maps_from"], _ApiFiller):
        a.update(LEGACY_OPTIONS)  # a list from before these options: their old behaviour (module docstring)
    bindings = []
    for n in range(1, MAX_BINDINGS + 1):
        b = _binding_from_args(n, {f: a[f"b{n}_{f}"] for f in BINDING_FIELDS})
        if b is not None:
            bindings.append(b)
    styles = []
    for n in range(1, MAX_STYLES + 1):
        s = _style_from_args(n, {f: a[f"s{n}_{f}"] for f in STYLE_FIELDS})
        if s is not None:
            styles.append(s)
    return CloraSettings(
        enabled=_flag(a["enabled"], "Setting enabled"),
        bindings=tuple(bindings),
        styles=tuple(styles),
        step_size=_number(a["step_size"], "Setting step_size"),
        opt_end=_number(a["opt_end"], "Setting opt_end"),
        refine_at=_fractions(a["refine_at"], "Setting refine_at"),
        refine_iters=_whole(a["refine_iters"], "Setting refine_iters"),
        temperature=_number(a["temperature"], "Setting temperature"),
        mask_threshold=_number(a["mask_threshold"], "Setting mask_threshold"),
        mask_morphology=_text(a["mask_morphology"], "Setting mask_morphology"),
        mask_start=_number(a["mask_start"], "Setting mask_start"),
        lora_on_uncond=_flag(a["lora_on_uncond"], "Setting lora_on_uncond"),
        show_previews=_flag(a["show_previews"], "Setting show_previews"),
        maps_from=_maps_from(a["maps_from"], "Setting maps_from"),
        predict_after_update=_flag(a["predict_after_update"], "Setting predict_after_update"),
        negative_te_lora=_flag(a["negative_te_lora"], "Setting negative_te_lora"),
        grad_memory=_text(a["grad_memory"], "Setting grad_memory"),
        map_layers=_text(a["map_layers"], "Setting map_layers"),
    )


def _is_named_form(args: Sequence[Any]) -> bool:
    return len(args) >= 1 and isinstance(args[0], Mapping)


def args_to_settings(args: Sequence[Any], overrides: Optional[Mapping[str, Any]] = None) -> CloraSettings:
    """The script's arguments -> validated `CloraSettings` (raises `SettingsError` with every problem).

    args: the positional values in `ARG_NAMES` order, or a sequence whose first item is the named JSON form
    (`CloraSettings.from_json`; the remaining items are ignored).
    overrides: values by argument name applied on top (see `apply_overrides`; the X/Y/Z plot axes use it).
    """
    args = list(args)
    if _is_named_form(args):
        settings = CloraSettings.from_json(args[0])
    else:
        settings = _settings_from_positional(args)
    if overrides:
        settings = apply_overrides(settings, overrides)
    return settings.validate()


def apply_overrides(settings: CloraSettings, overrides: Mapping[str, Any]) -> CloraSettings:
    """``settings`` with values replaced by argument name: ``enabled``, any name of `OPTION_FIELDS`, and
    ``b{n}_{field}`` / ``s{n}_{field}`` for an existing binding / style.  Not validated (the caller does)."""
    top: dict[str, Any] = {}
    bindings = list(settings.bindings)
    styles = list(settings.styles)
    for name, value in overrides.items():
        where = f"Override '{name}'"
        if name == "enabled":
            top[name] = _flag(value, where)
        elif name in OPTION_FIELDS:
            top[name] = _parse_option(name, value, where)
        elif name in _ARG_INDEX and name[0] in "bs":
            n_text, field = name[1:].split("_", 1)
            n = int(n_text)
            rows = bindings if name[0] == "b" else styles
            if n > len(rows):
                kind = "binding" if name[0] == "b" else "style LoRA"
                raise SettingsError(f"{where}: there is no {kind} {n} (only {len(rows)} set).")
            rows[n - 1] = _override_row(rows[n - 1], field, value, where)
        else:
            raise SettingsError(f"{where}: unknown setting name.")
    return dataclasses.replace(settings, bindings=tuple(bindings), styles=tuple(styles), **top)


def _parse_option(name: str, value: Any, what: str) -> Any:
    if name in ("lora_on_uncond", "show_previews", "predict_after_update", "negative_te_lora"):
        return _flag(value, what)
    if name == "maps_from":
        return _maps_from(value, what)
    if name == "refine_at":
        return _fractions(value, what)
    if name == "refine_iters":
        return _whole(value, what)
    if name in ("mask_morphology", "grad_memory", "map_layers"):
        return _text(value, what)
    return _number(value, what)


def _override_row(row: Any, field: str, value: Any, what: str) -> Any:
    if field == "lora":
        return dataclasses.replace(row, lora=_lora_name(value, what))
    if field == "subjects":
        return dataclasses.replace(row, subjects=_subjects(value, what))
    if field == "triggers":
        return dataclasses.replace(row, triggers=_text(value, what))
    if field == "te_weight":
        return dataclasses.replace(row, te_weight=_optional_number(value, what))
    if field == "mode":
        return dataclasses.replace(row, mode=_style_mode(value, what))
    return dataclasses.replace(row, weight=_number(value, what))


def is_enabled(args: Sequence[Any], overrides: Optional[Mapping[str, Any]] = None) -> bool:
    """Whether CLoRA is switched on, without parsing the rest.  An unreadable flag counts as on, so that
    `args_to_settings` reports it to the user instead of CLoRA being silently skipped."""
    if overrides and "enabled" in overrides:
        value = overrides["enabled"]
    elif _is_named_form(args):
        value = args[0].get("enabled", False)
    elif args:
        value = args[0]
    else:
        return False
    try:
        return _flag(value, "enabled")
    except SettingsError:
        return True


def nothing_chosen(args: Sequence[Any], overrides: Optional[Mapping[str, Any]] = None) -> bool:
    """Whether the arguments name no LoRA at all: every binding and style row blank (the named form: no
    ``bindings`` and no ``styles``).  Rows that are only half filled count as chosen (their problem is reported)."""
    args = list(args)
    if _is_named_form(args):
        form = args[0]
        return not form.get("bindings") and not form.get("styles")
    try:
        settings = _settings_from_positional(args)
        if overrides:
            settings = apply_overrides(settings, overrides)
    except SettingsError:
        return False
    return not settings.bindings and not settings.styles


# ----- settings -> args --------------------------------------------------------------------------------------


def settings_to_args(settings: CloraSettings) -> list[Any]:
    """The positional arguments (in `ARG_NAMES` order) that `args_to_settings` turns back into ``settings``;
    unused rows are blank.  Used by infotext paste and for the API's positional form."""
    a: dict[str, Any] = {"enabled": settings.enabled}
    for n in range(1, MAX_BINDINGS + 1):
        b = settings.bindings[n - 1] if n <= len(settings.bindings) else None
        a[f"b{n}_lora"] = b.lora if b else NO_LORA
        a[f"b{n}_subjects"] = f" {SUBJECT_SEPARATOR} ".join(b.subjects) if b else ""
        a[f"b{n}_triggers"] = b.triggers if b else ""
        a[f"b{n}_weight"] = b.weight if b else 1.0
        a[f"b{n}_te_weight"] = _fmt_number(b.te_weight) if b and b.te_weight is not None else ""
    for n in range(1, MAX_STYLES + 1):
        s = settings.styles[n - 1] if n <= len(settings.styles) else None
        a[f"s{n}_lora"] = s.lora if s else NO_LORA
        a[f"s{n}_weight"] = s.weight if s else 0.8
        a[f"s{n}_mode"] = s.mode if s else "whole"
        a[f"s{n}_subjects"] = f" {SUBJECT_SEPARATOR} ".join(s.subjects) if s else ""
    for name in OPTION_FIELDS:
        value = getattr(settings, name)
        a[name] = ", ".join(_fmt_number(x) for x in value) if name == "refine_at" else value
    return [a[name] for name in ARG_NAMES]


# ----- infotext paste ------------------------------------------------------------------------------------------


def paste_value(name: str, params: Mapping[str, Any]) -> Any:
    """The value of argument ``name`` (or of a row counter ``bindings_shown`` / ``styles_shown``) restored from a
    parsed infotext ``params``; ``None`` means "leave the field as it is".

    Without any ``CLoRA`` key the image was made without CLoRA: ``enabled`` becomes False, the rest is left alone.
    An infotext whose CLoRA keys do not parse leaves every field alone.
    """
    if "CLoRA" not in params:
        return False if name == "enabled" else None
    try:
        settings = CloraSettings.from_flat(params, strict=False)
    except (SettingsError, ValueError, TypeError):
        return None
    if name == "bindings_shown":
        return max(1, len(settings.bindings))
    if name == "styles_shown":
        return len(settings.styles)
    return settings_to_args(settings)[_ARG_INDEX[name]]


def _make_paste_function(name: str) -> Callable[[Mapping[str, Any]], Any]:
    def paste(params: Mapping[str, Any]) -> Any:
        return paste_value(name, params)

    paste.__name__ = paste.__qualname__ = f"clora_paste_{name}"
    return paste


#: One function per field, shared by both tabs: the WebUI matches ``paste_field_names`` by equality, so the same
#: objects in txt2img and img2img let "Send to img2img" carry the CLoRA fields across.  (A constant table.)
_PASTE_FUNCTIONS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    name: _make_paste_function(name) for name in ARG_NAMES + _COUNT_NAMES
}


def paste_function(name: str) -> Callable[[Mapping[str, Any]], Any]:
    """The infotext paste function of argument (or row counter) ``name``."""
    return _PASTE_FUNCTIONS[name]


# ----- the gradio UI ---------------------------------------------------------------------------------------------

_TIPS = {
    "lora": "The LoRA bound to these subject words; it acts only where they are in the image.",
    "subjects": f"Word(s) of the prompt naming this LoRA's subject, e.g. cat. Several: cat {SUBJECT_SEPARATOR} kitten.",
    "triggers": "Inserted before the subject in this LoRA's own prompt variant (filled from the LoRA's metadata).",
    "weight": "Strength of the LoRA on the UNet.",
    "te_weight": "Strength on the text encoder; empty means the same as the weight.",
    "style_mode": "Whole image: on every region. These subjects: only in the regions of the subjects named.",
    "style_subjects": f"Subjects of bindings (mode 'these subjects'), separated by {SUBJECT_SEPARATOR}.",
    "step_size": "Step size of the contrastive latent update (0 turns the update off).",
    "opt_end": "Fraction of the sampling steps during which the latent is updated.",
    "refine_at": "Fractions of the steps at which extra refinement iterations run, comma separated (empty: none).",
    "refine_iters": "Extra update iterations at each refinement point.",
    "temperature": "Temperature of the contrastive (NT-Xent) loss.",
    "mask_threshold": "λ: a LoRA's region is where its subject's attention exceeds λ times its maximum.",
    "mask_morphology": "Clean-up of the masks before fusion.",
    "mask_start": "Fraction of the steps before the masked fusion starts (before it: every LoRA everywhere).",
    "lora_on_uncond": "Also run each LoRA's UNet part on its variant's negative-prompt rows (the paper's behaviour, "
                      "with 'LoRA text encoders on the negative prompt' on).",
    "negative_te_lora": "Encode the negative prompt per variant with the text-encoder LoRAs of its negative-prompt "
                        "rows, as the paper does. Off: one plain encoding for all (cheaper).",
    "maps_from": "Rows whose attention gives the loss and the masks: the mean of the negative-prompt and prompt rows "
                 "(the paper's), or the prompt rows only.",
    "predict_after_update": "After a latent update, predict again on the updated latent (one more pass per step). "
                            "Off: the prediction made before the update is used, as in the paper.",
    "show_previews": "Add attention-map and mask images after the generated images.",
    "grad_memory": "How a latent update keeps what its backward pass needs; the result is the same. batched: all "
                   "rows at once (fastest, most memory); per_variant: one LoRA's rows at a time; checkpoint: blocks "
                   "recomputed in the backward pass (least memory); auto: batched for SD1/SD2, checkpoint for SDXL.",
    "map_layers": "Cross-attention layers at 1/32 of the image size whose maps drive the loss and the masks: all "
                  "(the paper's), or those of the UNet's down path, middle block (SDXL only) or up path. down and mid "
                  "end each latent update's pass earlier (cheaper, mostly for SDXL).",
}


def _lora_choices(host: Any) -> list[str]:
    """``NO_LORA`` followed by the host's LoRA names; an unavailable host or a failing listing gives no names."""
    names: list[str] = []
    if host is not None:
        try:
            names = [str(n) for n in host.lora_names()]
        except Exception:  # the list is a convenience; never break the UI over it
            names = []
    return [NO_LORA] + [n for n in names if n != NO_LORA]


def _host_sources(host: Any) -> Callable[[str], list[Any]]:
    """Trigger sources from a host that only offers ``trigger_words(name)`` (one list, treated as training tags)."""
    from .triggers import TriggerSource

    def sources(name: str) -> list[Any]:
        words = [str(w) for w in host.trigger_words(name)] if host is not None else []
        return [TriggerSource("tags", tuple(words))] if words else []

    return sources


def _subject_list(text: Any) -> list[str]:
    if not isinstance(text, str):
        return []
    return [w.strip() for w in text.split(SUBJECT_SEPARATOR) if w.strip()]


def suggested_triggers(sources: Any, lora: Any, subjects: Any = "", other_subjects: Sequence[Any] = ()) -> str:
    """The trigger text to fill in when ``lora`` is picked for a binding ("" when none, or on any problem).

    sources: a callable ``name -> [TriggerSource, ...]`` (most trusted first, see `clora.triggers`), or a host with
    ``trigger_words(name)``.  subjects: this binding's subject box; other_subjects: the other bindings' subject boxes.
    The binding's own subject words are taken out of the suggestion (a LoRA tagged "sks dog" bound to "dog" gets
    "sks"), and a candidate containing another binding's subject word is never suggested.
    """
    from .triggers import pick_trigger

    name = _lora_name(lora, "LoRA") if isinstance(lora, (str, type(None))) else ""
    if sources is None or not name:
        return ""
    if not callable(sources):
        sources = _host_sources(sources)
    try:
        found = list(sources(name))
    except Exception:  # metadata is a convenience; a broken file is reported when generating
        return ""
    others = [w for text in other_subjects for w in _subject_list(text)]
    return pick_trigger(found, _subject_list(subjects), others)


def _clamp_count(value: Any, lo: int, hi: int) -> int:
    try:
        n = int(float(value))
    except (TypeError, ValueError):
        n = lo
    return max(lo, min(hi, n))


def _widget_helpers():
    """(InputAccordion or None, ToolButton class) — the WebUI's own when importable (feature detection)."""
    import gradio as gr

    try:
        from modules.ui_components import InputAccordion  # type: ignore
    except Exception:
        InputAccordion = None
    try:
        from modules.ui_components import ToolButton  # type: ignore
    except Exception:
        ToolButton = None
    if ToolButton is None:
        def ToolButton(value: str = "", **kwargs):  # noqa: N802 - a stand-in class
            return gr.Button(value=value, size="sm", **kwargs)
    return InputAccordion, ToolButton


def build_ui(is_img2img: bool, host: Any, elem_prefix: Optional[str] = None, message: str = "",
             trigger_sources: Optional[Callable[[str], list[Any]]] = None):
    """Build the CLoRA accordion inside the current gradio Blocks.

    host: the host glue (``lora_names()``, ``trigger_words(name)``) or ``None`` when CLoRA cannot run here;
    message: shown at the top of the accordion (e.g. why CLoRA is unavailable);
    trigger_sources: ``name -> [TriggerSource, ...]`` for the trigger auto-fill (`clora.triggers`); without it the
    host's ``trigger_words`` are used as training tags.
    Returns ``(components, infotext_fields)``: the components in `ARG_NAMES` order, and ``(component, function)``
    pairs for infotext paste (also covering the hidden row counters).  Creates components and event listeners only.
    """
    import gradio as gr

    tab = "img2img" if is_img2img else "txt2img"
    prefix = elem_prefix or f"clora_{tab}"

    def eid(name: str) -> str:
        return f"{prefix}_{name}"

    InputAccordion, ToolButton = _widget_helpers()
    choices = _lora_choices(host)
    lo, hi = WEIGHT_RANGE
    c: dict[str, Any] = {}
    binding_rows: list[Any] = []
    style_rows: list[Any] = []

    if InputAccordion is not None:
        outer = InputAccordion(False, label="CLoRA", elem_id=eid("enabled"))
        c["enabled"] = outer
    else:
        outer = _make(gr.Accordion, "CLoRA", open=False, elem_id=prefix)
    with outer:
        if InputAccordion is None:
            c["enabled"] = _make(gr.Checkbox, False, label="Enable CLoRA", elem_id=eid("enabled"))
        if message:
            text = _html_escape(user_message(message))
            _make(gr.HTML, f"<p class='clora-message'>{text}</p>", elem_id=eid("message"))
        with _make(gr.Row, elem_id=eid("bindings_toolbar"), elem_classes=["clora-toolbar"]):
            _make(gr.HTML, "<span class='clora-heading'>LoRA bindings</span>", elem_id=eid("bindings_heading"))
            refresh = ToolButton("\U0001F504", elem_id=eid("refresh"))
            add_b = _make(gr.Button, "+ binding", size="sm", elem_id=eid("add_binding"))
            del_b = _make(gr.Button, "\u2212 binding", size="sm", elem_id=eid("remove_binding"))
        bindings_shown = _make(gr.Number, value=1, precision=0, visible=False, elem_id=eid("bindings_shown"))
        with _make(gr.Column, elem_id=eid("bindings"), elem_classes=["clora-bindings"]):
            for n in range(1, MAX_BINDINGS + 1):
                first = n == 1
                with _make(gr.Row, visible=first, elem_id=eid(f"b{n}_row"), elem_classes=["clora-binding-row"]) as row:
                    c[f"b{n}_lora"] = _make(
                        gr.Dropdown, choices=choices, value=NO_LORA, label=f"LoRA {n}", elem_id=eid(f"b{n}_lora"),
                        info=_TIPS["lora"] if first else None, allow_custom_value=True, filterable=True,
                    )
                    c[f"b{n}_subjects"] = _make(
                        gr.Textbox, "", label="Subject words", placeholder=f"cat {SUBJECT_SEPARATOR} kitten", lines=1,
                        elem_id=eid(f"b{n}_subjects"), info=_TIPS["subjects"] if first else None,
                    )
                    c[f"b{n}_triggers"] = _make(
                        gr.Textbox, "", label="Trigger words", lines=1, elem_id=eid(f"b{n}_triggers"),
                        info=_TIPS["triggers"] if first else None,
                    )
                    c[f"b{n}_weight"] = _make(
                        gr.Slider, minimum=lo, maximum=hi, step=0.05, value=1.0, label="Weight",
                        elem_id=eid(f"b{n}_weight"), info=_TIPS["weight"] if first else None,
                    )
                    c[f"b{n}_te_weight"] = _make(
                        gr.Textbox, "", label="TE weight", placeholder="= weight", lines=1,
                        elem_id=eid(f"b{n}_te_weight"), elem_classes=["clora-narrow"],
                        info=_TIPS["te_weight"] if first else None,
                    )
                binding_rows.append(row)

        with _make(gr.Row, elem_id=eid("styles_toolbar"), elem_classes=["clora-toolbar"]):
            _make(gr.HTML, "<span class='clora-heading'>Style LoRAs</span>", elem_id=eid("styles_heading"))
            add_s = _make(gr.Button, "+ style", size="sm", elem_id=eid("add_style"))
            del_s = _make(gr.Button, "\u2212 style", size="sm", elem_id=eid("remove_style"))
        styles_shown = _make(gr.Number, value=0, precision=0, visible=False, elem_id=eid("styles_shown"))
        with _make(gr.Column, elem_id=eid("styles"), elem_classes=["clora-styles"]):
            for n in range(1, MAX_STYLES + 1):
                first = n == 1
                with _make(gr.Row, visible=False, elem_id=eid(f"s{n}_row"), elem_classes=["clora-style-row"]) as row:
                    c[f"s{n}_lora"] = _make(
                        gr.Dropdown, choices=choices, value=NO_LORA, label=f"Style LoRA {n}", elem_id=eid(f"s{n}_lora"),
                        allow_custom_value=True, filterable=True,
                    )
                    c[f"s{n}_weight"] = _make(
                        gr.Slider, minimum=lo, maximum=hi, step=0.05, value=0.8, label="Style weight",
                        elem_id=eid(f"s{n}_weight"),
                    )
                    c[f"s{n}_mode"] = _make(
                        gr.Radio, choices=[(label, mode) for mode, label in STYLE_MODE_LABELS.items()], value="whole",
                        label="Applies to", elem_id=eid(f"s{n}_mode"), info=_TIPS["style_mode"] if first else None,
                    )
                    c[f"s{n}_subjects"] = _make(
                        gr.Textbox, "", label="Subjects", lines=1, elem_id=eid(f"s{n}_subjects"),
                        info=_TIPS["style_subjects"], visible=False,  # shown for "these subjects" only
                    )
                style_rows.append(row)

        d = CloraSettings()
        with _make(gr.Accordion, "Advanced", open=False, elem_id=eid("advanced")):
            with _make(gr.Row, elem_id=eid("advanced_row1")):
                c["step_size"] = _make(gr.Number, value=d.step_size, label="Step size", minimum=0,
                                       maximum=STEP_SIZE_MAX, elem_id=eid("step_size"), info=_TIPS["step_size"])
                c["opt_end"] = _make(gr.Slider, minimum=0.0, maximum=1.0, value=d.opt_end, step=0.01,
                                     label="Optimise until", elem_id=eid("opt_end"), info=_TIPS["opt_end"])
                c["refine_at"] = _make(gr.Textbox, ", ".join(_fmt_number(x) for x in d.refine_at), label="Refine at",
                                       lines=1, elem_id=eid("refine_at"), info=_TIPS["refine_at"])
                c["refine_iters"] = _make(gr.Slider, minimum=0, maximum=REFINE_ITERS_MAX, value=d.refine_iters,
                                          step=1, label="Refinement iterations", elem_id=eid("refine_iters"),
                                          info=_TIPS["refine_iters"])
            with _make(gr.Row, elem_id=eid("advanced_row2")):
                c["temperature"] = _make(gr.Slider, minimum=0.01, maximum=TEMPERATURE_MAX, value=d.temperature,
                                         step=0.01, label="Temperature", elem_id=eid("temperature"),
                                         info=_TIPS["temperature"])
                c["mask_threshold"] = _make(gr.Slider, minimum=0.01, maximum=0.99, value=d.mask_threshold, step=0.01,
                                            label="Mask threshold \u03bb", elem_id=eid("mask_threshold"),
                                            info=_TIPS["mask_threshold"])
                c["mask_morphology"] = _make(gr.Dropdown, choices=list(MORPHOLOGIES), value=d.mask_morphology,
                                             label="Mask morphology", elem_id=eid("mask_morphology"),
                                             info=_TIPS["mask_morphology"])
                c["mask_start"] = _make(gr.Slider, minimum=0.0, maximum=1.0, value=d.mask_start, step=0.01,
                                        label="Masks from", elem_id=eid("mask_start"), info=_TIPS["mask_start"])
            with _make(gr.Row, elem_id=eid("advanced_row3")):
                c["lora_on_uncond"] = _make(gr.Checkbox, d.lora_on_uncond, label="LoRAs on negative-prompt rows",
                                            elem_id=eid("lora_on_uncond"), info=_TIPS["lora_on_uncond"])
                c["negative_te_lora"] = _make(gr.Checkbox, d.negative_te_lora,
                                              label="LoRA text encoders on the negative prompt",
                                              elem_id=eid("negative_te_lora"), info=_TIPS["negative_te_lora"])
            with _make(gr.Row, elem_id=eid("advanced_row4")):
                c["maps_from"] = _make(gr.Radio, choices=[(label, v) for v, label in MAPS_FROM_LABELS.items()],
                                       value=d.maps_from, label="Attention maps from", elem_id=eid("maps_from"),
                                       info=_TIPS["maps_from"])
                # Set after construction, so that no gradio version's value processing can turn it into plain text.
                c["maps_from"].value = API_FILLER_MAPS_FROM
                # The WebUI compares a saved default of a radio with its labels, never with the values: it could
                # not restore one, so none is saved.
                c["maps_from"].do_not_save_to_config = True
                c["predict_after_update"] = _make(gr.Checkbox, d.predict_after_update,
                                                  label="Predict again after the update",
                                                  elem_id=eid("predict_after_update"),
                                                  info=_TIPS["predict_after_update"])
                c["grad_memory"] = _make(gr.Dropdown, choices=list(GRAD_MEMORY), value=d.grad_memory,
                                         label="Gradient memory", elem_id=eid("grad_memory"),
                                         info=_TIPS["grad_memory"])
                c["map_layers"] = _make(gr.Dropdown, choices=list(MAP_LAYERS), value=d.map_layers,
                                        label="Attention layers", elem_id=eid("map_layers"),
                                        info=_TIPS["map_layers"])
        c["show_previews"] = _make(gr.Checkbox, d.show_previews, label="Show attention and masks",
                                   elem_id=eid("show_previews"), info=_TIPS["show_previews"])

    _wire_rows(gr, bindings_shown, add_b, del_b, binding_rows,
               [[c[f"b{n}_{f}"] for f in BINDING_FIELDS] for n in range(1, MAX_BINDINGS + 1)],
               blank=[NO_LORA, "", "", 1.0, ""], minimum=1, maximum=MAX_BINDINGS)
    _wire_rows(gr, styles_shown, add_s, del_s, style_rows,
               [[c[f"s{n}_{f}"] for f in STYLE_FIELDS] for n in range(1, MAX_STYLES + 1)],
               blank=[NO_LORA, 0.8, "whole", ""], minimum=0, maximum=MAX_STYLES)

    dropdowns = [c[f"b{n}_lora"] for n in range(1, MAX_BINDINGS + 1)]
    dropdowns += [c[f"s{n}_lora"] for n in range(1, MAX_STYLES + 1)]

    def refresh_lists():
        fresh = _lora_choices(host)
        return [gr.update(choices=fresh) for _ in dropdowns]

    refresh.click(fn=refresh_lists, inputs=[], outputs=dropdowns, show_progress=False)

    _wire_trigger_prefill(
        gr, trigger_sources if trigger_sources is not None else _host_sources(host),
        [c[f"b{n}_lora"] for n in range(1, MAX_BINDINGS + 1)],
        [c[f"b{n}_triggers"] for n in range(1, MAX_BINDINGS + 1)],
        [c[f"b{n}_subjects"] for n in range(1, MAX_BINDINGS + 1)],
    )
    for n in range(1, MAX_STYLES + 1):
        _wire_style_mode(gr, c[f"s{n}_mode"], c[f"s{n}_subjects"])

    # Row fields repeat their labels, and the WebUI keys saved UI defaults (ui-config.json) by label: keep them out
    # of it, so one row's saved value never becomes another row's default.
    for name in ARG_NAMES:
        if name[0] in "bs" and name[1].isdigit():
            c[name].do_not_save_to_config = True

    components = [c[name] for name in ARG_NAMES]
    infotext_fields = [(c[name], paste_function(name)) for name in ARG_NAMES]
    infotext_fields += [(bindings_shown, paste_function("bindings_shown")),
                        (styles_shown, paste_function("styles_shown"))]
    return components, infotext_fields


def _make(cls, *args: Any, **kwargs: Any):
    """``cls(*args, **kwargs)`` without the keyword options this gradio version's ``cls`` does not take
    (gradio 3.41 in A1111 1.8, gradio 4 in Forge: e.g. ``elem_classes`` on rows, ``filterable``)."""
    params = _init_params(cls)
    return cls(*args, **{k: v for k, v in kwargs.items() if k in params})


def _init_params(cls) -> Mapping[str, Any]:
    import inspect

    return inspect.signature(cls.__init__).parameters


def _html_escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def _wire_rows(gr, counter, add_button, remove_button, rows, row_components, *, blank, minimum, maximum) -> None:
    """+/− buttons change the hidden counter; the counter (also set by infotext paste) shows/hides rows.
    Removing a row resets its fields, so a hidden row never holds settings."""

    def show(count):
        k = _clamp_count(count, minimum, maximum)
        return [gr.update(visible=i < k) for i in range(len(rows))]

    def add(count):
        return min(maximum, _clamp_count(count, minimum, maximum) + 1)

    def remove(count):
        k = _clamp_count(count, minimum, maximum)
        new = max(minimum, k - 1)
        cleared: list[Any] = []
        for i, comps in enumerate(row_components):
            if new <= i < k:
                cleared += [gr.update(value=v) for v in blank]
            else:
                cleared += [gr.update() for _ in comps]
        return [new] + cleared

    flat = [comp for comps in row_components for comp in comps]
    add_button.click(fn=add, inputs=[counter], outputs=[counter], show_progress=False)
    remove_button.click(fn=remove, inputs=[counter], outputs=[counter] + flat, show_progress=False)
    counter.change(fn=show, inputs=[counter], outputs=rows, show_progress=False)


def _wire_style_mode(gr, mode_radio, subjects_box) -> None:
    def style_mode_changed(mode):
        return gr.update(visible=isinstance(mode, str) and _style_mode(mode, "mode") == "subjects")

    mode_radio.change(fn=style_mode_changed, inputs=[mode_radio], outputs=[subjects_box], show_progress=False)


def _auto_trigger(current: Any, auto: Any, suggestion: str) -> Optional[str]:
    """What the trigger box becomes when a suggestion is made: ``suggestion`` when the box is empty or still holds
    the text filled in automatically before (``auto``); ``None`` (leave it) when the user typed something."""
    text = current if isinstance(current, str) else ""
    before = auto if isinstance(auto, str) else ""
    if text.strip() and text != before:
        return None
    return suggestion


def _wire_trigger_prefill(gr, sources, dropdowns, trigger_boxes, subject_boxes) -> None:
    """Trigger-word auto-fill.

    * Picking a LoRA ('select': a user's choice only, so infotext paste, which sets the dropdown programmatically,
      never overwrites pasted trigger words) fills the row's trigger box with the suggestion for that LoRA —
      replacing the text filled in automatically before (also by nothing, for a LoRA without a suggestion), never
      what the user typed.
    * When a subject box loses focus, the rows whose trigger box still holds auto-filled text get the suggestion
      again (a trigger containing the new subject word of another binding is withdrawn).
    The auto-filled text of each row is kept in a `gr.State` (UI state, not a script argument).
    """
    event_name = "select"
    select_data = getattr(gr, "SelectData", None)
    state_cls = getattr(gr, "State", None)
    if select_data is None or state_cls is None:
        return
    autos = [state_cls("") for _ in dropdowns]
    n_rows = len(dropdowns)

    for i, dropdown in enumerate(dropdowns):
        event = getattr(dropdown, event_name, None)
        if event is None:
            continue

        def prefill(evt, current, auto, *subjects, _i=i):
            others = [s for j, s in enumerate(subjects) if j != _i]
            new = _auto_trigger(current, auto, suggested_triggers(sources, getattr(evt, "value", None),
                                                                  subjects[_i] if _i < len(subjects) else "", others))
            if new is None:
                return gr.update(), gr.update()
            return gr.update(value=new), new

        # gradio passes the event data to the parameter annotated with SelectData (a class object, not a string).
        prefill.__annotations__ = {"evt": select_data}
        event(fn=prefill, inputs=[trigger_boxes[i], autos[i], *subject_boxes], outputs=[trigger_boxes[i], autos[i]],
              show_progress=False)

    def retrigger(*values):
        loras = values[:n_rows]
        subjects = values[n_rows:2 * n_rows]
        current = values[2 * n_rows:3 * n_rows]
        auto = values[3 * n_rows:4 * n_rows]
        boxes, states = [], []
        for i in range(n_rows):
            filled = auto[i] if isinstance(auto[i], str) else ""
            if not filled or current[i] != filled:  # nothing auto-filled here, or the user changed it
                boxes.append(gr.update())
                states.append(gr.update())
                continue
            others = [s for j, s in enumerate(subjects) if j != i]
            new = suggested_triggers(sources, loras[i], subjects[i], others)
            boxes.append(gr.update(value=new))
            states.append(new)
        return [*boxes, *states]

    for box in subject_boxes:
        event = getattr(box, "blur", None) or getattr(box, "change", None)
        if event is not None:
            event(fn=retrigger, inputs=[*dropdowns, *subject_boxes, *trigger_boxes, *autos],
                  outputs=[*trigger_boxes, *autos], show_progress=False)
