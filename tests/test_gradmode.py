"""Gradient passes of the engine inside torch.inference_mode() (how Forge samples), with inference-tensor weights."""
from __future__ import annotations

import pytest
import torch

from clora.attention import AttentionCapture
from clora.compose import ComposePlan, Composer
from clora.gradmode import inference_safe_gradients
from clora.lora.rows import LoraRows
from clora.settings import Binding, CloraSettings
from tests.models import make_tiny_unet


class InPlaceResidual(torch.nn.Module):
    """x += f(norm(x)), the residual style of Forge's transformer blocks."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        x = x * 1.0
        n = self.lin(self.norm(x))
        x += n
        return x


def test_gradient_through_inference_weights_and_inplace_residual_matches_reference():
    torch.manual_seed(0)
    ref = InPlaceResidual()
    x = torch.randn(3, 8)
    # reference gradient, written out of place
    xr = x.clone().requires_grad_(True)
    y = xr + ref.lin(ref.norm(xr))
    (g_ref,) = torch.autograd.grad(y.square().sum(), xr)

    with torch.inference_mode():
        host = InPlaceResidual()
        host.load_state_dict(ref.state_dict())
        params_before = {k: v for k, v in host.named_parameters()}
        x_host = x.clone()  # an inference tensor, like the sampler's latent in Forge
        with inference_safe_gradients(host):
            xg = x_host.clone().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(host(xg).square().sum(), xg)
        assert all(p.is_inference() for p in host.parameters())
        assert {k: v for k, v in host.named_parameters()} == params_before  # the very same objects are back
        assert all(len(m._forward_pre_hooks) == 0 for m in host.modules())
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("after", [False, True], ids=["authors-order", "predict-after-update"])
def test_composer_updates_latent_inside_inference_mode(after):
    """The Composer's latent update works when everything (weights, latent, conds) was made in inference mode, in
    the authors' order (one full pass with gradient that also gives the prediction) and with the prediction
    recomputed after the update (where the loss after the update is measured and must have fallen)."""
    unet = make_tiny_unet(0)
    with torch.inference_mode():
        unet_inf = make_tiny_unet(0).requires_grad_(True)  # Forge leaves requires_grad on its inference weights
    before = dict(unet_inf.named_parameters())
    assert all(p_.is_inference() and p_.requires_grad for p_ in unet_inf.parameters())
    assert not any(p_.is_inference() for p_ in unet.parameters())
    settings = CloraSettings(enabled=True, bindings=(Binding("a", ("cat",)), Binding("b", ("dog",))), refine_iters=0,
                             predict_after_update=after)
    plan = ComposePlan(groups=[[[2], [2], [2]], [[5], [5], [5]]], mask_tokens=[[], [2], [5]],
                       cond_loras=[[], [], []], uncond_loras=[[], [], []])

    def run(model, inference: bool):
        host_ctx = (lambda: inference_safe_gradients(model)) if inference else None
        comp = Composer(settings=settings, plan=plan, rows=LoraRows([]), capture=AttentionCapture(model), unet=model,
                        map_size=(2, 2), total_steps=4, grad_context=host_ctx)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 4, 8, 8, generator=g)
        conds = torch.randn(3, 1, 77, 64, generator=g)
        uncond = torch.randn(1, 77, 64, generator=g)
        sigma = torch.tensor([3.0])

        def model_fn(xr, sr, cr):
            return model(xr, timesteps=sr * 10, context=cr)

        if inference:
            with torch.inference_mode():
                x = x.clone()
                out = comp(x, sigma, uncond.clone(), conds.clone(), model_fn, 0)
        else:
            with torch.no_grad():
                out = comp(x, sigma, uncond, conds, model_fn, 0)
        return x, out, comp.history[0]

    x_ref0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x_ref, out_ref, rec_ref = run(unet, False)
    x_inf, out_inf, rec_inf = run(unet_inf, True)
    assert dict(unet_inf.named_parameters()) == before  # the same objects, still inference tensors with requires_grad
    assert all(p_.is_inference() and p_.requires_grad for p_ in unet_inf.parameters())
    if after:
        assert rec_inf.loss_after < rec_inf.loss_before
    else:
        assert rec_inf.loss_after is None and rec_inf.losses == [rec_inf.loss_before]
    assert not torch.equal(x_ref, x_ref0)  # the update moved the latent
    torch.testing.assert_close(x_inf, x_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_inf[1], out_ref[1], rtol=1e-5, atol=1e-5)


class _Probe(torch.autograd.Function):
    """Identity whose backward calls ``probe()``: run when the backward pass reaches a unit's input."""

    @staticmethod
    def forward(ctx, x, probe):
        ctx.probe = probe
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        ctx.probe()
        return g, None


class ForgeLikeUnit(InPlaceResidual):
    """A unit `recomputing` wraps (it has a boolean ``checkpoint`` flag, as ldm's and Forge's blocks), adding into its
    *input* in place, as Forge's BasicTransformerBlock does (``x += n`` on the block's argument)."""

    def __init__(self):
        super().__init__()
        self.checkpoint = False

    def forward(self, x):
        n = self.lin(self.norm(x))
        x += n
        return x


class ProbeLayer(torch.nn.Module):
    def __init__(self, probe):
        super().__init__()
        self.probe = probe

    def forward(self, x):
        return _Probe.apply(x, self.probe)


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recomputed"])
def test_inference_weights_are_copied_per_unit_and_inplace_inputs_survive_recomputation(monkeypatch, recompute):
    """Forge's weights are inference tensors: autograd gets normal copies, made when a unit runs, so under
    recomputation only the unit being back-propagated holds copies (not the whole model: +10 GB for SDXL in float32);
    and a unit adding into its input in place still gives the exact gradient when recomputed."""
    import weakref

    from clora import gradmode
    from clora.attention import recomputing

    torch.manual_seed(0)
    n_units = 6
    copies = {"made": 0, "freed": 0, "peak": 0}
    alive: list[int] = []
    make = gradmode._normal_copy

    def counted_copy(param):
        c = make(param)
        copies["made"] += 1
        copies["peak"] = max(copies["peak"], copies["made"] - copies["freed"])
        weakref.finalize(c, lambda: copies.__setitem__("freed", copies["freed"] + 1))
        return c

    monkeypatch.setattr(gradmode, "_normal_copy", counted_copy)

    def probe():
        alive.append(copies["made"] - copies["freed"])

    ref = torch.nn.Sequential(*[ForgeLikeUnit() for _ in range(n_units)])
    x = torch.randn(3, 8)
    xr = x.clone().requires_grad_(True)
    y = xr
    for u in ref:  # reference, out of place
        y = y + u.lin(u.norm(y))
    (g_ref,) = torch.autograd.grad(y.square().sum(), xr)

    with torch.inference_mode():
        host = torch.nn.Sequential(*[m for _ in range(n_units) for m in (ProbeLayer(probe), ForgeLikeUnit())])
        host.load_state_dict({f"{2 * int(k.split('.', 1)[0]) + 1}.{k.split('.', 1)[1]}": v
                              for k, v in ref.state_dict().items()})
        params_before = dict(host.named_parameters())
        with inference_safe_gradients(host), recomputing(host, recompute):
            xg = x.clone().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(host(xg * 1.0).square().sum(), xg)
        assert dict(host.named_parameters()) == params_before and all(p.is_inference() for p in host.parameters())
        assert all(not m._forward_pre_hooks and not m._forward_hooks for m in host.modules())
        assert all("forward" not in m.__dict__ for m in host.modules())
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)
    assert len(alive) == n_units
    per_unit = 4  # LayerNorm weight/bias, Linear weight/bias
    assert copies["made"] == (2 if recompute else 1) * n_units * per_unit  # a copy per unit run (and rerun)
    if recompute:  # one unit's copies at a time
        assert copies["peak"] <= per_unit and max(alive) <= per_unit, (copies, alive)
    else:  # saved for the backward pass: the copies autograd needs, of every unit not yet back-propagated
        assert copies["peak"] >= 2 * n_units and alive[0] >= 2 * (n_units - 1), (copies, alive)
