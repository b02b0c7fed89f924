"""GPU benchmark: CLoRA on the SD1.5 architecture with random weights (a script, not a test).

Prints wall time and peak memory of a plain generation and of CLoRA with 2/4/8 LoRAs, with and without refinement,
all in one run, plus each as a ratio of the plain generation.  The reference the issue gives (the authors' diffusers
pipeline on an H200, fp16, 512x512, 50 steps, CFG 7.5): 2 LoRAs 15.1 s / 16.2 GB without refinement, 37.3 s / 27.7 GB
with it; 8 LoRAs 60.6 s / 41.9 GB; plain 2.1 s / 2.6 GB.

    python bench/gpu.py                      # SD1.5 architecture, cuda, fp16, 512x512, 50 steps
    python bench/gpu.py --device cpu --arch tiny --size 128 --steps 3 --loras 2   # smoke run of the script itself

SDXL (issue 11): ``--arch sdxl`` times one optimised step (the engine's latent update with the default order: one
gradient pass that also gives the prediction; no refinement) per ``grad_memory`` mode, 2 and 4 bindings at 1024²,
on the full-size SDXL UNet with random fp16 weights (built by bench/sdxl_memory.py's `build_unet`, the model the
memory/FLOP count uses), against a plain CFG step (one no-grad call over 2 rows), and its peak memory
(``torch.cuda.max_memory_allocated``, weights included).  Attention: torch SDPA (``--attention ldm`` for ldm's own).

    python bench/gpu.py --arch sdxl                         # needs a GPU with room for the batched mode's ~50 GiB
    python bench/gpu.py --arch sdxl --modes checkpoint,per_variant_checkpoint --loras 2
    python bench/gpu.py --arch tiny-sdxl --device cpu --size 128 --loras 2 --repeat 1   # smoke run here
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
    ap.add_argument("--arch", choices=("sd15", "tiny", "sdxl", "tiny-sdxl"), default="sd15")
    ap.add_argument("--size", type=int, default=None, help="image side (default 512; 1024 for sdxl)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--loras", default="2,4,8", help="LoRA counts to run, comma separated")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--memory-runs", type=int, default=20,
                    help="CLoRA generations (2 LoRAs) after which allocated memory is recorded (0: skip)")
    ap.add_argument("--modes", default="batched,per_variant,checkpoint,per_variant_checkpoint",
                    help="sdxl: grad_memory modes to time, comma separated")
    ap.add_argument("--attention", choices=("sdpa", "ldm"), default="sdpa", help="sdxl: attention implementation")
    ap.add_argument("--layers", default="all", help="sdxl: map_layers choices to time, comma separated (all, down, "
                                                    "mid, up)")
    ap.add_argument("--repeat", type=int, default=3, help="sdxl: timed repetitions of each case (median)")
    args = ap.parse_args(argv)
    if args.size is None:
        args.size = 1024 if args.arch == "sdxl" else 512
    if args.arch in ("sdxl", "tiny-sdxl"):
        return sdxl_main(args)

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


def sdxl_main(args) -> int:
    """Time ratio and peak memory of one optimised step per grad_memory mode on an SDXL-layout UNet."""
    import statistics
    from dataclasses import replace

    import torch

    from bench.sdxl_memory import build_unet, use_sdpa
    from bench.sdxl_unet import make_sdxl_unet, tiny_sdxl_unet_config
    from clora.attention import AttentionCapture, map_size
    from clora.compose import ComposePlan, Composer
    from clora.lora.rows import LoraRows
    from clora.settings import Binding, CloraSettings

    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    if args.arch == "sdxl":
        unet = build_unet("sdxl", device=args.device, dtype=dtype, seed=0)
        ctx_dim, adm = 2048, 2816
    else:
        cfg = tiny_sdxl_unet_config()
        unet = make_sdxl_unet(cfg, device=args.device, dtype=dtype, seed=0)
        ctx_dim, adm = cfg["context_dim"], cfg["adm_in_channels"]
    if args.attention == "sdpa":
        use_sdpa(unet)
    latent = args.size // 8
    maps = map_size((latent, latent), 4)
    g = torch.Generator().manual_seed(0)
    counts = [int(n) for n in args.loras.split(",") if n]
    modes = [m for m in args.modes.split(",") if m]
    layer_choices = [v for v in args.layers.split(",") if v]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def model(xr, sr, cr):
        return unet(xr, timesteps=sr, context=cr, y=y.expand(xr.shape[0], -1))

    def timed(fn):
        times, peak = [], 0.0
        for _ in range(max(1, args.repeat)):
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
                fn()
            sync()
            times.append(time.perf_counter() - t0)
            if cuda:
                peak = max(peak, torch.cuda.max_memory_allocated() / 2**30)
        return statistics.median(times), (peak if cuda else float("nan"))

    x = torch.randn(1, 4, latent, latent, generator=g).to(args.device, dtype)
    y = torch.randn(1, adm, generator=g).to(args.device, dtype)
    sigma = torch.full((1,), 500.0, device=args.device)
    rows = []
    capture = AttentionCapture(unet)  # shared: the H/32 layers' order, learnt once, is kept as within a generation
    with torch.no_grad():
        c2 = torch.randn(2, 77, ctx_dim, generator=g).to(args.device, dtype)
        timed(lambda: model(x.expand(2, -1, -1, -1), sigma.expand(2), c2))  # warm-up
        plain_t, plain_peak = timed(lambda: model(x.expand(2, -1, -1, -1), sigma.expand(2), c2))
    rows.append({"case": "plain CFG step", "seconds": plain_t, "peak_gib": plain_peak})
    for n in counts:
        V = n + 1
        settings = CloraSettings(enabled=True, bindings=tuple(Binding(f"l{k}", (f"w{k}",)) for k in range(n)),
                                 refine_iters=0)
        plan = ComposePlan(groups=[[[2 + k]] * V for k in range(n)], mask_tokens=[[]] + [[2 + k] for k in range(n)],
                           cond_loras=[[] for _ in range(V)], uncond_loras=[[] for _ in range(V)])
        conds = torch.randn(V, 1, 77, ctx_dim, generator=g).to(args.device, dtype)
        unconds = torch.randn(V, 1, 77, ctx_dim, generator=g).to(args.device, dtype)
        for mode, layers in [(m, v) for v in layer_choices for m in modes]:
            def step(mode=mode, layers=layers):
                comp = Composer(settings=replace(settings, grad_memory=mode, map_layers=layers), plan=plan,
                                rows=LoraRows([]), capture=capture, unet=unet, map_size=maps,
                                total_steps=50, space="eps")
                with torch.no_grad():
                    comp(x.clone(), sigma, unconds, conds, model, 0)

            try:
                step()  # warm-up (and the first, complete pass that records the layer order)
                t, peak = timed(step)
            except torch.cuda.OutOfMemoryError if cuda else MemoryError:
                t, peak = float("nan"), float("inf")
                if cuda:
                    torch.cuda.empty_cache()
            label = f"{n} bindings, {mode}" + ("" if layers == "all" else f", {layers} layers")
            rows.append({"case": label, "seconds": t, "peak_gib": peak})

    dev = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"\n{args.arch} UNet, random weights, {dev}, {str(dtype).split('.')[-1]}, {args.size}x{args.size}, "
          f"attention {args.attention}; one optimised step (the H/32 layer order already known, as after a "
          f"generation's first step)")
    print(f"{'case':40s} {'seconds':>8s} {'peak GiB':>9s} {'x plain':>8s}")
    for r in rows:
        print(f"{r['case']:40s} {r['seconds']:8.3f} {r['peak_gib']:9.2f} {r['seconds'] / plain_t:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
