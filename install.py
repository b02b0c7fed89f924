"""Extension install script (run by the AUTOMATIC1111 / Forge WebUI at start-up).

CLoRA needs nothing beyond what the WebUI itself ships (torch, numpy, safetensors), so this script installs nothing:
it only checks that those modules can be found and says clearly which are missing.  With the WebUI's
``--skip-install`` it does nothing at all.  Importing it (as the tests do) has no side effects.
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Iterable, Optional

REQUIRED_MODULES = ("torch", "numpy", "safetensors")


def missing_modules(names: Optional[Iterable[str]] = None) -> list[str]:
    """The names among ``names`` (default ``REQUIRED_MODULES``) that cannot be found; nothing is imported."""
    wanted = REQUIRED_MODULES if names is None else names
    return [name for name in wanted if importlib.util.find_spec(name) is None]


def skip_install_requested() -> bool:
    """True when the host WebUI was started with ``--skip-install`` (False outside the WebUI)."""
    launch = sys.modules.get("launch")
    if launch is None:
        try:
            import launch  # type: ignore[import-not-found,no-redef]
        except Exception:  # not inside the WebUI (or its launcher failed to import): nothing to respect
            return False
    return bool(getattr(getattr(launch, "args", None), "skip_install", False))


def main() -> int:
    """Check the requirements; print one plain message when something is missing.  Always returns 0."""
    if skip_install_requested():
        return 0
    missing = missing_modules()
    if missing:
        print(
            "[sd-webui-clora] these Python packages are missing from the WebUI's environment: "
            + ", ".join(missing)
            + ". They normally ship with the WebUI; reinstall the WebUI's requirements. CLoRA cannot run without them."
        )
    return 0


if __name__ == "__main__":
    main()
