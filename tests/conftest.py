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
