"""Small environment shims used by the standalone runner and the tests (never by the WebUI glue)."""
from __future__ import annotations

import sys

_TV_LIB = None


def ensure_torchvision_importable() -> None:
    """Make ``import torchvision`` work beside a torch build it was not compiled for.

    PyPI's torchvision wheel beside the CPU torch wheel dies at import with
    ``operator torchvision::nms does not exist``: its meta registrations refer to ops whose compiled library
    did not load.  ldm, k-diffusion and open_clip import torchvision only for pure-Python helpers, so declaring
    the two op schemas (without kernels) before the first import is enough.  A working torchvision is left alone.
    """
    global _TV_LIB
    if "torchvision" in sys.modules:
        return
    import torch

    try:
        import torchvision  # noqa: F401
        return
    except (RuntimeError, ImportError) as exc:  # pragma: no cover - depends on the wheel pair
        if "torchvision::nms" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _TV_LIB = torch.library.Library("torchvision", "DEF")
    _TV_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811
