"""Memory modes of the gradient pass (``settings.grad_memory``): each gives the batched pass's loss, gradient,
prediction and maps up to float rounding, on the tiny SD1 UNet and on a small UNet of SDXL's layout (attention only
at H/16 and H/32, several transformer layers per block, a vector conditioning), with per-row LoRAs.  The batched
gradient itself is checked against a central finite difference of the loss computed without autograd."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bench.sdxl_unet import make_sdxl_unet, tiny_sdxl_unet_config
from clora.attention import AttentionCapture, recompute_units, recomputing
from clora.compose import Composer, ComposePlan, resolve_grad_memory
from clora.lora.rows import LoraRows
from clora.lora.types import LoraModule
from clora.settings import GRAD_MEMORY, Binding, CloraSettings, SettingsError
from tests.models import make_tiny_unet

MODES = ("per_variant", "checkpoint", "per_variant_checkpoint")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _unet(arch: str, dtype=torch.float32):
    if arch == "sd1":
        unet, adm, ctx = make_tiny_unet(0).to(dtype), None, 64
    else:
        cfg = tiny_sdxl_unet_config()
        unet, adm, ctx = make_sdxl_unet(cfg, seed=0, dtype=dtype), cfg["adm_in_channels"], cfg["context_dim"]
    if dtype == torch.float64:  # ldm computes the timestep embedding and casts the input to its own dtype in float32
        unet.dtype = dtype
        unet.time_embed.register_forward_pre_hook(lambda m, a: (a[0].to(dtype),))
        for m in unet.modules():  # ldm's GroupNorm32 computes in float32
            if isinstance(m, torch.nn.GroupNorm):
                m.__class__ = torch.nn.GroupNorm
    return unet, adm, ctx


def _loras(unet, n: int, dtype, seed: int = 3):
    """Random rank-2 LoRAs on every Linear of the transformer blocks (cross-attention keys included)."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for idx in range(n):
        for name, mod in unet.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".transformer_blocks." in name:
                down = torch.randn(2, mod.in_features, generator=g) * 0.3
                up = torch.randn(mod.out_features, 2, generator=g) * 0.3
                lm = LoraModule(key=f"lora_unet_{name.replace('.', '_')}", kind="lora",
                                tensors={"down": down.to(dtype), "up": up.to(dtype)})
                targets.append((mod, idx, lm))
    return targets


def _case(arch: str, batch: int = 2, dtype=torch.float32):
    unet, adm, ctx = _unet(arch, dtype)
    settings = CloraSettings(enabled=True, bindings=(Binding("a", ("cat",)), Binding("b", ("dog",))),
                             refine_iters=0)
    plan = ComposePlan(groups=[[[2], [2, 3], [2]], [[5], [5], [5, 6]]], mask_tokens=[[], [2, 3], [5, 6]],
                       cond_loras=[[], [(0, 0.9)], [(1, 0.7)]], uncond_loras=[[], [(0, 0.9)], [(1, 0.7)]])
    targets = _loras(unet, 2, dtype)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(batch, 4, 16, 16, generator=g) * 3.0).to(dtype)
    conds = torch.randn(3, batch, 77, ctx, generator=g).to(dtype)
    unconds = torch.randn(3, batch, 77, ctx, generator=g).to(dtype)
    y = torch.randn(batch, adm, generator=g).to(dtype) if adm else None
    sigma = torch.full((batch,), 3.0, dtype=dtype)
    calls: list[int] = []

    def model(xr, sr, cr):
        calls.append(xr.shape[0])
        extra = {} if y is None else {"y": y.repeat(xr.shape[0] // batch, 1)}
        eps = unet(xr / (sr[:, None, None, None] ** 2 + 1) ** 0.5, timesteps=sr * 100, context=cr, **extra)
        return xr - sr[:, None, None, None] * eps

    def composer(mode: str, **kw) -> Composer:
        return Composer(settings=replace(settings, grad_memory=mode, **kw), plan=plan, rows=LoraRows(targets),
                        capture=AttentionCapture(unet), unet=unet, map_size=(4, 4), total_steps=4)

    return unet, composer, (x, sigma, unconds, conds, model), calls


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("full", [False, True], ids=["stopped", "full"])
def test_modes_give_the_batched_gradient(arch, full):
    unet, composer, (x, sigma, unconds, conds, model), calls = _case(arch)
    ref = composer("batched")
    loss0, g0, out0, flat0 = ref._grad_pass(x, sigma, unconds, conds, model, full=full)  # learns the layer order
    calls.clear()
    loss0, g0, out0, flat0 = ref._grad_pass(x, sigma, unconds, conds, model, full=full)
    assert calls == [12] and float(g0.abs().max()) > 0  # 3 variants × (uncond, cond) × 2 images in one pass
    report = {}
    for mode in MODES:
        comp = composer(mode)
        comp.capture._order, comp.capture._order_size = ref.capture._order, ref.capture._order_size
        calls.clear()
        loss, g, out, flat = comp._grad_pass(x, sigma, unconds, conds, model, full=full)
        per_variant = mode.startswith("per_variant")
        assert calls == ([12, 4, 4, 4] if per_variant else [12])  # phase 1 over all rows, phase 2 per variant
        assert abs(float(loss) - float(loss0)) <= 1e-5 * abs(float(loss0))
        err = float((g - g0).abs().max())
        report[mode] = err
        assert _rel(g, g0) < 1e-4, (mode, _rel(g, g0))
        if full:
            assert _rel(out, out0) < 1e-5 and _rel(flat, flat0) < 1e-5
        else:
            assert out is None and flat is None
        assert all("forward" not in m.__dict__ for m in unet.modules())  # recomputation wrappers removed
    print(f"\n{arch} full={full}: max |grad - batched| {report} (max |grad| {float(g0.abs().max()):.3g})")


def test_checkpoint_recomputes():
    """"checkpoint" really recomputes: the layers of the transformer blocks before the last H/32 layer run twice per
    pass (the units' own ``forward`` is called again, so their children's hooks count it)."""
    unet, composer, (x, sigma, unconds, conds, model), calls = _case("sdxl", batch=1)
    ref = composer("batched")
    ref._grad_pass(x, sigma, unconds, conds, model, full=False)
    counts: dict[str, int] = {}
    blocks = [(n, m) for n, m in unet.named_modules() if n.endswith(".attn1")]
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: counts.__setitem__(n, counts.get(n, 0) + 1))
               for n, m in blocks]
    try:
        for mode, expected in (("batched", 1), ("checkpoint", 2)):
            counts.clear()
            comp = composer(mode)
            comp.capture._order, comp.capture._order_size = ref.capture._order, ref.capture._order_size
            comp._grad_pass(x, sigma, unconds, conds, model, full=False)
            assert counts["input_blocks.4.1.transformer_blocks.0.attn1"] == expected
            assert counts["middle_block.1.transformer_blocks.2.attn1"] == expected
            assert "output_blocks.3.1.transformer_blocks.0.attn1" not in counts  # after the last H/32 layer: never runs
    finally:
        for h in handles:
            h.remove()


def test_first_recomputed_pass_learns_the_layer_order_without_gradient():
    """A generation's first gradient pass does not know the H/32 layers' order yet: "checkpoint" learns it with a
    no-grad pass over one row, so that the gradient pass itself can stop (else it would keep the whole UNet)."""
    unet, composer, (x, sigma, unconds, conds, model), calls = _case("sdxl", batch=1)
    ref = composer("batched")
    ref._grad_pass(x, sigma, unconds, conds, model, full=False)
    _, g0, _, _ = ref._grad_pass(x, sigma, unconds, conds, model, full=True)
    comp = composer("checkpoint")
    calls.clear()
    _, g, _, _ = comp._grad_pass(x, sigma, unconds, conds, model, full=True)
    assert calls == [1, 6] and comp.capture.known_order == ref.capture.known_order
    assert _rel(g, g0) < 1e-5
    calls.clear()
    comp._grad_pass(x, sigma, unconds, conds, model, full=True)
    assert calls == [6]


def test_gradient_matches_finite_difference(monkeypatch):
    """The most memory-saving mode against the loss computed without autograd in one batched pass (float64, central
    difference along the gradient's own direction and along a random one)."""
    monkeypatch.setattr("ldm.modules.attention._ATTN_PRECISION", "input dtype")  # not ldm's float32 upcast
    unet, composer, (x, sigma, unconds, conds, model), _ = _case("sdxl", batch=1, dtype=torch.float64)
    comp = composer("per_variant_checkpoint")
    comp._grad_pass(x, sigma, unconds, conds, model, full=False)
    _, g, _, _ = comp._grad_pass(x, sigma, unconds, conds, model, full=False)

    def loss_at(z):
        with torch.no_grad():
            c = composer("batched")
            with c._hooks():
                x_in, s_in, c_in, plan = c._rows(z, sigma, unconds, conds, with_uncond=True)
                c.rows.plan = plan
                c.capture.configure(size=(4, 4), grad=False)
                c.capture.run(model, x_in, s_in, c_in)
                return float(c._loss_from_maps(c._variant_maps(c.capture.maps(), 1, True)))

    for d in (g / g.norm(), torch.randn(g.shape, generator=torch.Generator().manual_seed(9), dtype=g.dtype)):
        d = d / d.norm()
        h = 1e-4
        fd = (loss_at(x + h * d) - loss_at(x - h * d)) / (2 * h)
        assert abs(fd - float((g * d).sum())) <= 1e-4 * max(1.0, abs(fd)), (fd, float((g * d).sum()))


def test_recompute_units_and_restore():
    unet = make_tiny_unet(0)
    units = recompute_units(unet)
    assert {type(m).__name__ for m in units} == {"ResBlock", "BasicTransformerBlock"}
    assert unet not in units and len(units) == sum(type(m).__name__ in ("ResBlock", "BasicTransformerBlock")
                                                   for m in unet.modules())
    own = lambda *a, **k: None  # noqa: E731  an instance forward already set is put back as it was
    units[0].forward = own
    with recomputing(unet):
        assert all("forward" in m.__dict__ for m in units) and units[0].forward is not own
    assert units[0].__dict__["forward"] is own and all("forward" not in m.__dict__ for m in units[1:])
    del units[0].forward
    with recomputing(unet, enabled=False), recomputing(None):
        assert all("forward" not in m.__dict__ for m in units)


def test_auto_resolves_by_family():
    sd1 = make_tiny_unet(0)
    xl = make_sdxl_unet(tiny_sdxl_unet_config(), device="meta")
    assert resolve_grad_memory("auto", sd1) == (False, False)
    assert resolve_grad_memory("auto", xl) == (False, True)
    assert resolve_grad_memory("auto", None) == (False, False)
    assert resolve_grad_memory("per_variant", sd1) == (True, False)
    assert resolve_grad_memory("per_variant_checkpoint", xl) == (True, True)
    assert resolve_grad_memory("checkpoint", None) == (False, False)  # nothing to recompute without the UNet


def test_setting_round_trips_and_validation():
    base = CloraSettings(enabled=True, bindings=(Binding("a", ("cat",)),))
    assert base.grad_memory == "auto" and "CLoRA grad memory" not in base.to_flat()
    for mode in GRAD_MEMORY:
        s = replace(base, grad_memory=mode)
        flat = s.to_flat()
        assert (flat.get("CLoRA grad memory") == mode) == (mode != "auto")
        assert CloraSettings.from_flat({k: str(v) for k, v in flat.items()}) == s
        assert CloraSettings.from_json(s.to_json()) == s
    assert CloraSettings.json_schema()["properties"]["grad_memory"]["enum"] == list(GRAD_MEMORY)
    with pytest.raises(SettingsError, match="Setting grad_memory 'lazy' is not one of auto, batched, per_variant"):
        replace(base, grad_memory="lazy").validate()
    with pytest.raises(SettingsError, match="Setting grad_memory .lazy. is not one of"):
        CloraSettings.from_flat({"CLoRA": "True", "CLoRA version": "2", "CLoRA 1 LoRA": "a", "CLoRA 1 subject": "cat",
                                 "CLoRA grad memory": "lazy"})


@pytest.mark.parametrize("mode", MODES)
def test_modes_inside_inference_mode(mode):
    """Forge samples inside ``torch.inference_mode()`` with inference-tensor weights (clora.gradmode): every mode's
    update there equals the batched update outside it.  (At 2×2 maps the float32 gradient is ill-conditioned: the
    min-max normalisation divides by map ranges of ~0.005, so any change of batch composition moves it by ~10 %
    while float64 agrees to 1e-11; hence 4×4 maps here, as in the tests above.)"""
    from clora.gradmode import inference_safe_gradients

    unet_ref = make_tiny_unet(0)
    with torch.inference_mode():
        unet_inf = make_tiny_unet(0)
    settings = CloraSettings(enabled=True, bindings=(Binding("a", ("cat",)), Binding("b", ("dog",))), refine_iters=0)
    plan = ComposePlan(groups=[[[2], [2], [2]], [[5], [5], [5]]], mask_tokens=[[], [2], [5]],
                       cond_loras=[[], [], []], uncond_loras=[[], [], []])

    def run(unet, grad_memory: str, inference: bool):
        host_ctx = (lambda: inference_safe_gradients(unet)) if inference else None
        comp = Composer(settings=replace(settings, grad_memory=grad_memory), plan=plan, rows=LoraRows([]),
                        capture=AttentionCapture(unet), unet=unet, map_size=(4, 4), total_steps=4,
                        grad_context=host_ctx)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 4, 16, 16, generator=g)
        conds = torch.randn(3, 1, 77, 64, generator=g)
        uncond = torch.randn(1, 77, 64, generator=g)

        def model_fn(xr, sr, cr):
            return unet(xr, timesteps=sr * 10, context=cr)

        ctx = torch.inference_mode() if inference else torch.no_grad()
        with ctx:
            x = x.clone()
            out = comp(x, torch.tensor([3.0]), uncond.clone(), conds.clone(), model_fn, 0)
        return x, out

    x_ref, out_ref = run(unet_ref, "batched", False)
    x_inf, out_inf = run(unet_inf, mode, True)
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    assert float((x_ref - x0).abs().max()) > 1e-2  # the update moved the latent
    assert _rel(x_inf - x0, x_ref - x0) < 1e-4, _rel(x_inf - x0, x_ref - x0)  # the update, as the gradients above
    assert _rel(out_inf[1], out_ref[1]) < 1e-5


def test_fake_tensor_count_equals_the_real_count():
    """bench/sdxl_memory.py counts saved bytes on fake tensors: on the small SDXL-layout UNet the same count on real
    tensors gives the same bytes, per mode (and per_variant and checkpoint keep less than batched)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench.sdxl_memory import _Counter, fake_parameters
    from clora.attention import map_size

    cfg = tiny_sdxl_unet_config()
    V = 3

    class Counting(Composer):
        def _loss_from_maps(self, maps):
            return maps.float().sum()

    def count(unet, make, mode):
        x, sigma, conds, unconds, y = make()
        plan = ComposePlan(groups=[[[2]] * V, [[3]] * V], mask_tokens=[[], [2], [3]], cond_loras=[[]] * V,
                           uncond_loras=[[]] * V)
        settings = CloraSettings(enabled=True, bindings=(Binding("a", ("cat",)), Binding("b", ("dog",))),
                                 grad_memory=mode)
        comp = Counting(settings=settings, plan=plan, rows=LoraRows([]), capture=AttentionCapture(unet), unet=unet,
                        map_size=map_size((16, 16), 4), total_steps=4)
        counter = _Counter(unet)

        def model(xr, sr, cr):
            counter.new_call()
            return unet(xr, timesteps=sr, context=cr, y=y.expand(xr.shape[0], -1))

        rows = comp.plan.row_plan(1, uncond=False, cond=True)
        comp._learn_layer_order(x.expand(V, -1, -1, -1), sigma.expand(V), conds[:, 0], rows, model, 1, False)
        handles = counter.unit_hooks(unet, recompute=comp.grad_memory_mode()[1])
        try:
            counter.calls.clear()
            with counter.hooks():
                comp._grad_pass(x, sigma, unconds, conds, model, full=False)
        finally:
            for h in handles:
                h.remove()
        return counter.largest_call

    def real_inputs():
        g = torch.Generator().manual_seed(0)
        return (torch.randn(1, 4, 16, 16, generator=g), torch.full((1,), 500.0), torch.randn(V, 1, 77, 80, generator=g),
                torch.randn(V, 1, 77, 80, generator=g), torch.randn(1, 48, generator=g))

    fake = FakeTensorMode()

    def fake_inputs():
        with fake:
            return (torch.empty(1, 4, 16, 16), torch.full((1,), 500.0), torch.empty(V, 1, 77, 80),
                    torch.empty(V, 1, 77, 80), torch.empty(1, 48))

    real_unet = make_sdxl_unet(cfg, seed=0)
    fake_unet = fake_parameters(make_sdxl_unet(cfg, device="meta", seed=None), fake)
    counts = {}
    for mode in ("batched", "per_variant", "checkpoint"):
        real = count(real_unet, real_inputs, mode)
        with fake:
            counted = count(fake_unet, fake_inputs, mode)
        # equal but for the 16-byte row index of a per-variant call (a constant, which fake tensors keep apart)
        assert real > 0 and abs(counted - real) <= 16, (mode, counted, real)
        counts[mode] = real
    assert counts["checkpoint"] < counts["per_variant"] < counts["batched"]


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_map_layers_average_the_chosen_part_and_end_the_pass_there(arch):
    """``map_layers``: the maps of a pass are the mean of the chosen part's H/32 layers (checked against the
    per-layer maps of an ``all`` pass over the same rows), and a stopped gradient pass for ``down`` never runs the up
    path.  ``mid`` on SD1 (no middle-block layer at H/32) is a settings error naming the setting."""
    unet, composer, (x, sigma, unconds, conds, model), calls = _case(arch)
    ref = composer("batched")
    layer_maps: list = []
    maps_of = ref.capture.maps

    def recording_maps():
        layer_maps[:] = ref.capture.layer_maps()
        return maps_of()

    ref.capture.maps = recording_maps
    ref._grad_pass(x, sigma, unconds, conds, model, full=True)
    names = [n for n, _ in layer_maps]
    parts = {"down": "input_blocks.", "mid": "middle_block.", "up": "output_blocks."}
    present = [p for p, prefix in parts.items() if any(n.startswith(prefix) for n in names)]
    assert present == (["down", "up"] if arch == "sd1" else ["down", "mid", "up"])
    up_calls: list[int] = []
    hook = unet.output_blocks[0].register_forward_hook(lambda *_a: up_calls.append(1))
    try:
        for part in present:
            comp = composer("batched", map_layers=part)
            _loss, g, _out, flat = comp._grad_pass(x, sigma, unconds, conds, model, full=True)
            want = torch.stack([m for n, m in layer_maps if n.startswith(parts[part])]).mean(0)
            assert _rel(flat, want) < 1e-6, (part, _rel(flat, want))
            assert torch.isfinite(g).all() and float(g.abs().max()) > 0
            up_calls.clear()
            comp._grad_pass(x, sigma, unconds, conds, model, full=False)  # stopped after the part's last layer
            assert bool(up_calls) == (part == "up"), (part, len(up_calls))
    finally:
        hook.remove()
    if arch == "sd1":
        comp = composer("batched", map_layers="mid")
        with pytest.raises(SettingsError, match=r"Setting map_layers 'mid': No cross-attention layer of the UNet's "
                                                r"mid part runs at the attention-map size 4x4"):
            comp._grad_pass(x, sigma, unconds, conds, model, full=True)
