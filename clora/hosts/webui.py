"""Glue shared by the WebUIs with A1111's ``modules.scripts`` API (A1111 1.8+, Forge): what the AlwaysOn script
does at each hook, X/Y/Z plot axes, the ``/clora/*`` API routes, preview images.

``modules.*`` is imported only inside the functions that register things with the WebUI; everything else takes
the few host objects it touches as arguments (``p``, ``processed``, the host glue), so it runs in tests without a WebUI.

Per-generation state lives on the processing object ``p`` (attribute `STATE_ATTR`), never in this module:
a copied ``p`` (X/Y/Z plot cells) starts from its own settings.

Errors: the WebUI catches and merely logs exceptions from script hooks, which would make CLoRA silently do nothing;
and whatever a generation raises, the WebUI prints with its whole traceback (A1111's ``call_queue.wrap_gradio_call``
and API handler, Forge's ``main_thread`` and uvicorn) and shows as ``"<exception type>: <message>"``.  So:

* a user's mistake found before a batch samples (bad settings, an unsupported host, anything the host's preparation
  refuses: a subject word not in the prompt, an unknown LoRA, ...) is, in the UI (``p.is_api`` false), one console
  line plus the same ``CLoRA: ...`` text among the generation's comments under the gallery, and the generation stops
  cleanly before sampling (`stop_quietly`: the batch's prompt list is emptied, which ends the WebUI's batch loop);
  through the API it is raised from ``p.sample`` as an HTTP 422 error (`request_error`: a `CloraError` that is also
  FastAPI's ``HTTPException``, which both hosts answer without a traceback), with one console line;
* a mistake found only while sampling is raised from ``p.sample``: in the UI as `ShownError` (named so that the UI
  reads ``CLoRA: <message>`` once), through the API as the 422 error;
* any other exception raised while CLoRA is on (a bug) becomes `clora.errors.bug_message` (what to send where) and
  keeps its traceback in the console; the WebUI's own interruptions and out-of-memory errors pass through unchanged.
"""
from __future__ import annotations

import copy
import functools
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ..compose import NonFiniteError
from ..errors import bug_message, detail, user_message
from ..lora.types import LoraError
from ..prompts import PromptError
from ..settings import GRAD_MEMORY, MAP_LAYERS, CloraSettings, SettingsError
from ..ui import ARG_NAMES, args_to_settings, is_enabled, nothing_chosen
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
    "USER_ERRORS",
    "REFUSED_STATUS",
    "ShownError",
    "request_error",
    "error_for",
    "stop_quietly",
    "preflight",
    "trigger_sources",
    "set_override",
    "AXES",
    "register_xyz_axes",
    "add_routes",
    "schema_document",
    "loras_document",
    "build_previews",
]

STATE_ATTR = "_clora_state"
#: Why CLoRA does nothing, when the host detection gave no reason.
UNAVAILABLE = "Cannot run in this WebUI."
#: ``p.clora_overrides``: argument name -> value, applied over the UI's arguments (X/Y/Z plot cells set it).
OVERRIDES_ATTR = "clora_overrides"
#: The exception types whose messages are meant for the user (a mistake to fix, or a NaN/inf result with what to
#: change; not a bug).
USER_ERRORS: tuple[type, ...] = (CloraError, SettingsError, PromptError, LoraError, NonFiniteError)
#: HTTP status of an API request CLoRA refuses (a mistake in the request or the setup): Unprocessable Content.
REFUSED_STATUS = 422
#: Infotext notes (keys the settings ignore when pasted).
NOTE_KEY = "CLoRA note"
HIRES_KEY = "CLoRA hires"
NOTHING_CHOSEN_NOTE = "switched on without a LoRA chosen: not applied"
NOTHING_CHOSEN = "It is switched on, but no LoRA is chosen: generating without CLoRA."
HIRES_NOTE = "second pass without CLoRA (the hires prompt differs)"


@dataclass
class ScriptState:
    """CLoRA's state for one generation (one ``p``): the settings, or the error to report."""

    settings: Optional[CloraSettings]
    error: Optional[Exception] = None
    previews: list[Any] = field(default_factory=list)


def state_of(p: Any) -> Optional[ScriptState]:
    return getattr(p, STATE_ATTR, None)


class _Bug(CloraError):
    """A `CloraError` carrying `clora.errors.bug_message` for an unexpected exception (its ``__cause__``)."""


def _user_error(error: Exception) -> CloraError:
    """``error`` as a `CloraError`, whose message has the user-facing form (`clora.errors.user_message`)."""
    if isinstance(error, CloraError):
        return error
    return CloraError(error)


def _prepare_error(error: Exception, doing: str) -> CloraError:
    """A failure of the host glue while ``doing``: the user's mistake in its own words, anything else as a bug."""
    if isinstance(error, USER_ERRORS):
        return CloraError(f"Failed while {doing}: {detail(error)}")
    bug = _Bug(bug_message(error, doing))
    bug.__cause__ = error
    return bug


def install_error(p: Any, error: Exception) -> None:
    """Make this generation's sampling raise ``error`` (as `CloraError`), so the user sees it."""
    exc = _user_error(error)
    cause = error if error is not exc else exc.__cause__

    def sample(*args: Any, **kwargs: Any):
        raise exc from cause

    p.sample = sample  # an attribute of this p only; the class method is untouched


def is_api(p: Any) -> bool:
    """Whether ``p`` came through the WebUI's API (A1111 1.8 and Forge set ``p.is_api``)."""
    return getattr(p, "is_api", False) is True


def console(message: str) -> None:
    """One line in the WebUI's console (stderr, where the WebUI prints its own errors)."""
    print(" ".join(str(message).split()), file=sys.stderr, flush=True)


class ShownError(CloraError):
    """Raised towards the WebUI's UI, which shows an exception as ``"<type name>: <message>"``: the type is named
    ``CLoRA`` and the message is the text after the prefix, so the UI reads ``CLoRA: <message>`` exactly once.
    ``message`` holds the whole user-facing text."""

    def __init__(self, message: Any = "") -> None:
        super().__init__(message)
        self.message = self.args[0]

    def __str__(self) -> str:
        return detail(self.message)


ShownError.__name__ = ShownError.__qualname__ = "CLoRA"


@functools.lru_cache(maxsize=None)
def _request_error_class() -> Optional[type]:
    """`CloraError` + FastAPI's ``HTTPException`` (None without FastAPI).  Made once; named ``CloraError``, which is
    what the API's ``error`` field showed before."""
    try:
        from fastapi import HTTPException
    except Exception:  # no FastAPI: not inside a WebUI
        return None

    class CloraRequestError(CloraError, HTTPException):
        def __init__(self, message: Any = "") -> None:
            CloraError.__init__(self, message)
            self.status_code = REFUSED_STATUS
            self.detail = self.args[0]
            self.headers = None

        def __str__(self) -> str:
            return self.args[0]

        def __repr__(self) -> str:
            return f"CloraError({self.args[0]!r})"

    CloraRequestError.__name__ = CloraRequestError.__qualname__ = "CloraError"
    return CloraRequestError


def request_error(message: Any) -> CloraError:
    """The exception for a refused API request: HTTP `REFUSED_STATUS`, the message under ``detail`` (both hosts;
    A1111 repeats it under ``errors``), no traceback in the console.  A plain `CloraError` without FastAPI."""
    cls = _request_error_class()
    return cls(message) if cls is not None else CloraError(message)


def _passes_through(error: BaseException) -> bool:
    """The WebUI's own exceptions (interrupt/skip, NaN check: defined in its ``modules``) and out-of-memory errors
    are not CLoRA's to reword."""
    module = getattr(type(error), "__module__", "") or ""
    if module == "modules" or module.startswith("modules."):
        return True
    try:
        import torch

        oom = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if t is not None)
    except Exception:
        oom = ()
    return bool(oom) and isinstance(error, oom)


def error_for(p: Any, error: BaseException) -> BaseException:
    """What sampling raises, for ``error`` raised inside it while CLoRA is on (see the module docstring)."""
    if _passes_through(error) or isinstance(error, ShownError) or getattr(error, "status_code", None) == REFUSED_STATUS:
        return error
    if isinstance(error, USER_ERRORS) and not isinstance(error, _Bug):
        message = user_message(error)
        if is_api(p):
            console(message)
            return request_error(message)
        return ShownError(message)
    message = str(error) if isinstance(error, _Bug) else bug_message(error)
    return CloraError(message) if is_api(p) else ShownError(message)


def _guard_sample(p: Any) -> None:
    """Wrap this ``p``'s sampling (an attribute of this p only) so that what it raises reaches the user in the form
    `error_for` gives.  Removed by `on_postprocess_batch` (or with ``p`` at the end of the generation)."""
    inner = p.sample

    def sample(*args: Any, **kwargs: Any):
        try:
            return inner(*args, **kwargs)
        except Exception as exc:
            raised = error_for(p, exc)
            if raised is exc:
                raise
            cause = exc.__cause__ if isinstance(exc, _Bug) else (None if isinstance(exc, USER_ERRORS) else exc)
            raise raised from cause

    sample.clora_guard = True  # type: ignore[attr-defined]
    p.sample = sample


def stop_quietly(p: Any, error: Exception) -> None:
    """End this generation before it samples, for a user's mistake in the UI: one console line, the message among
    the generation's comments (shown under the gallery), and an empty prompt list for this batch, on which the
    WebUI's batch loop stops (A1111 1.8 and Forge: ``if len(p.prompts) == 0: break`` after
    ``before_process_batch``).  Images of earlier batches are kept."""
    message = user_message(error)
    console(message)
    comment = getattr(p, "comment", None)
    if callable(comment):
        comment(message)
    p.prompts = []


def _parsed_prompts(p: Any) -> list[Any]:
    """This batch's prompts as the host will see them in ``process_batch``: ``<lora:...>`` tags parsed out."""
    prompts = list(getattr(p, "prompts", []) or [])
    try:
        from modules import extra_networks  # type: ignore

        return list(extra_networks.parse_prompts(prompts)[0])
    except Exception:  # not in a WebUI, or another parser: the prompts as they are
        return prompts


def preflight(p: Any, host: Any, settings: CloraSettings) -> Optional[Exception]:
    """The user's mistake this batch would be refused for, found before the batch starts (or None).

    Runs the host's own ``process_batch`` on a shallow copy of ``p`` whose prompts are parsed as the host will see
    them, then its ``postprocess_batch`` on that copy: the same checks as the real preparation, with nothing of it
    kept on ``p``.  An unexpected failure here gives None: the real preparation reports it, with its traceback."""
    view = copy.copy(p)
    view.prompts = _parsed_prompts(p)
    run = None
    try:
        host.process_batch(view, settings)
        run = host.run_of(view)
    except USER_ERRORS as exc:
        return exc
    except Exception:
        return None
    finally:
        try:
            host.postprocess_batch(view)
        except Exception:
            pass
    error = getattr(run, "error", None)
    return error if isinstance(error, USER_ERRORS) else None


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
    if nothing_chosen(args, overrides):
        # The WebUI's InputAccordion ticks CLoRA on when it is opened: on with nothing chosen means off, said once.
        setattr(p, STATE_ATTR, None)
        p.extra_generation_params[NOTE_KEY] = NOTHING_CHOSEN_NOTE
        console(user_message(NOTHING_CHOSEN))
        return None
    try:
        settings = args_to_settings(args, overrides)
    except SettingsError as exc:
        state = ScriptState(settings=None, error=exc)
    else:
        error = None if host is not None else CloraError(unavailable or UNAVAILABLE)
        state = ScriptState(settings=settings, error=error)
        _set_infotext(p, settings.to_flat())
        if _hires_prompt_differs(p):
            p.extra_generation_params[HIRES_KEY] = HIRES_NOTE
    setattr(p, STATE_ATTR, state)
    return state


def _hires_prompt_differs(p: Any) -> bool:
    """Hires fix on with a hires prompt of its own: the hosts run the second pass without CLoRA (the same test as
    theirs; the WebUI has filled ``hr_prompt`` in from the prompt when it was left empty before ``process``)."""
    if not getattr(p, "enable_hr", False):
        return False
    hr_prompt = getattr(p, "hr_prompt", "")
    return hr_prompt not in ("", getattr(p, "prompt", ""))


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
    """Strip bound ``<lora:>`` tags (host); in the UI, also check this batch now and stop before it samples when the
    user has to fix something (`preflight`, `stop_quietly`)."""
    state = state_of(p)
    if state is None:
        return
    if state.error is None and host is not None:
        try:
            host.before_process_batch(p, state.settings)
        except Exception as exc:  # the WebUI would only log it and generate without CLoRA
            state.error = _prepare_error(exc, "preparing the prompts")
    if is_api(p):
        return  # the API reports through p.sample, as an HTTP error
    if state.error is None and host is not None and state.settings is not None:
        found = preflight(p, host, state.settings)
        if found is not None:
            state.error = found
    if state.error is not None and not isinstance(state.error, _Bug):
        stop_quietly(p, state.error)


def on_process_batch(p: Any, host: Any) -> None:
    state = state_of(p)
    if state is None:
        return
    if state.error is None and host is not None:
        try:
            host.process_batch(p, state.settings)
        except Exception as exc:  # see on_before_process_batch
            state.error = _prepare_error(exc, "preparing this batch")
    if state.error is not None:
        install_error(p, state.error)
    _guard_sample(p)


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
        sample = getattr(p, "__dict__", {}).get("sample")
        if getattr(sample, "clora_guard", False):
            del p.sample


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
            out.append(mask_overlay(_to_pil(images[i]), masks[i], labels, concepts=concepts))
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
    ("[CLoRA] Attention maps from", str, "maps_from", lambda: ["both", "cond"]),
    ("[CLoRA] Predict again after the update", str, "predict_after_update", lambda: ["True", "False"]),
    ("[CLoRA] LoRA text encoders on the negative prompt", str, "negative_te_lora", lambda: ["True", "False"]),
    ("[CLoRA] Gradient memory", str, "grad_memory", lambda: list(GRAD_MEMORY)),
    ("[CLoRA] Attention layers", str, "map_layers", lambda: list(MAP_LAYERS)),
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
