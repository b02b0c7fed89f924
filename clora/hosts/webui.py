"""Glue shared by the WebUIs with A1111's ``modules.scripts`` API (A1111 1.8+, Forge): what the AlwaysOn script
does at each hook, X/Y/Z plot axes, the ``/clora/*`` API routes, preview images.

``modules.*`` is imported only inside the functions that register things with the WebUI; everything else takes
the few host objects it touches as arguments (``p``, ``processed``, the host glue), so it runs in tests without a WebUI.

Per-generation state lives on the processing object ``p`` (attribute `STATE_ATTR`), never in this module:
a copied ``p`` (X/Y/Z plot cells) starts from its own settings.

Errors: the WebUI catches and merely logs exceptions from script hooks, which would make CLoRA silently do nothing.
So a problem found in a hook (bad settings, unsupported host, a failure while preparing) is kept and raised as
`CloraError` from ``p.sample`` when sampling starts: the UI shows it and the API returns it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ..errors import detail, user_message
from ..settings import CloraSettings, SettingsError
from ..ui import ARG_NAMES, args_to_settings, is_enabled
from .common import CloraError

__all__ = [
    "STATE_ATTR",
    "OVERRIDES_ATTR",
    "ScriptState",
    "state_of",
    "on_process",
    "on_before_process_batch",
    "on_process_batch",
    "on_postprocess_batch",
    "on_postprocess",
    "install_error",
    "set_override",
    "AXES",
    "register_xyz_axes",
    "add_routes",
    "schema_document",
    "loras_document",
    "build_previews",
    "trigger_sources",
]

STATE_ATTR = "_clora_state"
#: Why CLoRA does nothing, when the host detection gave no reason.
UNAVAILABLE = "Cannot run in this WebUI."
#: ``p.clora_overrides``: argument name -> value, applied over the UI's arguments (X/Y/Z plot cells set it).
OVERRIDES_ATTR = "clora_overrides"


@dataclass
class ScriptState:
    """CLoRA's state for one generation (one ``p``): the settings, or the error to raise at sampling."""

    settings: Optional[CloraSettings]
    error: Optional[Exception] = None
    previews: list[Any] = field(default_factory=list)


def state_of(p: Any) -> Optional[ScriptState]:
    return getattr(p, STATE_ATTR, None)


def _user_error(error: Exception) -> CloraError:
    """``error`` as a `CloraError`, whose message has the user-facing form (`clora.errors.user_message`)."""
    if isinstance(error, CloraError):
        return error
    return CloraError(error)


def install_error(p: Any, error: Exception) -> None:
    """Make this generation's sampling raise ``error`` (as `CloraError`), so the user sees it."""
    exc = _user_error(error)

    def sample(*args: Any, **kwargs: Any):
        raise exc from (error if error is not exc else None)

    p.sample = sample  # an attribute of this p only; the class method is untouched


# ----- the script's hooks --------------------------------------------------------------------------------------


def on_process(p: Any, args: Sequence[Any], host: Any, unavailable: str = "") -> Optional[ScriptState]:
    """``Script.process``: read the settings (with ``p.clora_overrides`` on top), record them in the infotext.

    Returns the state (also stored on ``p``), or ``None`` when CLoRA is off for this generation.
    """
    overrides = getattr(p, OVERRIDES_ATTR, None) or {}
    _set_infotext(p, {})
    if not is_enabled(args, overrides):
        setattr(p, STATE_ATTR, None)
        return None
    try:
        settings = args_to_settings(args, overrides)
    except SettingsError as exc:
        state = ScriptState(settings=None, error=exc)
    else:
        error = None if host is not None else CloraError(unavailable or UNAVAILABLE)
        state = ScriptState(settings=settings, error=error)
        _set_infotext(p, settings.to_flat())
    setattr(p, STATE_ATTR, state)
    return state


def _is_clora_key(key: Any) -> bool:
    return isinstance(key, str) and (key == "CLoRA" or key.startswith("CLoRA "))


def _set_infotext(p: Any, flat: dict[str, Any]) -> None:
    """Give ``p`` its own ``extra_generation_params``: the old entries without CLoRA's keys, plus ``flat``.

    X/Y/Z plot cells are shallow copies of one ``p`` sharing one dict: updating it in place would leak a cell's CLoRA
    keys into the next cells (a cell with CLoRA off, or with an option back at its default, showed the previous
    cell's values)."""
    old = getattr(p, "extra_generation_params", None) or {}
    p.extra_generation_params = {**{k: v for k, v in old.items() if not _is_clora_key(k)}, **flat}


def on_before_process_batch(p: Any, host: Any) -> None:
    state = state_of(p)
    if state is None or state.error is not None or host is None:
        return
    try:
        host.before_process_batch(p, state.settings)
    except Exception as exc:  # the WebUI would only log it and generate without CLoRA
        state.error = CloraError(f"Failed while preparing the prompts: {detail(exc)}")


def on_process_batch(p: Any, host: Any) -> None:
    state = state_of(p)
    if state is None:
        return
    if state.error is None and host is not None:
        try:
            host.process_batch(p, state.settings)
        except Exception as exc:  # see on_before_process_batch
            state.error = CloraError(f"Failed while preparing this batch: {detail(exc)}")
    if state.error is not None:
        install_error(p, state.error)


def on_postprocess_batch(p: Any, host: Any, images: Any = None) -> None:
    """Collect preview images of this batch (when asked for) and let the host clean up ``p``."""
    state = state_of(p)
    if state is None or state.error is not None or host is None:
        return
    try:
        if state.settings is not None and state.settings.show_previews:
            state.previews.extend(build_previews(host.run_of(p), state.settings, images))
    except Exception as exc:  # previews are a diagnostic; never lose the generated images over them
        p.extra_generation_params["CLoRA previews"] = f"not available ({exc})"
    finally:
        host.postprocess_batch(p)


def on_postprocess(p: Any, processed: Any) -> None:
    """Append the collected previews after the generated images (with the first image's infotext)."""
    state = state_of(p)
    if state is None or not state.previews:
        return
    infotexts = getattr(processed, "infotexts", None)
    info = infotexts[0] if infotexts else ""
    processed.images.extend(state.previews)
    if isinstance(infotexts, list):
        infotexts.extend([info] * len(state.previews))
    state.previews = []


# ----- trigger words ---------------------------------------------------------------------------------------------


def trigger_sources(name: str) -> list[Any]:
    """The trigger-word sources of LoRA ``name`` from the WebUI's LoRA folder (`clora.triggers.trigger_sources`):
    the file's header and its sidecars only, never its tensors.  Raises `LoraError` for an unknown name."""
    from ..triggers import trigger_sources as sources_of_file
    from .a1111 import find_lora_file  # the WebUI's LoRA index; Forge shares it

    return sources_of_file(find_lora_file(name))


# ----- previews ------------------------------------------------------------------------------------------------


def _to_pil(image: Any):
    """A (3, H, W) tensor/array in [0, 1], or a PIL image, as an RGB PIL image."""
    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
    a = np.asarray(image, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.shape[-1] == 1:
        a = a.repeat(3, axis=-1)
    return Image.fromarray((a.clip(0, 1) * 255).round().astype(np.uint8))


def build_previews(run: Any, settings: CloraSettings, images: Any = None) -> list[Any]:
    """Per image of the batch: the masks over the image (when ``images`` is given) and the attention grid
    (mean cross-attention maps of every concept in every variant, plus the masks)."""
    from ..preview import attention_grid, mask_overlay

    composer = getattr(run, "composer", None)
    if composer is None or composer.last_masks is None:
        return []
    maps = composer.mean_maps if composer.mean_maps is not None else composer.last_maps
    masks = composer.last_masks
    labels = ["base"] + [b.lora for b in settings.bindings]
    concepts = ["/".join(b.subjects) for b in settings.bindings]
    out = []
    for i in range(masks.shape[0]):
        if images is not None and i < len(images):
            out.append(mask_overlay(_to_pil(images[i]), masks[i], labels))
        if maps is not None and i < maps.shape[0]:
            out.append(attention_grid(maps[i], run.variants.groups, concepts, labels, masks=masks[i]))
    return out


# ----- X/Y/Z plot --------------------------------------------------------------------------------------------


def set_override(p: Any, name: str, value: Any) -> None:
    """Set override ``name`` on this ``p`` only (a new dict: X/Y/Z cells are shallow copies sharing the old one)."""
    if name not in ARG_NAMES:
        raise KeyError(f"unknown CLoRA argument name {name!r}")
    current = getattr(p, OVERRIDES_ATTR, None) or {}
    setattr(p, OVERRIDES_ATTR, {**current, name: value})


#: (label, value type, argument name, choices or None) of each X/Y/Z plot axis.
AXES: tuple[tuple[str, type, str, Optional[Callable[[], list[str]]]], ...] = (
    ("[CLoRA] Enabled", str, "enabled", lambda: ["True", "False"]),
    ("[CLoRA] Mask threshold \u03bb", float, "mask_threshold", None),
    ("[CLoRA] Step size", float, "step_size", None),
    ("[CLoRA] Optimise until", float, "opt_end", None),
    ("[CLoRA] Refinement iterations", int, "refine_iters", None),
    ("[CLoRA] Binding 1 weight", float, "b1_weight", None),
    ("[CLoRA] Binding 2 weight", float, "b2_weight", None),
)


def _axis_apply(name: str) -> Callable[[Any, Any, Any], None]:
    def apply(p: Any, x: Any, xs: Any) -> None:
        set_override(p, name, x)

    apply.__name__ = f"clora_axis_{name}"
    return apply


def _xyz_module(scripts_data: Sequence[Any]) -> Any:
    for entry in scripts_data:
        cls = getattr(entry, "script_class", None)
        if getattr(cls, "__module__", None) == "xyz_grid.py":
            return getattr(entry, "module", None)
    return None


def register_xyz_axes(scripts_data: Optional[Sequence[Any]] = None) -> bool:
    """Append the CLoRA axes to the X/Y/Z plot script's options (once; labels already present are skipped).
    Returns False when the X/Y/Z plot script is not loaded."""
    if scripts_data is None:
        from modules import scripts  # type: ignore

        scripts_data = scripts.scripts_data
    xyz = _xyz_module(scripts_data)
    if xyz is None or not hasattr(xyz, "AxisOption") or not hasattr(xyz, "axis_options"):
        return False
    present = {getattr(o, "label", None) for o in xyz.axis_options}
    for label, kind, name, choices in AXES:
        if label in present:
            continue
        kwargs = {"choices": choices} if choices is not None else {}
        xyz.axis_options.append(xyz.AxisOption(label, kind, _axis_apply(name), **kwargs))
    return True


# ----- API routes ----------------------------------------------------------------------------------------------


def schema_document() -> dict[str, Any]:
    """``GET /clora/schema``: the JSON schema of the named form, with the positional argument order beside it."""
    doc = CloraSettings.json_schema()
    doc["x-clora-positional-args"] = list(ARG_NAMES)
    return doc


def loras_document(host: Any, unavailable: str = "") -> dict[str, Any]:
    """``GET /clora/loras``: the LoRA names the host knows."""
    if host is None:
        return {"loras": [], "error": user_message(unavailable or UNAVAILABLE)}
    return {"loras": list(host.lora_names())}


def add_routes(app: Any, detect: Callable[[], Any]) -> None:
    """Register ``GET /clora/schema`` and ``GET /clora/loras`` on the WebUI's FastAPI ``app`` (once).
    ``detect`` returns a `clora.hosts.HostDetection`, looked up per request (cheap) so no state is kept here."""
    present = {getattr(r, "path", None) for r in getattr(app, "routes", [])}

    def loras() -> dict[str, Any]:
        d = detect()
        return loras_document(d.host, d.message)

    if "/clora/schema" not in present:
        app.add_api_route("/clora/schema", schema_document, methods=["GET"])
    if "/clora/loras" not in present:
        app.add_api_route("/clora/loras", loras, methods=["GET"])
