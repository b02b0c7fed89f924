"""Memory and FLOPs of one CLoRA gradient pass per ``grad_memory`` mode, full-size models, no real memory (a script).

The UNet (SDXL base at 1024², latent 128², maps 32²; SD1.5 at 512² for reference) is built on the meta device and
its parameters replaced by CPU tensors of torch's ``FakeTensorMode``: every op runs on shapes only, under CPU fp16
autocast with fp16 weights (A1111/Forge run the UNet in fp16 under autocast).  The engine's own code runs:
``Composer._grad_pass`` with each mode, ``full=True`` (an optimised step in the default order: the pass also gives
the prediction) and ``full=False`` (a refinement iteration / ``predict_after_update``), ``maps_from = "both"`` (the
default: uncond and cond rows of every variant, 2·V rows), one image.  The loss is replaced by a sum over the maps
(the real one needs values; its size is negligible: maps are rows × 32 × 32 × 77).  No LoRA is attached (LoRA rows
add rank-r intermediates, a few % of the activations).

Counted per pass:

* saved: bytes of the tensors autograd keeps for the backward pass (``saved_tensors_hooks``), deduplicated by
  storage, parameters excluded.  Per model call; a "per_variant" pass frees each variant's graph before the next,
  so its figure is the largest call's.  With recomputation the kept tensors are the units' inputs (which
  ``torch.utils.checkpoint`` holds itself, counted here through pre-hooks) plus what the ops outside the units save;
  the backward pass then recomputes one unit at a time, whose own saved bytes ("+unit") come on top at the peak.
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over forward, backward and recomputation (matmuls,
  convolutions and attention kernels; elementwise ops are not counted by torch's counter).

Against a plain CFG step: one no-grad forward over 2 rows (uncond, cond).  Two attention implementations:
``ldm`` (ldm's ``CrossAttention``: einsum, softmax, einsum; its probability matrices are saved) and ``sdpa``
(``torch.nn.functional.scaled_dot_product_attention``, what A1111 ``--opt-sdp-attention`` and Forge use; the kernel
the CPU dispatcher picks here is named in the output; on CUDA the flash / memory-efficient kernels save the same
set: q, k, v, output and the log-sum-exp).

    python bench/sdxl_memory.py                          # SDXL 1024² and SD1.5 512², 2 and 4 bindings, both paths
    python bench/sdxl_memory.py --arch sdxl --bindings 2 --attention sdpa --json out.json
    python bench/sdxl_memory.py --arch sdxl --bindings 2 --attention sdpa --layers all,down,mid,up   # map_layers
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

GIB = 2**30
MODES = ("batched", "per_variant", "checkpoint", "per_variant_checkpoint")
TARGET_GIB = 12.0

#: arch -> image side measured (SD1.5's UNet config is tests.models.sd15_unet_config)
ARCHS = {"sdxl": 1024, "sd15": 512}


def build_unet(arch: str, device: Any = "meta", dtype: torch.dtype = torch.float16, seed=None) -> nn.Module:
    """The full-size UNet of ``arch`` (``"sdxl"`` or ``"sd15"``) in ldm layout; shared with bench/gpu.py."""
    from bench.sdxl_unet import make_sdxl_unet, sdxl_unet_config

    if arch == "sdxl":
        return make_sdxl_unet(sdxl_unet_config(), device=device, dtype=dtype, seed=seed)
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    from tests.models import redraw_zero_layers, sd15_unet_config

    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        unet = UNetModel(**sd15_unet_config())
    if seed is not None and str(device) != "meta":
        with torch.no_grad():
            redraw_zero_layers(unet, torch.Generator().manual_seed(seed))
    unet = unet.to(dtype=dtype).eval()
    unet.dtype = dtype
    for p in unet.parameters():
        p.requires_grad_(False)
    return unet


def use_sdpa(unet: nn.Module) -> int:
    """Every ldm ``CrossAttention`` (attn1 and attn2) of ``unet`` computes with torch's SDPA (instance forward)."""
    import torch.nn.functional as F

    n = 0
    for name, m in unet.named_modules():
        if not (name.endswith(".attn1") or name.endswith(".attn2")):
            continue

        def forward(x, context=None, mask=None, m=m):
            h = m.heads
            ctx = x if context is None else context
            q, k, v = m.to_q(x), m.to_k(ctx), m.to_v(ctx)
            b, n_q, inner = q.shape
            q, k, v = (t.reshape(b, -1, h, inner // h).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v)
            return m.to_out(out.transpose(1, 2).reshape(b, n_q, inner))

        m.forward = forward
        n += 1
    return n


def fake_parameters(unet: nn.Module, mode) -> nn.Module:
    """Replace the (meta) parameters and buffers by CPU fake tensors of ``mode`` (shapes and dtypes kept)."""
    with mode:
        for m in unet.modules():
            for k, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[k] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cpu"),
                                                    requires_grad=False)
            for k, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[k] = torch.empty(b.shape, dtype=b.dtype, device="cpu")
    return unet


class _Counter:
    """Saved-for-backward bytes per model call (deduplicated by storage), and the largest recomputation unit's own."""

    def __init__(self, unet: nn.Module) -> None:
        self.params = {p.untyped_storage()._cdata for p in unet.parameters()}
        self.calls: list[dict[int, int]] = []
        self.unit_stack: list[int] = []
        self.unit_bytes: dict[int, dict[int, int]] = {}

    def new_call(self) -> None:
        self.calls.append({})

    def _add(self, t: torch.Tensor) -> None:
        if not self.calls:
            self.new_call()
        st = t.untyped_storage()
        if st._cdata in self.params:
            return
        self.calls[-1][st._cdata] = st.nbytes()
        if self.unit_stack:
            self.unit_bytes.setdefault(self.unit_stack[-1], {})[st._cdata] = st.nbytes()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self._add(t)
        return t

    def hooks(self) -> contextlib.AbstractContextManager:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def unit_hooks(self, unet: nn.Module, recompute: bool):
        """Pre/post hooks on the recomputation units: which unit is running (for the "+unit" figure, measured
        without recomputation), and, with it, the units' inputs that the checkpoint keeps."""
        from clora.attention import recompute_units

        handles = []
        for unit in recompute_units(unet):
            def pre(mod, args, kwargs, key=id(unit)):
                if torch.is_grad_enabled():
                    if recompute:
                        for a in list(args) + list(kwargs.values()):
                            if isinstance(a, torch.Tensor):
                                self._add(a)
                    self.unit_stack.append(key)

            def post(mod, args, kwargs, out, key=id(unit)):
                if self.unit_stack and self.unit_stack[-1] == key:
                    self.unit_stack.pop()

            handles.append(unit.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(unit.register_forward_hook(post, with_kwargs=True, always_call=True))
        return handles

    @property
    def largest_call(self) -> int:
        return max((sum(c.values()) for c in self.calls), default=0)

    @property
    def largest_unit(self) -> int:
        return max((sum(u.values()) for u in self.unit_bytes.values()), default=0)


def _cpu_flash_formulas() -> dict:
    """FLOP formulas for the CPU flash-attention kernel SDPA dispatches to here (torch's counter knows the CUDA
    kernels only): the same counts as for those (``sdpa_flop_count`` / ``sdpa_backward_flop_count``)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    out = {}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None:
        out[fwd] = lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)
    if bwd is not None:
        out[bwd] = lambda go, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(go, q, k, v)
    return out


def _conditioning(arch: str) -> tuple[int, int]:
    """(context width, vector-conditioning width) of ``arch``."""
    return (2048, 2816) if arch == "sdxl" else (768, 0)


def measure(arch: str, bindings: int, attention: str, modes=MODES, refine: bool = False, log=print,
            layer_choices=("all",)) -> dict[str, Any]:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from clora.compose import ComposePlan, Composer
    from clora.settings import Binding, CloraSettings

    size = ARCHS[arch]
    latent = size // 8
    ctx_dim, adm = _conditioning(arch)
    fake = FakeTensorMode()
    unet = fake_parameters(build_unet(arch, "meta"), fake)
    if attention == "sdpa":
        use_sdpa(unet)
    V = bindings + 1

    class Counting(Composer):
        def _loss_from_maps(self, maps):  # the real loss needs values; this one has the same inputs
            return maps.float().sum()

    settings = CloraSettings(enabled=True, bindings=tuple(Binding(f"l{k}", (f"w{k}",)) for k in range(bindings)),
                             refine_iters=0)
    plan = ComposePlan(groups=[[[2 + k]] * V for k in range(bindings)], mask_tokens=[[]] + [[2 + k] for k in range(bindings)],
                       cond_loras=[[] for _ in range(V)], uncond_loras=[[] for _ in range(V)])
    counter = _Counter(unet)
    attention_ops: set[str] = set()

    with fake:
        x = torch.empty(1, 4, latent, latent, dtype=torch.float16)
        conds = torch.empty(V, 1, 77, ctx_dim, dtype=torch.float16)
        unconds = torch.empty(V, 1, 77, ctx_dim, dtype=torch.float16)
        sigma = torch.full((1,), 5.0)
        y = torch.empty(1, adm, dtype=torch.float16) if adm else None

    def model(xr, sr, cr):
        counter.new_call()
        extra = {} if y is None else {"y": y.expand(xr.shape[0], -1)}
        return unet(xr, timesteps=sr, context=cr, **extra)

    def flops_of(fn) -> int:
        with FlopCounterMode(display=False, custom_mapping=_cpu_flash_formulas()) as fc:
            fn()
        for op in fc.get_flop_counts().get("Global", {}):
            if "attention" in str(op):
                attention_ops.add(str(op))
        return int(fc.get_total_flops())

    results: dict[str, Any] = {"arch": arch, "size": size, "bindings": bindings, "variants": V, "attention": attention}
    with fake, torch.autocast("cpu", dtype=torch.float16):
        t0 = time.perf_counter()
        with torch.no_grad():
            plain = flops_of(lambda: model(x.expand(2, -1, -1, -1), sigma.expand(2), torch.cat([unconds[0], conds[0]])))
        results["plain_gflops"] = plain / 1e9
        for layers in layer_choices:
            _measure_layers(results, layers, Counting, settings, plan, unet, model, counter, flops_of, plain, x, sigma,
                            conds, unconds, latent, V, modes, refine, log)
        results["seconds"] = time.perf_counter() - t0
    results["attention_kernels"] = sorted(attention_ops)
    results["weights_gib"] = sum(p.numel() * p.element_size() for p in unet.parameters()) / GIB
    return results


def _measure_layers(results, layers, Counting, settings, plan, unet, model, counter, flops_of, plain, x, sigma, conds,
                    unconds, latent, V, modes, refine, log) -> None:
    """The passes of every mode with ``map_layers = layers``; keys ``mode/pass`` ("all") or ``mode/pass/layers``."""
    from clora.attention import AttentionCapture, map_size
    from clora.lora.rows import LoraRows

    settings = replace(settings, map_layers=layers)
    base = Counting(settings=replace(settings, grad_memory="batched"), plan=plan, rows=LoraRows([]),
                    capture=AttentionCapture(unet), unet=unet, map_size=map_size((latent, latent), 4),
                    total_steps=50)
    with torch.no_grad():  # one complete pass records the layer order (the engine's first pass does the same)
        base.capture.configure(size=base.map_size, grad=False)
        with base._hooks():
            base.capture.run(model, x, sigma, conds[0])
    order = (base.capture._order, base.capture._order_size)
    results["h32_layers" if layers == "all" else f"h32_layers/{layers}"] = len(order[0])
    # one unit's own saved bytes (the recomputation peak's extra), from an un-recomputed pass over 2·V rows
    handles = counter.unit_hooks(unet, recompute=False)
    try:
        counter.calls.clear()
        counter.unit_bytes.clear()  # (what the passes of an earlier choice left)
        with counter.hooks():
            base._grad_pass(x, sigma, unconds, conds, model, full=False)
    finally:
        for h in handles:
            h.remove()
    unit_all_rows = counter.largest_unit
    counter.unit_bytes.clear()
    for mode in modes:
        for full in ((True, False) if refine else (True,)):
            comp = Counting(settings=replace(settings, grad_memory=mode), plan=plan, rows=LoraRows([]),
                            capture=AttentionCapture(unet), unet=unet, map_size=base.map_size, total_steps=50)
            comp.capture._order, comp.capture._order_size = order
            per_variant, recompute = comp.grad_memory_mode()
            counter.calls.clear()
            handles = counter.unit_hooks(unet, recompute=recompute)
            try:
                with counter.hooks():
                    fl = flops_of(lambda: comp._grad_pass(x, sigma, unconds, conds, model, full=full))
            finally:
                for h in handles:
                    h.remove()
            saved = counter.largest_call
            extra = (unit_all_rows // V if per_variant else unit_all_rows) if recompute else 0
            key = f"{mode}/{'step' if full else 'refine'}" + ("" if layers == "all" else f"/{layers}")
            results[key] = {"saved_gib": saved / GIB, "unit_gib": extra / GIB, "peak_gib": (saved + extra) / GIB,
                            "gflops": fl / 1e9, "x_plain_flops": fl / plain, "calls": len(counter.calls)}
            log(f"  {results['arch']} {results['attention']} {results['bindings']} bindings {key:34s} saved "
                f"{saved / GIB:7.2f} GiB (+unit {extra / GIB:5.2f})  {fl / 1e9:9.0f} GFLOP = {fl / plain:5.2f}x plain")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sdxl,sd15", help="comma separated: sdxl, sd15")
    ap.add_argument("--bindings", default="2,4", help="binding counts, comma separated")
    ap.add_argument("--attention", default="ldm,sdpa", help="comma separated: ldm, sdpa")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--refine", action="store_true", help="also count a refinement iteration's pass (full=False)")
    ap.add_argument("--layers", default="all", help="map_layers choices, comma separated: all, down, mid, up")
    ap.add_argument("--json", help="write the results here (a list; appended to when the file exists)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from clora._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import warnings

    warnings.filterwarnings("ignore")
    out = []
    modes = tuple(m for m in args.modes.split(",") if m)
    for arch in [a for a in args.arch.split(",") if a]:
        for attention in [a for a in args.attention.split(",") if a]:
            for n in [int(b) for b in args.bindings.split(",") if b]:
                layers = tuple(v for v in args.layers.split(",") if v)
                if arch == "sd15":  # SD1 has no middle-block layer at H/32
                    layers = tuple(v for v in layers if v != "mid")
                out.append(measure(arch, n, attention, modes, args.refine, layer_choices=layers))
    print()
    print(f"{'arch':5s} {'attn':5s} {'K':>2s} {'mode':24s} {'pass':6s} {'layers':6s} {'saved GiB':>9s} {'+unit':>6s} "
          f"{'GFLOP':>8s} {'x plain':>7s}")
    for r in out:
        for key, v in r.items():
            if isinstance(v, dict):
                mode, kind, *layers = key.split("/")
                print(f"{r['arch']:5s} {r['attention']:5s} {r['bindings']:2d} {mode:24s} {kind:6s} "
                      f"{(layers or ['all'])[0]:6s} "
                      f"{v['saved_gib']:9.2f} {v['unit_gib']:6.2f} {v['gflops']:8.0f} {v['x_plain_flops']:7.2f}")
        print(f"      plain CFG step {r['plain_gflops']:.0f} GFLOP; UNet weights {r['weights_gib']:.2f} GiB; "
              f"{r['h32_layers']} H/32 layers; attention kernels {r['attention_kernels'] or ['(ldm einsum)']}")
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(old + out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
