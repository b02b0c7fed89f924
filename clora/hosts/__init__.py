"""Host glue for the WebUIs, chosen by feature detection (never by version strings).

Each glue module (``a1111``, ``forge``) offers the same small interface, used by ``scripts/clora.py``:
``lora_names()``, ``trigger_words(name)``, ``before_process_batch(p, settings)``, ``process_batch(p, settings)``,
``postprocess_batch(p)`` and ``run_of(p)``.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["HostDetection", "detect", "detect_host"]


@dataclass(frozen=True)
class HostDetection:
    """What runs CLoRA here: ``host`` (a glue object) or ``None`` with ``message`` saying why not (a sentence
    without the ``CLoRA: `` prefix, which `clora.errors.user_message` adds where it is shown)."""

    host: Any
    kind: str  # "a1111", "forge" or "none"
    message: str = ""


def _has_module(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it (its parent packages may be imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def detect() -> HostDetection:
    """Forge when its ``backend.patcher`` package exists, else A1111 when `clora.hosts.a1111.is_available`."""
    if _has_module("backend") and _has_module("backend.patcher"):
        if not _has_module(f"{__name__}.forge"):
            return HostDetection(None, "forge", "Forge is not supported yet (no Forge glue is installed).")
        forge = importlib.import_module(f"{__name__}.forge")
        available = getattr(forge, "is_available", lambda: True)
        host_cls = getattr(forge, "ForgeHost", None)
        if host_cls is None or not available():
            return HostDetection(None, "forge", "This Forge version is not supported yet.")
        return HostDetection(host_cls(), "forge")
    from . import a1111

    if a1111.is_available():
        return HostDetection(a1111.A1111Host(), "a1111")
    return HostDetection(
        None, "none", "No supported WebUI found here (neither AUTOMATIC1111's CFGDenoiser nor Forge's backend)."
    )


def detect_host() -> Optional[Any]:
    """The host glue object, or ``None`` when CLoRA cannot run here (see `detect` for the reason)."""
    return detect().host
