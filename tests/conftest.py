import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# 2 cores shared with other work: more than one intra-op thread thrashes (see the project's CI notes).
torch.set_num_threads(1)

from clora._compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def oc_model():
    """The tiny SDXL (unet, te1, te2) with te2 as an open_clip tower (A1111's layout); one per test module."""
    from tests.models import make_tiny_sdxl

    return make_tiny_sdxl("open_clip")


@pytest.fixture(scope="module")
def hf_model():
    """The tiny SDXL (unet, te1, te2) with te2 as transformers' CLIPTextModelWithProjection (Forge's layout)."""
    from tests.models import make_tiny_sdxl

    return make_tiny_sdxl("hf")


def pytest_terminal_summary(terminalreporter) -> None:
    """The real-tool LoRA files (tests/test_lora_real_tools.py): the layouts covered and each one's worst ΔW error."""
    module = sys.modules.get("tests.test_lora_real_tools")
    results = getattr(module, "RESULTS", None)
    if not results:
        return
    tr = terminalreporter
    tr.write_sep("-", f"real-tool LoRA files: {len(results)} files/layouts checked against the tools' own forward")
    for name, r in results.items():
        tr.write_line(f"{name:26s} {r['dtype']:9s} {r['modules']:4d} modules ({r['conv']:3d} conv)  "
                      f"worst max|ΔW - ΔW_tool| / max|ΔW_tool| = {r['worst']:.2e}")
