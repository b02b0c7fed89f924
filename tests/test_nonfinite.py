"""A NaN or inf anywhere in a CLoRA step stops the generation with a message naming where, never a black image.

The model is the real tiny ldm UNet; only its output for chosen rows (one variant's cond or uncond rows) is
poisoned, as a LoRA that overflows in half precision would poison it.
"""
from __future__ import annotations

import pytest
import torch

import clora
from clora.attention import AttentionCapture
from clora.compose import ComposePlan, Composer, NonFiniteError
from clora.errors import user_message
from clora.hosts.common import is_finite_conditioning
from clora.lora.rows import LoraRows
from clora.settings import Binding, CloraSettings
from tests.models import make_tiny_unet

V, B = 3, 1


@pytest.fixture(scope="module")
def unet():
    return make_tiny_unet(0)


def _composer(unet, **kw):
    settings = CloraSettings(enabled=True, bindings=(Binding("cat_lora", ("cat",)), Binding("dog_lora", ("dog",))),
                             refine_iters=0, **kw)
    plan = ComposePlan(groups=[[[2], [2], [2]], [[5], [5], [5]]], mask_tokens=[[], [2], [5]],
                       cond_loras=[[], [], []], uncond_loras=[[], [], []])
    return Composer(settings=settings, plan=plan, rows=LoraRows([]), capture=AttentionCapture(unet), unet=unet,
                    map_size=(2, 2), total_steps=10, space="k", batched=True)


def _inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(B, 4, 8, 8, generator=g), torch.tensor([3.0]), torch.randn(V, B, 77, 64, generator=g),
            torch.randn(V, B, 77, 64, generator=g))


def _model(unet, poison_rows=()):
    """The UNet; the output rows in ``poison_rows`` (of the call's ``[uncond × V][cond × V]`` layout) become NaN."""

    def fn(x, sigma, cond):
        out = unet(x, timesteps=sigma * 10, context=cond)
        if poison_rows and x.shape[0] == 2 * V * B:
            mask = torch.zeros(x.shape[0], 1, 1, 1, dtype=torch.bool)
            mask[list(poison_rows)] = True
            out = torch.where(mask, torch.full_like(out, float("nan")), out)
        return out

    return fn


@pytest.mark.parametrize("step", [0, 7], ids=["optimised-step", "plain-step"])
def test_nan_prediction_of_one_variant_is_named(unet, step):
    x, sigma, conds, unconds = _inputs()
    comp = _composer(unet)
    assert (step in comp._optimise) == (step == 0)  # the first half is optimised by default
    x_before = x.clone()
    with pytest.raises(NonFiniteError) as info:
        with torch.no_grad():
            comp(x, sigma, unconds, conds, _model(unet, poison_rows=[V * B + 2]), step)  # cond rows of variant 2
    msg = str(info.value)
    assert f"step {step + 1}" in msg and "LoRA 'dog_lora'" in msg and "cat_lora" not in msg
    assert "negative prompt" not in msg
    assert user_message(info.value).startswith("CLoRA: The UNet's prediction")
    if step == 7:
        assert torch.equal(x, x_before)  # nothing was updated on a plain step


def test_nan_in_negative_rows_is_named(unet):
    x, sigma, conds, unconds = _inputs()
    comp = _composer(unet)
    with pytest.raises(NonFiniteError, match=r"the base prompt \(no subject LoRA\), negative prompt"):
        with torch.no_grad():
            comp(x, sigma, unconds, conds, _model(unet, poison_rows=[0]), 7)


def test_finite_run_passes_and_returns_finite(unet):
    x, sigma, conds, unconds = _inputs()
    comp = _composer(unet)
    with torch.no_grad():
        u, c = comp(x, sigma, unconds, conds, _model(unet), 0)
    assert torch.isfinite(u).all() and torch.isfinite(c).all() and torch.isfinite(x).all()


def test_latent_overflow_after_update_stops(unet):
    """A step size that throws the latent to inf (float32 overflow) stops at that step with the step-size hint."""
    x, sigma, conds, unconds = _inputs()
    comp = _composer(unet, step_size=3e38)
    with pytest.raises(NonFiniteError, match=r"latent after the contrastive update at step 1 .*step size"):
        with torch.no_grad():
            comp(x, sigma, unconds, conds, _model(unet), 0)


def test_nan_conditioning_gives_nan_gradient_and_stops(unet):
    """A NaN in one variant's conditioning (a text encoder that overflowed) makes the loss NaN: stopped there."""
    x, sigma, conds, unconds = _inputs()
    conds[1, 0, 3, 0] = float("nan")
    comp = _composer(unet)
    with pytest.raises(NonFiniteError, match=r"loss or its gradient at step 1"):
        with torch.no_grad():
            comp(x, sigma, unconds, conds, _model(unet), 0)
    assert "NonFiniteError" in clora.__all__


def test_is_finite_conditioning_walks_host_structures():
    class Scheduled:  # prompt_parser.ScheduledPromptConditioning: end_at_step, cond
        def __init__(self, cond):
            self.end_at_step, self.cond = 10, cond

    ok = torch.zeros(2, 3)
    bad = ok.clone()
    bad[1, 2] = float("inf")
    assert is_finite_conditioning([[Scheduled(ok)], [Scheduled({"crossattn": ok, "vector": ok[0]})]])
    assert not is_finite_conditioning([[Scheduled(ok)], [Scheduled({"crossattn": ok, "vector": bad})]])
    assert not is_finite_conditioning([[Scheduled(ok), Scheduled(bad)]])
    assert is_finite_conditioning(torch.tensor([1, 2]))  # integer tensors (token ids) are always finite


@pytest.mark.parametrize("emphasis", [None, "Original", "No norm"])
def test_webui_glue_refuses_nonfinite_variant_conditioning(monkeypatch, emphasis):
    """The WebUI glue checks every encoded variant prompt and negative prompt once, before sampling; the message
    names the variant and, under the 'Original' emphasis (whose mean renormalisation gives 0/0 = NaN), says so."""
    import sys
    import types

    from clora.hosts.a1111 import A1111Run
    from clora.hosts.common import CloraError

    if emphasis is not None:
        shared = types.SimpleNamespace(opts=types.SimpleNamespace(emphasis=emphasis))
        monkeypatch.setitem(sys.modules, "modules", types.SimpleNamespace(shared=shared))
    else:
        monkeypatch.setitem(sys.modules, "modules", None)  # not in a WebUI: the import fails

    class Scheduled:
        def __init__(self, cond):
            self.end_at_step, self.cond = 20, cond

    ok = torch.zeros(77, 64)
    nan = ok.clone()
    nan[40] = float("nan")
    settings = CloraSettings(enabled=True, bindings=(Binding("cat_lora", ("cat",)), Binding("dog_lora", ("dog",))))
    run = A1111Run(p=None, settings=settings)
    run.variant_schedules = [[[Scheduled(ok)]]] * 3
    run.negative_schedules = [None, [[Scheduled(ok)]], [[Scheduled(ok)]]]
    run._check_finite()  # all finite: nothing happens

    run.negative_schedules = [None, [[Scheduled(ok)]], [[Scheduled(nan)]]]
    with pytest.raises(CloraError) as info:
        run._check_finite()
    msg = str(info.value)
    assert msg.startswith("CLoRA: The text encoder gave non-finite values")
    assert "the negative prompt of LoRA 'dog_lora'" in msg and "cat_lora" not in msg
    assert ("Emphasis mode 'No norm'" in msg) == (emphasis == "Original")
