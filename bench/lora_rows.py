"""Benchmark: one batched per-row LoRA forward (3 variants, 3 LoRAs) vs 3 forwards of merged-weight copies.

Prints, per model, the median time (ms) of
  plain     one batched forward of 3 rows without any LoRA (the baseline),
  per-row   one batched forward of 3 rows through `LoraRows`, row i seeing LoRA i alone,
  merged    3 forwards of 1 row each, each on a copy with its LoRA merged into the weights (merge time excluded),
and the ratios per-row / merged and per-row / plain.  CPU, one thread, random weights, real ldm architectures.

    OMP_NUM_THREADS=1 .venv/bin/python bench/lora_rows.py [--repeats 7] [--rank 16] [--layout lora|loha]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from clora._compat import ensure_torchvision_importable  # noqa: E402
from clora.lora.rows import LoraRows, RowPlan  # noqa: E402
from clora.lora.types import LoraModule  # noqa: E402

Targets = list[tuple[nn.Module, int, LoraModule]]


def make_lora(module: nn.Module, layout: str, rank: int, g: torch.Generator, key: str) -> LoraModule:
    """A random LoRA module for ``module`` (kohya ``lora``/LoCon, or ``loha`` through the dense path)."""
    w = module.weight
    out, inp, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
    std = 0.5 / w[0].numel() ** 0.5
    if layout == "loha":
        t = {n: torch.randn(*s, generator=g) * (std**0.5 if n.endswith("_b") else 1.0) / rank**0.5
             for n, s in (("hada_w1_a", (out, rank)), ("hada_w1_b", (rank, w[0].numel())),
                          ("hada_w2_a", (out, rank)), ("hada_w2_b", (rank, w[0].numel())))}
        return LoraModule(key, "loha", t, alpha=float(rank))
    down = torch.randn(rank, inp, *kernel, generator=g)
    up = torch.randn(out, rank, *((1, 1) if kernel else ()), generator=g) * std / rank**0.5
    return LoraModule(key, "lora", {"down": down, "up": up}, alpha=float(rank))


def all_targets(model: nn.Module, n_loras: int, layout: str, rank: int) -> Targets:
    g = torch.Generator().manual_seed(0)
    return [(m, i, make_lora(m, layout, rank, g, f"lora{i}_{name}"))
            for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            for i in range(n_loras)]


def merged(model: nn.Module, targets: Targets, index: int) -> nn.Module:
    names = {id(m): n for n, m in model.named_modules()}
    copy_ = copy.deepcopy(model)
    layers = dict(copy_.named_modules())
    with torch.no_grad():
        for module, i, lm in targets:
            if i == index:
                w = layers[names[id(module)]].weight
                w += lm.dense_delta(w)
    return copy_


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms of each function, timed round-robin so that load changes on a shared machine hit all alike."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def bench_model(name: str, model: nn.Module, call: Callable[[nn.Module, slice], torch.Tensor],
                layout: str, rank: int, repeats: int) -> dict[str, object]:
    """``call(model, rows)`` runs ``model`` on the batch rows ``rows`` of fixed inputs."""
    targets = all_targets(model, 3, layout, rank)
    copies = [merged(model, targets, i) for i in range(3)]
    plan = RowPlan.from_lists([[(0, 1.0)], [(1, 1.0)], [(2, 1.0)]])
    every = slice(0, 3)
    bare = copy.deepcopy(model)  # never hooked: the plain baseline
    rows = LoraRows(targets)

    def per_row() -> torch.Tensor:
        with rows.use(plan):
            return call(model, every)

    def plain() -> torch.Tensor:
        return call(bare, every)

    def separate() -> list[torch.Tensor]:
        return [call(c, slice(i, i + 1)) for i, c in enumerate(copies)]

    with torch.no_grad(), rows:
        ms = interleaved_medians({"plain": plain, "per_row": per_row, "merged": separate}, repeats)
        got, want = per_row(), torch.cat(separate())
    err = ((got - want).norm() / want.norm()).item()
    return {"model": name, "layers": len({id(m) for m, _, _ in targets}), **ms, "err": err}


def tiny_unet_case(size: int) -> tuple[nn.Module, Callable[[nn.Module, slice], torch.Tensor]]:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2, 2, 2],
                     attention_resolutions=[4, 2, 1], num_res_blocks=2, num_heads=2, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=64, use_checkpoint=False, legacy=False).eval()
    x, t, ctx = torch.randn(3, 4, size, size), torch.tensor([10, 500, 900]), torch.randn(3, 77, 64)
    return unet, lambda m, r: m(x[r], t[r], context=ctx[r])


def sd15_blocks_case(base: int) -> tuple[nn.Module, Callable[[nn.Module, slice], torch.Tensor]]:
    """SD1.5's three SpatialTransformer widths at the token counts of a ``8*base`` px image's down path."""
    from ldm.modules.attention import SpatialTransformer

    torch.manual_seed(0)
    widths = [(320, base), (640, base // 2), (1280, base // 4)]
    blocks = nn.ModuleList(SpatialTransformer(c, 8, c // 8, depth=1, context_dim=768, use_checkpoint=False)
                           for c, _ in widths).eval()
    xs = [torch.randn(3, c, s, s) for c, s in widths]
    ctx = torch.randn(3, 77, 768)

    def call(m: nn.Module, r: slice) -> torch.Tensor:
        return torch.cat([blk(x[r], context=ctx[r]).flatten(1) for blk, x in zip(m, xs)], dim=1)

    return blocks, call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layout", choices=["lora", "loha"], default="lora")
    parser.add_argument("--unet-size", type=int, default=32, help="tiny UNet latent side")
    parser.add_argument("--sd15-tokens", type=int, default=32, help="side of the 320-channel block's token grid")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ensure_torchvision_importable()

    cases = [
        (f"tiny UNet {args.unet_size}x{args.unet_size}", tiny_unet_case(args.unet_size)),
        (f"SD1.5 attn blocks 320@{args.sd15_tokens}² 640@{args.sd15_tokens // 2}² 1280@{args.sd15_tokens // 4}²",
         sd15_blocks_case(args.sd15_tokens)),
    ]
    print(f"batch 3, 3 LoRAs ({args.layout}, rank {args.rank}) on every Linear/Conv2d, 1 thread, "
          f"median of {args.repeats}")
    header = f"{'model':52} {'layers':>6} {'plain ms':>9} {'per-row ms':>10} {'3x merged ms':>12} " \
             f"{'per-row/merged':>14} {'per-row/plain':>13} {'rel err':>8}"
    print(header)
    for name, (model, call) in cases:
        r = bench_model(name, model, call, args.layout, args.rank, args.repeats)
        print(f"{r['model']:52} {r['layers']:>6} {r['plain']:>9.1f} {r['per_row']:>10.1f} {r['merged']:>12.1f} "
              f"{r['per_row'] / r['merged']:>14.2f} {r['per_row'] / r['plain']:>13.2f} {r['err']:>8.1e}")


if __name__ == "__main__":
    main()
