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
        unet_inf = make_tiny_unet(0)
    assert all(p_.is_inference() for p_ in unet_inf.parameters())
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
    if after:
        assert rec_inf.loss_after < rec_inf.loss_before
    else:
        assert rec_inf.loss_after is None and rec_inf.losses == [rec_inf.loss_before]
    assert not torch.equal(x_ref, x_ref0)  # the update moved the latent
    torch.testing.assert_close(x_inf, x_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_inf[1], out_ref[1], rtol=1e-5, atol=1e-5)
