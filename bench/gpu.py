"""GPU benchmark: CLoRA on the SD1.5 architecture with random weights (a script, not a test).

Prints wall time and peak memory of a plain generation and of CLoRA with 2/4/8 LoRAs, with and without refinement,
all in one run, plus each as a ratio of the plain generation.  The reference the issue gives (the authors' diffusers
pipeline on an H200, fp16, 512x512, 50 steps, CFG 7.5): 2 LoRAs 15.1 s / 16.2 GB without refinement, 37.3 s / 27.7 GB
with it; 8 LoRAs 60.6 s / 41.9 GB; plain 2.1 s / 2.6 GB.

    python bench/gpu.py                      # SD1.5 architecture, cuda, fp16, 512x512, 50 steps
    python bench/gpu.py --device cpu --arch tiny --size 128 --steps 3 --loras 2   # smoke run of the script itself
"""
from __future__ import annotations

from dataclasses import replace

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_model(arch: str, work: Path, device: str, dtype):
    """A random-weight LatentDiffusion of the SD1.5 (or the tests' tiny) architecture, as the runner's LoadedModel."""
    import torch
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig, CLIPTextModel

    from clora.runner import LoadedModel
    from ldm.util import instantiate_from_config
    from tools.clip_vocab import write_tokenizer_files

    clip_dir = work / "clip"
    write_tokenizer_files(clip_dir)
    if arch == "sd15":
        text_cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
        cfg = OmegaConf.load(str(ROOT / "clora" / "configs" / "v1-inference.yaml"))
    else:
        from tests.models import tiny_clip_config
        from tools.make_fixtures import tiny_sd1_config

        text_cfg = tiny_clip_config()
        cfg = OmegaConf.create(tiny_sd1_config(clip_dir))
    torch.manual_seed(0)
    CLIPTextModel(text_cfg).save_pretrained(str(clip_dir), safe_serialization=True)
    cfg.model.params.cond_stage_config["params"] = {"version": str(clip_dir), "device": device}
    model = instantiate_from_config(cfg.model)
    with torch.no_grad():  # ldm zero-initialises output layers: redraw them so the outputs vary
        for name, p in model.named_parameters():
            if p.dim() > 1 and float(p.abs().max()) == 0.0:
                p.normal_(0, 0.02)
    model = model.eval().to(device=device, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    model.cond_stage_model.device = device
    return LoadedModel(model=model, family="sd1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--arch", choices=("sd15", "tiny"), default="sd15")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--loras", default="2,4,8", help="LoRA counts to run, comma separated")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--memory-runs", type=int, default=20,
                    help="CLoRA generations (2 LoRAs) after which allocated memory is recorded (0: skip)")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from clora._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from clora.runner import generate
    from clora.settings import Binding, CloraSettings
    from tools.lora_writer import write_kohya

    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    work = Path(tempfile.mkdtemp(prefix="clora-gpu-bench-"))
    lm = build_model(args.arch, work, args.device, dtype)
    words = ["cat", "dog", "hat", "box", "car", "tree", "cup", "bird"]
    counts = [int(n) for n in args.loras.split(",") if n]
    files = [write_kohya(work / f"{w}.safetensors", lm.unet, lm.text_model, rank=args.rank, seed=i)
             for i, w in enumerate(words[: max(counts)])]
    prompt = "a photo of a " + ", a ".join(words[: max(counts)])

    def run(settings, loras=()):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            generate(lm, prompt, settings, loras=list(loras), steps=args.steps, cfg_scale=args.cfg, seed=1,
                     width=args.size, height=args.size, progress=False)
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        return time.perf_counter() - t0, peak

    run(CloraSettings())  # warm-up (kernels, allocator)
    rows = [("plain", *run(CloraSettings()))]
    for n in counts:
        binds = tuple(Binding(w, (w,), "") for w in words[:n])
        for refine in (0, 20):
            s = CloraSettings(enabled=True, bindings=binds, refine_iters=refine)
            rows.append((f"CLoRA {n} LoRAs, refinement {'3x20' if refine else 'off'}", *run(s, files[:n])))
            # the previous order: truncated gradient passes, then the prediction again on the updated latent
            old = replace(s, maps_from="cond", predict_after_update=True, negative_te_lora=False)
            rows.append((f"  same, previous order", *run(old, files[:n])))

    # memory over time: what stays allocated after each of many CLoRA generations (must not grow)
    allocated = []
    if args.memory_runs:
        s = CloraSettings(enabled=True, bindings=tuple(Binding(w, (w,), "") for w in words[:2]), refine_iters=0)
        for _ in range(args.memory_runs):
            run(s, files[:2])
            allocated.append(torch.cuda.memory_allocated() / 2**20 if cuda else float("nan"))

    dev = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"\n{args.arch} random weights, {dev}, {str(dtype).split('.')[-1]}, {args.size}x{args.size}, "
          f"{args.steps} steps, CFG {args.cfg}, rank-{args.rank} kohya LoRAs")
    print(f"{'case':40s} {'wall s':>8s} {'peak GB':>8s} {'x plain':>8s}")
    plain = rows[0][1]
    for name, t, peak in rows:
        print(f"{name:40s} {t:8.2f} {peak:8.2f} {t / plain:8.2f}")
    if allocated:
        print(f"allocated MiB after each of {len(allocated)} CLoRA generations (2 LoRAs): "
              + " ".join(f"{a:.1f}" for a in allocated) + f"; growth {allocated[-1] - allocated[0]:+.1f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "rows": [{"case": n, "seconds": t, "peak_gb": g} for n, t, g in rows],
            "allocated_mib_after_each_generation": allocated,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
