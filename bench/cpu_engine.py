"""CPU benchmark of the CLoRA engine on the tiny random-weight SD1-style checkpoint (a script, not a test).

Prints, in one run, the wall time per sampling step of a plain generation and of CLoRA with 2 and 4 LoRAs (with
and without refinement), each as a ratio against the plain generation, for the default (the authors' order: one
forward with gradient per update that also gives the prediction) and for the previous order (``--previous``:
truncated gradient passes, then the prediction recomputed on the updated latent; maps from the cond rows; one shared
negative-prompt encoding), and the batched fused pass against one model call per variant.  Usage::

    OMP_NUM_THREADS=1 python bench/cpu_engine.py [--size 256] [--steps 10] [--repeats 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from clora._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from clora.runner import generate, load_model
    from clora.settings import Binding, CloraSettings
    from tests.models import fixtures_dir
    from tools.lora_writer import write_kohya

    lm = load_model(fixtures_dir() / "tiny-sd1.safetensors")
    words = ["cat", "dog", "hat", "box"]
    tmp = Path(tempfile.mkdtemp(prefix="clora-bench-"))
    files = [write_kohya(tmp / f"{w}.safetensors", lm.unet, lm.text_model, seed=i) for i, w in enumerate(words)]
    prompt = "a photo of a cat, a dog, a hat and a box"

    def timed(settings, loras=(), batched=None) -> float:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            generate(lm, prompt, settings, loras=list(loras), steps=args.steps, seed=1, width=args.size,
                     height=args.size, progress=False, batched=batched)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) / args.steps

    def clora(n, refine, previous=False):
        binds = tuple(Binding(w, (w,), "") for w in words[:n])
        s = CloraSettings(enabled=True, bindings=binds, refine_iters=refine)
        if previous and hasattr(s, "maps_from"):
            s = replace(s, maps_from="cond", predict_after_update=True, negative_te_lora=False)
        return s

    rows = []
    plain = timed(CloraSettings())
    rows.append(("plain generation", plain))
    for n in (2, 4):
        for previous in (False, True):
            tag = " [previous order]" if previous else ""
            rows.append((f"CLoRA {n} LoRAs, no refinement{tag}", timed(clora(n, 0, previous), files[:n])))
            rows.append((f"CLoRA {n} LoRAs, refinement 3 x 5{tag}", timed(clora(n, 5, previous), files[:n])))
    no_update = lambda n: replace(clora(n, 0), step_size=0.0)  # noqa: E731  fused pass only
    batched2 = timed(no_update(2), files[:2], batched=True)
    separate2 = timed(no_update(2), files[:2], batched=False)
    batched4 = timed(no_update(4), files[:4], batched=True)
    separate4 = timed(no_update(4), files[:4], batched=False)

    print(f"\ntiny SD1 checkpoint, {args.size}x{args.size}, {args.steps} steps, Euler, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print(f"{'case':55s} {'s/step':>8s} {'x plain':>8s}")
    for name, t in rows:
        print(f"{name:55s} {t:8.3f} {t / plain:8.2f}")
    print("\nfused pass only (no latent update): batched rows vs one call per variant (the default on the CPU)")
    for n, b, s in ((2, batched2, separate2), (4, batched4, separate4)):
        print(f"{n} LoRAs: batched {b:.3f} s/step, per variant {s:.3f} s/step, per-variant / batched = {s / b:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
