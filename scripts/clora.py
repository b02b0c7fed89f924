"""CLoRA — the AlwaysOn script of the sd-webui-clora extension (AUTOMATIC1111 WebUI 1.8+, Forge).

Thin on purpose: the accordion is built by `clora.ui`, every hook delegates to `clora.hosts.webui` and to the host
glue chosen by `clora.hosts.detect` (feature detection).  See README for the API and infotext forms.

Importing this file adds the extension folder to ``sys.path`` when ``clora`` is not importable yet; inside a WebUI
(``modules.script_callbacks`` importable) it also registers the X/Y/Z plot axes and the ``/clora/*`` API routes —
the WebUI clears its callbacks before it (re)loads scripts, so this is the place its API expects.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _ensure_clora_importable() -> None:
    if importlib.util.find_spec("clora") is None:
        root = str(Path(__file__).resolve().parent.parent)
        if root not in sys.path:
            sys.path.insert(0, root)


_ensure_clora_importable()

from modules import scripts  # noqa: E402  (the WebUI's script API)

from clora.hosts import HostDetection, detect  # noqa: E402
from clora.hosts import webui as glue  # noqa: E402


def _detect_safely() -> HostDetection:
    try:
        return detect()
    except Exception as exc:  # a broken host must not break the WebUI's start-up
        from clora.errors import detail

        return HostDetection(None, "none", f"Could not start here: {detail(exc)}")


class CloraScript(scripts.Script):
    """CLoRA: several LoRAs composed in one image, each bound to the subject words of the prompt."""

    def title(self) -> str:
        return "CLoRA"

    def show(self, is_img2img: bool):
        return scripts.AlwaysVisible

    @property
    def detection(self) -> HostDetection:
        """Which host glue runs CLoRA (looked up once per script object; holds no generation state)."""
        found = self.__dict__.get("_clora_detection")
        if found is None:
            found = _detect_safely()
            self.__dict__["_clora_detection"] = found
        return found

    def ui(self, is_img2img: bool):
        from clora.ui import build_ui

        d = self.detection
        sources = glue.trigger_sources if d.host is not None else None
        components, fields = build_ui(is_img2img, d.host, message=d.message, trigger_sources=sources)
        self.infotext_fields = fields
        self.paste_field_names = [key for _, key in fields]
        return components

    def process(self, p, *args):
        glue.on_process(p, args, self.detection.host, self.detection.message)

    def before_process_batch(self, p, *args, **kwargs):
        glue.on_before_process_batch(p, self.detection.host)

    def process_batch(self, p, *args, **kwargs):
        glue.on_process_batch(p, self.detection.host)

    def process_before_every_sampling(self, p, *args, **kwargs):
        """Forge's hook (before every sampling pass); A1111 1.8 never calls it."""
        host = self.detection.host
        hook = getattr(host, "process_before_every_sampling", None)
        state = glue.state_of(p)
        if hook is not None and state is not None and state.error is None:
            hook(p, state.settings)

    def postprocess_batch(self, p, *args, **kwargs):
        glue.on_postprocess_batch(p, self.detection.host, kwargs.get("images"))

    def postprocess(self, p, processed, *args):
        glue.on_postprocess(p, processed)


def _register_callbacks() -> None:
    try:
        from modules import script_callbacks
    except ImportError:
        return
    script_callbacks.on_before_ui(glue.register_xyz_axes)
    script_callbacks.on_app_started(lambda demo, app: glue.add_routes(app, _detect_safely))


_register_callbacks()
