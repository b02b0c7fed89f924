"""AttentionCapture on a tiny random-weight ldm UNetModel, checked against an independent per-layer reference."""
from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from clora.attention import AttentionCapture, attention_probs, find_cross_attention, no_checkpointing
from clora.loss import concept_loss

import ldm.modules.diffusionmodules.openaimodel as openaimodel
import ldm.modules.attention as ldm_attention
import ldm.modules.diffusionmodules.util as ldm_util

T_TOKENS = 7
CTX = 64
GROUPS = [[[1], [1, 2], []], [[4], [], [5]]]  # two concepts over three rows (rows play the prompt variants)


def _build_unet(use_checkpoint: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    unet = openaimodel.UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 2, 2], num_heads=2, use_spatial_transformer=True,
        transformer_depth=1, context_dim=CTX, use_checkpoint=use_checkpoint, legacy=False,
    )
    # ldm zero-initialises output projections; random weights everywhere make every path matter.
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return unet.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    return _build_unet()


def _inputs(dtype=torch.float32, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 32, 32, generator=g, dtype=dtype)
    t = torch.tensor([500.0, 120.0, 900.0][:batch])
    ctx = torch.randn(batch, T_TOKENS, CTX, generator=g, dtype=dtype)
    return x, t, ctx


@contextmanager
def _reference_recorder(monkeypatch: pytest.MonkeyPatch, records: list) -> Iterator[None]:
    """Patch CrossAttention.forward (test only) to record the softmax of every cross-attention call, per head."""
    original = ldm_attention.CrossAttention.forward

    def forward(self, x, context=None, mask=None):
        if context is not None:
            b, n, _ = x.shape
            q = self.to_q(x).reshape(b, n, self.heads, -1)
            k = self.to_k(context).reshape(b, context.shape[1], self.heads, -1)
            sim = torch.einsum("bnhd,bthd->bhnt", q, k) * self.scale
            records.append((n, sim.softmax(dim=-1).mean(dim=1)))
        return original(self, x, context=context, mask=mask)

    with monkeypatch.context() as m:
        m.setattr(ldm_attention.CrossAttention, "forward", forward)
        yield


def _hook_count(modules: list[nn.Module]) -> int:
    return sum(len(m._forward_hooks) for m in modules)


# ----- attention_probs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [None, 0.37])
def test_attention_probs_matches_manual_per_head(scale) -> None:
    g = torch.Generator().manual_seed(0)
    heads, d = 3, 5
    q = torch.randn(2, 11, heads * d, generator=g, dtype=torch.float64)
    k = torch.randn(2, 7, heads * d, generator=g, dtype=torch.float64)
    s = d**-0.5 if scale is None else scale
    per_head = []
    for hd in range(heads):
        qh, kh = q[..., hd * d : (hd + 1) * d], k[..., hd * d : (hd + 1) * d]
        per_head.append(torch.softmax(torch.einsum("bnd,btd->bnt", qh, kh) * s, dim=-1))
    ref = torch.stack(per_head).mean(0)
    out = attention_probs(q, k, heads, scale)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 11, dtype=torch.float64))


def test_attention_probs_half_inputs_and_errors() -> None:
    q = torch.randn(1, 4, 8).half()
    k = torch.randn(1, 3, 8).half()
    out = attention_probs(q, k, 2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, attention_probs(q.float(), k.float(), 2))
    with pytest.raises(ValueError, match="3 attention heads"):
        attention_probs(q, k, 3)


# ----- capture on the ldm UNet -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(8, 8), (16, 16)])
def test_captured_maps_equal_reference(unet, monkeypatch, size) -> None:
    x, t, ctx = _inputs()
    records: list = []
    with _reference_recorder(monkeypatch, records):
        with AttentionCapture(unet) as cap:
            cap.configure(size=size)
            cap.reset()
            cap.run(unet, x, t, context=ctx)
            maps = cap.maps()
            names = cap.layer_names
            per_layer = cap.layer_maps()
    matching = [p for n, p in records if n == size[0] * size[1]]
    assert len(matching) == 5 == len(names)  # 2 input + 3 output layers per level in this config
    ref = torch.stack(matching).mean(0).reshape(3, *size, T_TOKENS)
    assert maps.shape == (3, *size, T_TOKENS)
    torch.testing.assert_close(maps, ref, rtol=1e-5, atol=1e-7)
    # each layer's own map, in firing order, against the reference's per-layer probabilities
    assert [n for n, _m in per_layer] == list(names)
    for (_n, m), p in zip(per_layer, matching):
        torch.testing.assert_close(m, p.reshape(3, *size, T_TOKENS), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(maps.sum(-1), torch.ones(3, *size))
    assert all(n.endswith("attn2") for n in names)


@pytest.mark.parametrize("grad", [False, True])
def test_output_bit_identical_and_grad_mode(unet, grad) -> None:
    x, t, ctx = _inputs()
    with torch.no_grad():
        plain = unet(x, t, context=ctx)
    xg = x.clone().requires_grad_(True)
    with AttentionCapture(unet) as cap:
        cap.configure(size=(8, 8), grad=grad)
        cap.reset()
        out = cap.run(unet, xg, t, context=ctx)
        maps = cap.maps()
    assert torch.equal(out.detach(), plain)
    assert maps.requires_grad is grad


def _grad_pass(unet, x, t, ctx, cap: AttentionCapture, stop: bool):
    xg = x.clone().requires_grad_(True)
    cap.configure(size=(8, 8), grad=True, stop_after_last=stop)
    cap.reset()
    out = cap.run(unet, xg, t, context=ctx)
    maps = cap.maps()
    loss = concept_loss(maps, GROUPS)
    (grad,) = torch.autograd.grad(loss, xg)
    return out, maps.detach(), loss.detach(), grad


def test_early_stop_same_maps_and_gradient_and_really_stops(unet) -> None:
    x, t, ctx = _inputs()
    calls: dict[str, int] = {}
    watched = {f"output_blocks.{i}": m for i, m in enumerate(unet.output_blocks)}
    watched["out"] = unet.out
    handles = [m.register_forward_hook(lambda *_a, n=n: calls.__setitem__(n, calls.get(n, 0) + 1)) for n, m in watched.items()]
    try:
        with AttentionCapture(unet) as cap:
            out_full, maps_full, loss_full, g_full = _grad_pass(unet, x, t, ctx, cap, stop=True)  # learns the order
            assert out_full is not None and calls.get("out") == 1
            order = cap.known_order
            calls.clear()
            out_stop, maps_stop, loss_stop, g_stop = _grad_pass(unet, x, t, ctx, cap, stop=True)
    finally:
        for h in handles:
            h.remove()
    assert out_stop is None
    last_block = int(re.match(r"output_blocks\.(\d+)\.", order[-1]).group(1))
    assert last_block < len(unet.output_blocks) - 1
    ran_after = [n for n in calls if n == "out" or (n.startswith("output_blocks") and int(n.split(".")[1]) > last_block)]
    assert ran_after == []
    assert calls.get(f"output_blocks.{last_block - 1}") == 1
    assert torch.equal(maps_stop, maps_full)
    assert torch.equal(loss_stop, loss_full)
    assert g_full.abs().max() > 0
    torch.testing.assert_close(g_stop, g_full, rtol=1e-5, atol=1e-8)


def test_no_early_stop_outside_run_or_before_order_known(unet) -> None:
    x, t, ctx = _inputs()
    with AttentionCapture(unet) as cap:
        cap.configure(size=(8, 8), stop_after_last=True)
        with torch.no_grad():
            out = unet(x, t, context=ctx)  # direct call: never stopped
            assert out.shape == x.shape
            cap.configure(size=(16, 16))
            assert cap.known_order is None
            assert cap.run(unet, x, t, context=ctx) is not None  # first pass at this size is complete
            assert cap.run(unet, x, t, context=ctx) is None


def test_gradient_matches_finite_differences_float64(monkeypatch) -> None:
    unet = copy.deepcopy(_build_unet(seed=3)).double()
    # Test-only patches so the whole UNet really runs in float64 (ldm casts to its dtype, GroupNorm32 and q·k to fp32).
    unet.dtype = torch.float64
    monkeypatch.setattr(ldm_util.GroupNorm32, "forward", nn.GroupNorm.forward)
    monkeypatch.setattr(ldm_attention, "_ATTN_PRECISION", "native")  # no fp32 upcast of q·k
    unet.time_embed.register_forward_pre_hook(lambda _m, args: (args[0].double(),))
    x, t, ctx = _inputs(torch.float64, seed=5)

    def loss_of(inp: torch.Tensor, cap: AttentionCapture) -> torch.Tensor:
        cap.reset()
        cap.run(unet, inp, t, context=ctx)
        return concept_loss(cap.maps(), GROUPS)

    with AttentionCapture(unet) as cap:
        cap.configure(size=(8, 8), grad=True)
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_of(xg, cap), xg)
        assert grad.abs().max() > 0
        cap.configure(grad=False, stop_after_last=True)  # the order is known now: difference passes stop early
        eps = 1e-6
        for idx in [(1, 2, 9, 13), tuple(int(i) for i in torch.nonzero(grad.abs() == grad.abs().max())[0])]:
            xp, xm = x.clone(), x.clone()
            xp[idx] += eps
            xm[idx] -= eps
            fd = (loss_of(xp, cap) - loss_of(xm, cap)) / (2 * eps)
            assert abs(fd.item()) > 1e-5
            assert abs(fd.item() - grad[idx].item()) <= 1e-9 + 1e-5 * abs(fd.item()), (idx, fd.item(), grad[idx].item())


def _flags(model: nn.Module) -> list:
    return [(n, a, m.__dict__[a]) for n, m in model.named_modules() for a in ("checkpoint", "use_checkpoint") if a in m.__dict__]


def test_gradient_pass_with_checkpointing_needs_no_checkpointing(unet) -> None:
    ck = _build_unet(use_checkpoint=True)
    ck.load_state_dict(unet.state_dict())
    before = _flags(ck)
    assert any(v is True for _n, a, v in before if a == "checkpoint")
    x, t, ctx = _inputs()
    with AttentionCapture(ck) as cap:
        cap.configure(size=(8, 8), grad=True)
        cap.reset()
        with torch.enable_grad():
            cap.run(ck, x.clone().requires_grad_(True), t, context=ctx)
        assert not cap.maps().requires_grad  # ldm's checkpointed blocks run without grad: the pitfall
        with no_checkpointing(ck):
            assert all(v is False for _n, _a, v in _flags(ck))
            _, maps_ck, _, g_ck = _grad_pass(ck, x, t, ctx, cap, stop=False)
    assert _flags(ck) == before
    with AttentionCapture(unet) as cap:
        _, maps_ref, _, g_ref = _grad_pass(unet, x, t, ctx, cap, stop=False)
    torch.testing.assert_close(maps_ck, maps_ref, rtol=0, atol=0)
    torch.testing.assert_close(g_ck, g_ref, rtol=1e-6, atol=1e-9)


def test_no_checkpointing_restores_mixed_flags_after_exception() -> None:
    ck = _build_unet(use_checkpoint=True)
    blocks = [m for m in ck.modules() if "checkpoint" in m.__dict__]
    blocks[0].checkpoint = False
    before = _flags(ck)
    with pytest.raises(RuntimeError, match="boom"):
        with no_checkpointing(ck):
            assert all(v is False for _n, _a, v in _flags(ck))
            raise RuntimeError("boom")
    assert _flags(ck) == before


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_hooks_removed_after_exceptions(unet, exc) -> None:
    targets = [m for _n, m in find_cross_attention(unet)]
    base = _hook_count(targets)
    x, t, ctx = _inputs()

    def failing(*a, **k):
        unet(*a, **k)
        raise exc("stop")

    with pytest.raises(exc):
        with AttentionCapture(unet) as cap:
            cap.configure(size=(8, 8), stop_after_last=True)
            assert _hook_count(targets) == base + len(targets)
            with torch.no_grad():
                cap.run(failing, x, t, context=ctx)
    assert _hook_count(targets) == base
    assert not cap._in_run  # noqa: SLF001 - state check
    with torch.no_grad():
        assert torch.equal(unet(x, t, context=ctx), unet(x, t, context=ctx))


def test_structural_detection_on_any_tree() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = 2
            self.to_q = nn.Linear(6, 8, bias=False)
            self.to_k = nn.Linear(5, 8, bias=False)
            self.to_v = nn.Linear(5, 8, bias=False)

        def forward(self, x, context=None):
            return x

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn1 = Attn()
            self.attn2 = Attn()

        def forward(self, x, context=None):
            return self.attn2(self.attn1(x), context=context)

    tree = nn.Sequential(Block(), Block())
    names = [n for n, _m in find_cross_attention(tree)]
    assert names == ["0.attn2", "1.attn2"]
    x, ctx = torch.randn(2, 6, 6), torch.randn(2, 4, 5)
    with AttentionCapture(tree) as cap:
        cap.configure(size=(2, 3))
        cap.run(lambda a: [b(a, context=ctx) for b in tree], x)
        ref = attention_probs(tree[0].attn2.to_q(x), tree[0].attn2.to_k(ctx), 2)
        ref = (ref + attention_probs(tree[1].attn2.to_q(x), tree[1].attn2.to_k(ctx), 2)) / 2
        torch.testing.assert_close(cap.maps(), ref.reshape(2, 2, 3, 4))
    with pytest.raises(ValueError, match="No cross-attention layers"):
        AttentionCapture(nn.Sequential(nn.Linear(2, 2)))


def test_maps_errors(unet) -> None:
    with AttentionCapture(unet) as cap:
        cap.configure(size=(5, 5))
        with pytest.raises(RuntimeError, match="5x5"):
            cap.maps()


# ----- choosing the UNet part (settings.map_layers) -----------------------------------------------------------------
def test_parts_capture_their_layers_average_them_and_stop_after_the_last(unet) -> None:
    """``parts``: only the chosen part's layers at the map size are captured, the maps are their mean (checked
    against the per-layer maps of an unrestricted capture), and with early stopping a ``down`` pass ends after the
    down path: no output block runs."""
    from clora.attention import unet_part

    x, t, ctx = _inputs()
    with AttentionCapture(unet) as cap:
        cap.configure(size=(8, 8))
        with torch.no_grad():
            unet(x, timesteps=t, context=ctx)
        every = cap.layer_maps()
    assert [n.split(".")[0] for n, _ in every] == ["input_blocks"] * 2 + ["output_blocks"] * 3
    for part, want_names in (("down", [n for n, _ in every if n.startswith("input_blocks.")]),
                             ("up", [n for n, _ in every if n.startswith("output_blocks.")])):
        calls: list[str] = []
        handles = [m.register_forward_hook(lambda *_a, i=i: calls.append(i)) for i, m in enumerate(unet.output_blocks)]
        try:
            with AttentionCapture(unet) as cap:
                cap.configure(size=(8, 8), parts=[part])
                assert cap.parts == frozenset([part])
                with torch.no_grad():
                    assert cap.run(unet, x, timesteps=t, context=ctx) is not None  # learns the order
                    assert list(cap.layer_names) == want_names
                    want = torch.stack([m for n, m in every if n in want_names]).mean(0)
                    torch.testing.assert_close(cap.maps(), want, rtol=1e-6, atol=1e-7)
                    assert cap.known_order == tuple(want_names)
                    cap.reset()
                    calls.clear()
                    cap.configure(stop_after_last=True)
                    assert cap.run(unet, x, timesteps=t, context=ctx) is None
                    torch.testing.assert_close(cap.maps(), want, rtol=1e-6, atol=1e-7)
        finally:
            for h in handles:
                h.remove()
        if part == "down":
            assert calls == []  # stopped after input_blocks.8: the up path never ran
        else:
            assert calls and max(calls) == int(want_names[-1].split(".")[1]) - 1  # stopped inside the last one
    assert {unet_part(n) for n, _ in every} == {"down", "up"}


def test_parts_errors(unet) -> None:
    from clora.attention import NoMapsError

    x, t, ctx = _inputs()
    with AttentionCapture(unet) as cap:
        cap.configure(size=(8, 8), parts="mid")  # the middle block has cross-attention, but at 4x4, not 8x8
        with torch.no_grad():
            unet(x, timesteps=t, context=ctx)
        with pytest.raises(NoMapsError, match=r"No cross-attention layer of the UNet's mid part runs at the "
                                              r"attention-map size 8x8"):
            cap.maps()
        with pytest.raises(ValueError, match="Unknown UNet part"):
            cap.configure(parts=["middle"])
        cap.configure(parts="all")
        assert cap.parts is None

    class Blocks(nn.Module):  # cross-attention whose names say no UNet part
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([ldm_attention.BasicTransformerBlock(16, 2, 8, context_dim=CTX)])

    with pytest.raises(ValueError, match="no cross-attention layers in its down part"):
        AttentionCapture(Blocks()).configure(parts=["down"])
