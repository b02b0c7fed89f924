"""Per-row LoRA application (clora.lora.rows) against merged-weight references computed here.

The reference never calls the code under test: ``ref_delta`` below writes ΔW from the factors (up @ down for Linear,
composed convolutions for LoCon/CP, Hadamard / Kronecker products for LoHa / LoKr), and each row's reference is a
deep copy of the model with ``W + weight * scale * ΔW`` merged into it.
"""
from __future__ import annotations

import copy
import importlib.util
from typing import Callable

import pytest
import torch
from torch import nn

from clora.lora.rows import LoraRows, RowPlan, targets_of
from clora.lora.types import LoraError, LoraModule

HAVE_DENSE = importlib.util.find_spec("clora.lora.dense") is not None
needs_dense = pytest.mark.skipif(not HAVE_DENSE, reason="clora.lora.dense (LoHa/LoKr dense deltas) is not written yet")

A, B, C = 0, 1, 2
PLAN_ROWS = [[], [(A, 1.0)], [(B, 1.0), (C, 0.5)]]
RANK = 4


# ----- independent reference ------------------------------------------------------------------------------------------
def ref_delta(lm: LoraModule, weight: torch.Tensor) -> torch.Tensor:
    """ΔW (alpha/rank included) written from the factors, in float64."""
    t = {k: v.double() for k, v in lm.tensors.items()}
    shape = weight.shape
    out = shape[0]
    if lm.kind == "lora":
        down, up, mid = t["down"], t["up"].reshape(out, -1), t.get("mid")
        rank = down.shape[0]
        if mid is None:
            delta = (up @ down.reshape(rank, -1)).reshape(shape)
        else:  # 1x1 down, kxk mid, 1x1 up composed
            delta = torch.einsum("oa,abkl,bi->oikl", up, mid, down.reshape(rank, -1))
    elif lm.kind == "loha":
        rank = t["hada_w1_b"].shape[0]
        w1 = t["hada_w1_a"] @ t["hada_w1_b"]
        w2 = t["hada_w2_a"] @ t["hada_w2_b"]
        delta = (w1 * w2).reshape(shape)
    elif lm.kind == "lokr":
        rank = t["lokr_w2_b"].shape[0]
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]  # (b, d*kh*kw)
        if len(shape) == 4:
            w2 = w2.reshape(w2.shape[0], shape[1] // t["lokr_w1"].shape[1], *shape[2:])
            delta = torch.kron(t["lokr_w1"][:, :, None, None], w2)
        else:
            delta = torch.kron(t["lokr_w1"], w2)
    else:
        raise AssertionError(lm.kind)
    scale = lm.alpha / rank if lm.alpha is not None else 1.0
    assert delta.shape == shape
    return delta * scale


class RefDense(LoraModule):
    """A LoHa-kind module whose dense delta is the test's own reference (exercises the dense path without dense.py)."""

    def dense_delta(self, weight: torch.Tensor) -> torch.Tensor:
        return ref_delta(self, weight).to(weight.dtype)


def _randn(g: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


def make_lora(module: nn.Module, layout: str, g: torch.Generator, key: str) -> LoraModule:
    """A random LoRA module of ``layout`` fitting ``module``, with ΔW entries of the order of the weight's.

    layouts: ``lora`` (kohya Linear / LoCon conv), ``cp`` (``lora_mid`` on kxk convs, else ``lora``), ``flat`` (2-D
    factors on 1x1 convs, 1x1-conv-shaped factors on Linear), ``loha``, ``lokr``, ``loha_ref`` (`RefDense`).
    """
    w = module.weight
    out, inp = w.shape[0], w.shape[1]
    kernel = tuple(w.shape[2:])
    fan_in = w[0].numel()
    target = 2 * 0.6 / fan_in**0.5  # ΔW std before the 0.5 scale
    alpha = RANK / 2  # scale 0.5, not 1
    is_conv = isinstance(module, nn.Conv2d)
    if layout in ("lora", "cp", "flat"):
        if layout == "cp" and is_conv and kernel != (1, 1):
            down = _randn(g, RANK, inp, 1, 1)
            mid = _randn(g, RANK, RANK, *kernel, std=RANK**-0.5)
            up = _randn(g, out, RANK, 1, 1, std=target / RANK**0.5)
            return LoraModule(key, "lora", {"down": down, "mid": mid, "up": up}, alpha=alpha)
        down = _randn(g, RANK, inp, *kernel)
        up = _randn(g, out, RANK, std=target / RANK**0.5)
        if layout == "flat" and is_conv and kernel == (1, 1):  # Linear-shaped factors on a 1x1 conv
            down = down.flatten(1)
        elif layout == "flat" and not is_conv:  # 1x1-conv-shaped factors on a Linear
            down, up = down[:, :, None, None], up[:, :, None, None]
        elif is_conv:
            up = up[:, :, None, None]
        return LoraModule(key, "lora", {"down": down, "up": up}, alpha=alpha)
    if layout in ("loha", "loha_ref"):
        s = target**0.5 / RANK**0.5
        tensors = {
            "hada_w1_a": _randn(g, out, RANK), "hada_w1_b": _randn(g, RANK, fan_in, std=s),
            "hada_w2_a": _randn(g, out, RANK), "hada_w2_b": _randn(g, RANK, fan_in, std=s),
        }
        cls = RefDense if layout == "loha_ref" else LoraModule
        return cls(key, "loha", tensors, alpha=alpha)
    if layout == "lokr":
        a = 2 if out % 2 == 0 else 1
        c = 2 if inp % 2 == 0 else 1
        b, d = out // a, inp // c
        tensors = {
            "lokr_w1": _randn(g, a, c),
            "lokr_w2_a": _randn(g, b, RANK),
            "lokr_w2_b": _randn(g, RANK, d * (fan_in // inp), std=target / RANK**0.5),
        }
        return LoraModule(key, "lokr", tensors, alpha=alpha)
    raise AssertionError(layout)


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def make_targets(model: nn.Module, layouts: dict[int, str], seed: int = 0) -> list[tuple[nn.Module, int, LoraModule]]:
    """LoRAs ``A``, ``B``, ``C`` (layouts per index) on every Linear and Conv2d of ``model``."""
    g = torch.Generator().manual_seed(seed)
    return [
        (module, index, make_lora(module, layout, g, f"lora{index}_{name}"))
        for name, module in lora_layers(model)
        for index, layout in layouts.items()
    ]


def merged_copy(model: nn.Module, targets, row: list[tuple[int, float]]) -> nn.Module:
    """A deep copy of ``model`` with ``W + weight * ΔW`` merged for each LoRA of ``row``."""
    weights = dict(row)
    names = {id(m): n for n, m in model.named_modules()}
    merged = copy.deepcopy(model)
    layers = dict(merged.named_modules())
    with torch.no_grad():
        for module, index, lm in targets:
            if index in weights:
                w = layers[names[id(module)]].weight
                w.copy_((w.double() + weights[index] * ref_delta(lm, w)).to(w.dtype))
    return merged


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomise_zero_params(model: nn.Module, seed: int = 1) -> nn.Module:
    """ldm zero-initialises output convs; give them random values so every layer matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 / p[0].numel() ** 0.5)
    return model.eval()


def check_rows(model: nn.Module, targets, call: Callable[[nn.Module], torch.Tensor], tol: float = 1e-5,
               plan_rows: list[list[tuple[int, float]]] = PLAN_ROWS) -> None:
    """Batched per-row output == merged-model output, row by row; untouched row bit-equal to the plain model."""
    plan = RowPlan.from_lists(plan_rows)
    with torch.no_grad():
        plain = call(model)
        with LoraRows(targets) as rows:
            rows.plan = plan
            got = call(model)
        for r, row in enumerate(plan_rows):
            if not row:
                assert torch.equal(got[r], plain[r]), f"row {r} has no LoRA but changed"
                continue
            want = call(merged_copy(model, targets, row))[r]
            err = rel_err(got[r], want)
            assert err <= tol, f"row {r}: relative error {err:.3g}"
            # the LoRA must matter, or the comparison proves nothing
            assert rel_err(want, plain[r]) > 1e-2, f"row {r}: LoRA changes the output too little"


# ----- models ---------------------------------------------------------------------------------------------------------
def tiny_unet() -> nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2, 2, 2],
        attention_resolutions=[4, 2, 1], num_res_blocks=2, num_heads=2, use_spatial_transformer=True,
        transformer_depth=1, context_dim=64, use_checkpoint=False, legacy=False,
    )
    return randomise_zero_params(unet).requires_grad_(False)


def unet_inputs(batch: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.tensor([10, 500, 900][:batch] + [250] * max(0, batch - 3))
    ctx = torch.randn(batch, 7, 64, generator=g)
    return x, t, ctx


def spatial_transformer(channels: int, use_linear: bool = False) -> nn.Module:
    from ldm.modules.attention import SpatialTransformer

    torch.manual_seed(channels)
    block = SpatialTransformer(channels, 8, channels // 8, depth=1, context_dim=768, use_linear=use_linear,
                               use_checkpoint=False)
    return randomise_zero_params(block)


def clip_text(hidden: int, layers: int, heads: int, intermediate: int) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(hidden)
    config = CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=intermediate, vocab_size=49408, max_position_embeddings=77)
    return CLIPTextModel(config).eval()


def clip_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    ends = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    return [(n, m) for n, m in model.named_modules() if n.endswith(ends)]


# ----- 1. equivalence -------------------------------------------------------------------------------------------------
LAYOUT_PARAMS = [
    pytest.param({A: "lora", B: "lora", C: "lora"}, id="lora"),
    pytest.param({A: "cp", B: "cp", C: "cp"}, id="cp"),
    pytest.param({A: "flat", B: "lora", C: "flat"}, id="flat"),
    pytest.param({A: "loha_ref", B: "loha_ref", C: "loha_ref"}, id="dense_path"),
    pytest.param({A: "lora", B: "loha_ref", C: "cp"}, id="mixed"),
    pytest.param({A: "loha", B: "loha", C: "loha"}, id="loha", marks=needs_dense),
    pytest.param({A: "lokr", B: "lokr", C: "lokr"}, id="lokr", marks=needs_dense),
    pytest.param({A: "lokr", B: "cp", C: "loha"}, id="mixed_dense", marks=needs_dense),
]


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    return tiny_unet()


@pytest.mark.parametrize("layouts", LAYOUT_PARAMS)
def test_unet_rows_equal_merged(unet, layouts):
    targets = make_targets(unet, layouts)
    kinds = {type(m).__name__ for m, _, _ in targets}
    assert kinds == {"Linear", "Conv2d"}
    x, t, ctx = unet_inputs()
    check_rows(unet, targets, lambda m: m(x, t, context=ctx))


def test_unet_rows_gapped_plan(unet):
    """LoRAs on non-consecutive rows (gathered by index, not by a view), one row with no LoRA in the middle."""
    targets = make_targets(unet, {A: "lora", B: "loha_ref", C: "cp"})
    x, t, ctx = unet_inputs(batch=4)
    rows = [[(A, 1.0), (C, -0.7)], [], [(B, 0.8)], [(A, 0.6), (C, 0.5)]]
    check_rows(unet, targets, lambda m: m(x, t, context=ctx), plan_rows=rows)


@pytest.mark.parametrize("channels,use_linear", [(320, False), (640, False), (320, True)])
@pytest.mark.parametrize("layouts", [LAYOUT_PARAMS[0], LAYOUT_PARAMS[2], LAYOUT_PARAMS[4]])
def test_sd15_spatial_transformer_rows_equal_merged(channels, use_linear, layouts):
    block = spatial_transformer(channels, use_linear)
    targets = make_targets(block, layouts, seed=channels)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, channels, 8, 8, generator=g)
    ctx = torch.randn(3, 77, 768, generator=g)
    check_rows(block, targets, lambda m: m(x, context=ctx))


def _clip_case(model: nn.Module, layouts: dict[int, str]) -> None:
    g = torch.Generator().manual_seed(3)
    names = clip_layers(model)
    assert len(names) == 6 * model.config.num_hidden_layers
    targets = [(m, i, make_lora(m, lay, g, f"lora{i}_{n}")) for n, m in names for i, lay in layouts.items()]
    ids = torch.randint(0, 49406, (3, 77), generator=g)
    check_rows(model, targets, lambda m: m(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize("layouts", [LAYOUT_PARAMS[0], LAYOUT_PARAMS[4]])
def test_clip_text_rows_equal_merged(layouts):
    _clip_case(clip_text(64, 2, 2, 128), layouts)


def test_clip_l_sized_text_rows_equal_merged():
    """CLIP-L's layer sizes (hidden 768, 12 heads, MLP 3072); 2 of its 12 layers keep this under a few seconds."""
    _clip_case(clip_text(768, 2, 12, 3072), {A: "lora", B: "lora", C: "lora"})


@pytest.mark.parametrize("layer", [
    nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2),
    nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(6, 8, (3, 1), stride=(1, 2), padding=(1, 0)),
    nn.Conv2d(6, 8, 1),
    nn.Conv2d(6, 8, 1, stride=2),
    nn.Conv2d(6, 8, 1, padding=1),
    nn.Linear(6, 8),
], ids=["3x3_s2_d2", "3x3_reflect", "3x1_s12", "1x1", "1x1_s2", "1x1_p1", "linear"])
@pytest.mark.parametrize("layout", ["lora", "cp", "flat", "loha_ref"])
def test_single_layers_conv_params(layer, layout):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    targets = [(layer, i, make_lora(layer, layout, g, f"l{i}")) for i in (A, B, C)]
    shape = (3, 6, 9, 10) if isinstance(layer, nn.Conv2d) else (3, 6)
    x = torch.randn(*shape, generator=g)
    check_rows(layer, targets, lambda m: m(x))


def test_linear_input_shapes():
    layer = nn.Linear(6, 5)
    g = torch.Generator().manual_seed(9)
    targets = [(layer, i, make_lora(layer, "lora", g, f"l{i}")) for i in (A, B, C)]
    for shape in [(3, 6), (3, 4, 6), (3, 2, 4, 6)]:
        x = torch.randn(*shape, generator=g)
        check_rows(layer, targets, lambda m: m(x))


def test_weights_and_repeated_rows():
    """Plans built by concatenation/repeat (CFG layouts) and repeated LoRA entries (summed)."""
    layer = nn.Linear(6, 5)
    g = torch.Generator().manual_seed(10)
    targets = [(layer, i, make_lora(layer, "lora", g, f"l{i}")) for i in (A, B)]
    cond = RowPlan.from_lists([[(A, 0.7)], [(B, -0.3), (A, 0.2), (A, 0.1)]])
    plan = RowPlan.empty(2) + cond.repeat(2)
    assert len(plan) == 6
    x = torch.randn(6, 6, generator=g)
    with torch.no_grad(), LoraRows(targets) as rows:
        rows.plan = plan
        got = layer(x)
    rows_spec = [[], [], [(A, 0.7)], [(B, -0.3), (A, 0.3)], [(A, 0.7)], [(B, -0.3), (A, 0.3)]]
    for r, row in enumerate(rows_spec):
        want = merged_copy(layer, targets, row)(x[r:r + 1])[0] if row else layer(x[r:r + 1])[0]
        assert rel_err(got[r], want.detach()) <= 1e-6


# ----- 3. gradient ----------------------------------------------------------------------------------------------------
def test_gradient_to_input_matches_merged(unet):
    targets = make_targets(unet, {A: "lora", B: "loha_ref", C: "cp"})
    x, t, ctx = unet_inputs()
    g = torch.Generator().manual_seed(6)
    probe = torch.randn(3, 4, 16, 16, generator=g)

    xp = x.clone().requires_grad_(True)
    (unet(xp, t, context=ctx) * probe).sum().backward()
    plain_grad = xp.grad
    xg = x.clone().requires_grad_(True)
    with LoraRows(targets) as rows:
        rows.plan = RowPlan.from_lists(PLAN_ROWS)
        (unet(xg, t, context=ctx) * probe).sum().backward()
    for r, row in enumerate(PLAN_ROWS):
        ref_model = merged_copy(unet, targets, row) if row else unet
        xr = x[r:r + 1].clone().requires_grad_(True)
        (ref_model(xr, t[r:r + 1], context=ctx[r:r + 1]) * probe[r:r + 1]).sum().backward()
        err = rel_err(xg.grad[r], xr.grad[0])
        assert err <= 1e-5, f"row {r}: gradient relative error {err:.3g}"
        assert rel_err(xr.grad[0], plain_grad[r]) > 1e-2 or not row


def test_gradient_reaches_lora_free_row_only_through_plain_path():
    """Rows without LoRA get exactly the plain model's gradient."""
    layer = nn.Linear(6, 5)
    g = torch.Generator().manual_seed(11)
    targets = [(layer, A, make_lora(layer, "lora", g, "l0"))]
    x = torch.randn(2, 6, generator=g, requires_grad=True)
    with LoraRows(targets) as rows:
        rows.plan = RowPlan.from_lists([[], [(A, 1.0)]])
        (layer(x) ** 2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (layer(x2) ** 2).sum().backward()
    assert torch.equal(x.grad[0], x2.grad[0])
    assert not torch.equal(x.grad[1], x2.grad[1])


# ----- 4. untouched state ---------------------------------------------------------------------------------------------
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def snapshot(model: nn.Module) -> dict:
    state = {}
    for name, m in model.named_modules():
        state[name] = {
            "hooks": {d: dict(getattr(m, d)) for d in _HOOK_DICTS if hasattr(m, d)},
            "dict_keys": sorted(m.__dict__),
            "forward_in_dict": "forward" in m.__dict__,
            "tensors": {k: (v, v.detach().clone(), v.requires_grad)
                        for k, v in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))},
        }
    return state


def assert_same(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name in before:
        b, a = before[name], after[name]
        assert a["hooks"] == b["hooks"], f"{name}: hooks changed"
        assert a["dict_keys"] == b["dict_keys"], f"{name}: instance attributes changed"
        assert not a["forward_in_dict"]
        assert a["tensors"].keys() == b["tensors"].keys()
        for k, (obj, saved, req) in b["tensors"].items():
            now = a["tensors"][k][0]
            assert now is obj, f"{name}.{k} was replaced"
            assert now.dtype == saved.dtype and now.device == saved.device and now.requires_grad == req
            assert torch.equal(now.detach(), saved), f"{name}.{k} changed"


def _interrupting_hook(module, args, output):
    raise KeyboardInterrupt("injected")


@pytest.mark.parametrize("how", ["normal", "exception", "interrupt", "interrupt_mid_forward"])
def test_state_restored(unet, how):
    targets = make_targets(unet, {A: "lora", B: "loha_ref", C: "cp"})
    x, t, ctx = unet_inputs()
    interrupt_handle = None
    if how == "interrupt_mid_forward":  # installed before the snapshot: it must still be there afterwards
        interrupt_handle = unet.middle_block.register_forward_hook(_interrupting_hook)
    before = snapshot(unet)
    with torch.no_grad():
        plain = unet(x, t, context=ctx) if interrupt_handle is None else None
        try:
            with LoraRows(targets) as rows:
                rows.plan = RowPlan.from_lists(PLAN_ROWS)
                if how == "normal":
                    unet(x, t, context=ctx)
                elif how == "exception":
                    unet(x, t, context=ctx)
                    raise RuntimeError("boom")
                elif how == "interrupt":
                    unet(x, t, context=ctx)
                    raise KeyboardInterrupt("injected")
                else:
                    unet(x, t, context=ctx)
        except RuntimeError as exc:
            assert how == "exception", exc
        except KeyboardInterrupt as exc:
            assert how in ("interrupt", "interrupt_mid_forward"), exc
        else:
            assert how == "normal"
        assert not rows.active
        assert_same(unet, before)
        if interrupt_handle is not None:
            interrupt_handle.remove()
        else:
            assert torch.equal(unet(x, t, context=ctx), plain)


def test_failed_enter_leaves_nothing(unet):
    """An error while entering (here: nesting on the same layers) registers nothing."""
    targets = make_targets(unet, {A: "lora"})
    before = snapshot(unet)
    with LoraRows(targets) as outer:
        inner = LoraRows(make_targets(unet, {B: "lora"}))
        with pytest.raises(LoraError, match="already carries per-row LoRA hooks"):
            inner.__enter__()
        with pytest.raises(LoraError, match="already active"):
            outer.__enter__()
    assert_same(unet, before)


def test_two_contexts_on_disjoint_layers():
    """A text-encoder context and a UNet context may be active together; each applies its own plan."""
    first, second = nn.Linear(6, 6), nn.Linear(6, 6)
    g = torch.Generator().manual_seed(15)
    t1 = [(first, A, make_lora(first, "lora", g, "f"))]
    t2 = [(second, A, make_lora(second, "lora", g, "s"))]
    x = torch.randn(2, 6, generator=g)
    with torch.no_grad(), LoraRows(t1) as r1, LoraRows(t2) as r2:
        r1.plan = RowPlan.from_lists([[(A, 1.0)], []])
        r2.plan = RowPlan.from_lists([[], [(A, 1.0)]])
        got = second(first(x))
    m1, m2 = merged_copy(first, t1, [(A, 1.0)]), merged_copy(second, t2, [(A, 1.0)])
    assert rel_err(got[0], second(m1(x[:1]))[0].detach()) <= 1e-6
    assert rel_err(got[1], m2(first(x[1:]))[0].detach()) <= 1e-6
    assert not first._forward_hooks and not second._forward_hooks


def test_reenter_after_exit_is_correct():
    layer = nn.Linear(6, 5)
    g = torch.Generator().manual_seed(12)
    targets = [(layer, A, make_lora(layer, "lora", g, "l0"))]
    ctx = LoraRows(targets)
    x = torch.randn(1, 6, generator=g)
    plan = RowPlan.from_lists([[(A, 1.0)]])
    with torch.no_grad():
        with ctx as rows:
            rows.plan = plan
            first = layer(x)
        with ctx as rows:
            second = layer(x)  # the plan persists on the object
        assert torch.equal(first, second)
        assert rel_err(first, merged_copy(layer, targets, [(A, 1.0)])(x)) <= 1e-6
        assert not layer._forward_hooks


# ----- 5. plan mismatch, pass-through, validation ---------------------------------------------------------------------
def test_batch_size_mismatch_raises(unet):
    targets = make_targets(unet, {A: "lora"})
    x, t, ctx = unet_inputs(batch=4)
    before = snapshot(unet)
    with torch.no_grad(), LoraRows(targets) as rows:
        rows.plan = RowPlan.from_lists(PLAN_ROWS)
        with pytest.raises(LoraError, match="plan has 3 rows but .* batch of 4 rows"):
            unet(x, t, context=ctx)
    assert_same(unet, before)


def test_no_plan_passes_through(unet):
    targets = make_targets(unet, {A: "lora", B: "cp"})
    x, t, ctx = unet_inputs(batch=5)
    with torch.no_grad():
        plain = unet(x, t, context=ctx)
        with LoraRows(targets) as rows:
            assert torch.equal(unet(x, t, context=ctx), plain)
            rows.plan = RowPlan.from_lists([[(A, 1.0)]] * 5)
            with rows.use(None):
                assert torch.equal(unet(x, t, context=ctx), plain)
            assert rows.plan is not None
            assert not torch.equal(unet(x, t, context=ctx), plain)
            rows.plan = RowPlan.empty(5)
            assert torch.equal(unet(x, t, context=ctx), plain)


def test_target_validation():
    layer = nn.Linear(6, 5)
    g = torch.Generator().manual_seed(13)
    good = make_lora(layer, "lora", g, "ok")
    with pytest.raises(LoraError, match="targets the same layer twice"):
        LoraRows([(layer, A, good), (layer, A, make_lora(layer, "lora", g, "again"))])
    with pytest.raises(LoraError, match="LayerNorm"):
        LoraRows([(nn.LayerNorm(6), A, good)])
    with pytest.raises(LoraError, match="MultiheadAttention"):
        LoraRows([(nn.MultiheadAttention(6, 2).out_proj, A, good)])
    with pytest.raises(LoraError, match="RowPlan"):
        LoraRows([(layer, A, good)]).plan = [[(A, 1.0)]]
    wrong = make_lora(nn.Linear(7, 5), "lora", g, "wrong_shape")
    with pytest.raises(LoraError, match="wrong_shape"):
        with LoraRows([(layer, A, wrong)]):
            pass
    assert not layer._forward_hooks


def test_row_plan_construction_and_groups():
    plan = RowPlan.from_lists([[(0, 1.0)], [], [(1, 0.8), (2, 0.5)], [(2, 1.0), (2, 0.25)]])
    assert len(plan) == 4
    assert plan.lora_indices == (0, 1, 2)
    groups = plan.groups("cpu")
    assert groups[0].rows.tolist() == [0] and groups[0].weights is None
    assert groups[1].rows.tolist() == [2] and groups[1].weights.tolist() == pytest.approx([0.8])
    assert groups[2].rows.tolist() == [2, 3] and groups[2].weights.tolist() == pytest.approx([0.5, 1.25])
    assert groups[2].rows.dtype == torch.long
    assert groups[2].span == (2, 2) and groups[0].span == (0, 1)
    assert RowPlan.from_lists([[(0, 1.0)], [], [(0, 1.0)]]).groups("cpu")[0].span is None
    assert plan.groups("cpu") is groups  # cached
    two = RowPlan.concat(RowPlan.empty(1), plan.repeat(2))
    assert two.rows == ((),) + plan.rows * 2
    assert RowPlan.repeat(plan, 2) == plan.repeat(2)
    assert RowPlan.empty(1) + plan == RowPlan.concat(RowPlan.empty(1), plan)
    for bad in ([[(0,)]], [[(-1, 1.0)]], [[(0, float("nan"))]], [[("a", 1.0)]]):
        with pytest.raises(LoraError, match="Row 0"):
            RowPlan.from_lists(bad)


def test_targets_of_splits_components():
    class Resolved:
        def __init__(self, targets):
            self.targets = targets

    u, te = nn.Linear(2, 2), nn.Linear(2, 2)
    m0, m1 = LoraModule("a", "lora", {}), LoraModule("b", "lora", {})
    resolved = [Resolved([("unet", "x", u, m0), ("text", "y", te, m0)]), Resolved([("unet", "x", u, m1)])]
    assert targets_of(resolved, "unet") == [(u, 0, m0), (u, 1, m1)]
    assert targets_of(resolved, "text") == [(te, 0, m0)]


# ----- 6. dtype -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["lora", "cp", "loha_ref"])
def test_bf16_output_dtype(layout):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(14)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(2), nn.Linear(36, 16))
    targets = [(m, i, make_lora(m, layout, g, f"l{i}")) for m in (model[0], model[2]) for i in (A, B, C)]
    x = torch.randn(3, 4, 6, 6, generator=g)
    want = [merged_copy(model, targets, row)(x[r:r + 1]) for r, row in enumerate(PLAN_ROWS)]
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    targets_bf16 = [(model_bf16[0] if m is model[0] else model_bf16[2], i, lm) for m, i, lm in targets]
    xb = x.to(torch.bfloat16)
    with torch.no_grad(), LoraRows(targets_bf16) as rows:
        rows.plan = RowPlan.from_lists(PLAN_ROWS)
        got = model_bf16(xb)
        conv_out = model_bf16[0](xb)
        linear_out = model_bf16[2](model_bf16[1](conv_out))
    assert got.dtype == conv_out.dtype == linear_out.dtype == torch.bfloat16
    for r in range(3):
        assert rel_err(got[r], want[r][0].detach()) <= 3e-2


# ----- 7. memory ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["loha", "lokr"])
def test_dense_kinds_keep_no_full_size_delta_between_calls(layout):
    """LoHa/LoKr have no low-rank form, so each call builds the layer's full ΔW; nothing of that size may stay in the
    per-row cache (for an SDXL LoHa that would be GBs, the size of every targeted weight) — and rows stay exact."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(21)
    layer = nn.Linear(96, 128)
    targets = [(layer, i, make_lora(layer, layout, g, f"l{i}")) for i in (A, B, C)]
    x = torch.randn(3, 96, generator=g)
    check_rows(layer, targets, lambda m: m(x))
    with torch.no_grad(), LoraRows(targets) as rows:
        rows.plan = RowPlan.from_lists(PLAN_ROWS)
        layer(x)
        cached = [t for hook in layer._forward_hooks.values() for e in hook.entries for p in e.prepared.values()
                  for t in _prepared_tensors(p)]
    assert cached, "the forward did not prepare the entries"
    file_numel = sum(t.numel() for _m, _i, lm in targets for t in lm.tensors.values())
    assert sum(t.numel() for t in cached) <= file_numel
    assert max(t.numel() for t in cached) < layer.weight.numel()


def _prepared_tensors(p) -> list[torch.Tensor]:
    out = [t for t in (p.down, p.mid, p.up, getattr(p, "dense", None)) if t is not None]
    lazy = getattr(p, "lazy", None)
    if lazy is not None:
        out += list(lazy.tensors.values())
    return out
