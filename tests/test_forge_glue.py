"""Forge glue units that need no Forge: the sampling wrapper's error reporting, deep-copy safe callbacks, and that
the latent update reaches the sampler's own latent when Forge rebinds ``x`` (inpainting mask, classic DDIM)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from clora.hosts.common import CloraError
from clora.hosts.forge import ForgeHost, ForgeRun, _Shared, _transformer_options
from clora.settings import Binding, CloraSettings

SETTINGS = CloraSettings(enabled=True, bindings=(Binding("cat_v1", ("cat",)), Binding("dog_v1", ("dog",))))


class FakeP:
    def __init__(self):
        self.prompts = ["a cat and a dog"]
        self.extra_generation_params = {}
        self.calls = 0

    def sample(self, *args, **kwargs):
        self.calls += 1
        return "samples"


def test_callbacks_survive_forge_deepcopy_of_model_options():
    class Holder:  # stands for a run holding things that cannot be copied
        def __init__(self):
            self.lock = __import__("threading").Lock()

        def cb(self):
            return 1

    h = Holder()
    options = {"conditioning_modifiers": [_Shared(h.cb)], "model_function_wrapper": _Shared(h.cb)}
    copied = copy.deepcopy(options)
    assert copied["model_function_wrapper"] is options["model_function_wrapper"]
    assert copied["conditioning_modifiers"][0]() == 1
    with pytest.raises(TypeError):
        copy.deepcopy({"x": h.cb})  # what Forge's clone() did before the callbacks were wrapped


def test_preparation_error_is_raised_from_sampling(monkeypatch):
    def bad_prepare(self):
        self.error = ValueError("'dog' (LoRA 'dog_v1') is not in the prompt.")

    monkeypatch.setattr(ForgeRun, "prepare", bad_prepare)
    p = FakeP()
    ForgeHost().process_batch(p, SETTINGS)
    with pytest.raises(CloraError, match="'dog'"):
        p.sample()
    assert p.calls == 0


def test_a_patch_that_never_ran_is_an_error_not_a_silent_plain_image(monkeypatch, forge_denoiser):
    monkeypatch.setattr(ForgeRun, "prepare", lambda self: None)
    monkeypatch.setattr(ForgeRun, "_should_stop", lambda self: False)
    p = FakeP()
    host = ForgeHost()
    host.process_batch(p, SETTINGS)
    with pytest.raises(CloraError, match="(?i)not applied"):
        p.sample()
    assert p.calls == 1
    run = host.run_of(p)
    run.pass_state["applied"] = 3  # the conditioning modifier ran
    assert p.sample() == "samples"
    host.postprocess_batch(p)
    assert "sample" not in p.__dict__  # the class's method again


def test_disabled_settings_leave_p_alone():
    p = FakeP()
    ForgeHost().process_batch(p, CloraSettings())
    assert "sample" not in p.__dict__


def test_transformer_options_for_our_rows():
    sigma = torch.tensor([2.0])
    opts = _transformer_options({"patches": {"x": 1}}, [1, 1, 1, 0, 0, 0], sigma)
    assert opts["cond_or_uncond"] == [1, 1, 1, 0, 0, 0] and opts["patches"] == {"x": 1} and opts["sigmas"] is sigma


# ----- the latent update reaches the sampler's own latent --------------------------------------------------------
#
# Forge's CFGDenoiser.forward rebinds ``x`` before the conditioning modifier sees it: for an inpainting mask
# (``x * nmask + noisy_init * mask``) and for the timestep samplers' classic DDIM eps estimation
# (``x * sqrt(sigma² + 1)``).  The fakes below reproduce exactly those two rebinds and the modifier call; the glue's
# CLoRA-side pieces the update does not depend on (prompt encoding, conds, the Composer) are stubbed.

DELTA = torch.linspace(-1.0, 1.0, 2 * 4 * 4 * 4).reshape(2, 4, 4, 4)
SIGMA = torch.tensor([3.0, 3.0])
MASK = torch.zeros(4, 4, 4)
MASK[:, :, 2:] = 1.0  # Forge's ``mask``: 1 = keep the init image (right half); ``nmask`` = 1 - mask is inpainted


class FakeUnetPatcher:
    """``forge_objects.unet``: clone() and the two patch setters the glue calls."""

    def __init__(self, model_options=None):
        self.model_options = model_options or {}

    def clone(self):
        return FakeUnetPatcher(copy.deepcopy(self.model_options))

    def add_conditioning_modifier(self, fn):
        self.model_options.setdefault("conditioning_modifiers", []).append(fn)

    def set_model_unet_function_wrapper(self, fn):
        self.model_options["model_function_wrapper"] = fn


class ForgeLikeDenoiser:
    """Forge's ``CFGDenoiser`` reduced to what matters here: the two rebinds of ``x``, then the conditioning
    modifiers of ``p.sd_model.forge_objects.unet`` (as Forge's ``sampling_function`` calls them)."""

    def __init__(self, p, mask=None, classic=False):
        self.p = p
        self.mask = mask
        self.nmask = None if mask is None else 1.0 - mask
        self.noisy_init = torch.full((2, 4, 4, 4), 7.0)
        self.classic_ddim_eps_estimation = classic
        self.step, self.steps, self.total_steps = 0, 4, 4
        self.model_inputs = []

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if self.classic_ddim_eps_estimation:
            x = x * ((sigma ** 2.0 + 1.0) ** 0.5)[:, None, None, None]
        if self.mask is not None:
            x = x * self.nmask + self.noisy_init * self.mask
        options = self.p.sd_model.forge_objects.unet.model_options
        model, timestep = object(), sigma
        for modifier in options.get("conditioning_modifiers", []):
            model, x, timestep, *_ = modifier(model, x, timestep, None, None, cond_scale, options, 0)
        self.model_inputs.append(x.clone())
        self.step += 1
        return x


class FakeComposer:
    """Adds ``DELTA`` to the latent it is given at step 0 (what the contrastive update does, in place)."""

    def __init__(self):
        self.updated = []

    def update(self, x, sigma, uncond, conds, model, step):
        if step != 0 or step in self.updated:
            return False
        self.updated.append(step)
        x.add_(DELTA)
        return True


class SamplingP:
    """A Forge ``p`` whose ``sample`` does what Forge's does around the denoiser: make the sampler, call
    ``process_before_every_sampling``, then call the denoiser with the sampler's own latent ``self.latent``."""

    def __init__(self, mask=None, classic=False, host=None, settings=None, fail=None):
        self.prompt, self.prompts, self.steps, self.is_hr_pass = "a cat and a dog", ["a cat and a dog"], 4, False
        self.extra_generation_params = {}
        self.sd_model = SimpleNamespace(forge_objects=SimpleNamespace(unet=FakeUnetPatcher()))
        self.mask, self.classic, self.host, self.settings, self.fail = mask, classic, host, settings, fail
        self.latent = torch.zeros(2, 4, 4, 4)
        self.latents = []  # the sampler's latent after each denoiser call

    def sample(self, *args, **kwargs):
        from modules import sd_samplers_cfg_denoiser as cfgmod

        denoiser = cfgmod.CFGDenoiser(self, self.mask, self.classic)
        self.sampler = SimpleNamespace(model_wrap_cfg=denoiser)
        if self.host is not None:
            self.host.process_before_every_sampling(self, self.settings)
        for _ in range(2):
            denoiser.forward(self.latent, SIGMA, None, None, 7.0, 0.0, None)
            self.latents.append(self.latent.clone())
            if self.fail is not None:
                raise self.fail("stop")
        return self.latent


@pytest.fixture
def forge_denoiser(monkeypatch):
    """``modules.sd_samplers_cfg_denoiser.CFGDenoiser`` as the Forge-like fake; returns the class."""
    from tests.test_webui_glue import fake_module, fake_modules_package

    fake_modules_package(monkeypatch)
    fake_module(monkeypatch, "modules.sd_samplers_cfg_denoiser", CFGDenoiser=ForgeLikeDenoiser)
    return ForgeLikeDenoiser


def clora_p(monkeypatch, **kw):
    """A SamplingP with CLoRA set up on it by ForgeHost (preparation, encoding and the conds stubbed)."""
    monkeypatch.setattr(ForgeRun, "prepare", lambda self: None)
    monkeypatch.setattr(ForgeRun, "_should_stop", lambda self: False)
    monkeypatch.setattr(ForgeRun, "encode_variants", lambda self, steps: None, raising=False)
    monkeypatch.setattr(ForgeRun, "_conds", lambda self, calls, uncond, x: (None, None))
    monkeypatch.setattr(ForgeRun, "_model_fn", lambda self, *a: None)
    composer = FakeComposer()
    monkeypatch.setattr(ForgeRun, "_composer_for", lambda self, x: composer)
    host = ForgeHost()
    p = SamplingP(host=host, settings=SETTINGS, **kw)
    host.process_batch(p, SETTINGS)
    return p, composer


def test_plain_txt2img_update_lands_on_the_sampler_latent(monkeypatch, forge_denoiser):
    p, composer = clora_p(monkeypatch)
    p.sample()
    assert composer.updated == [0]
    assert torch.equal(p.latents[0], DELTA) and torch.equal(p.latents[1], DELTA)  # once, on the latent itself


def test_inpainting_update_reaches_the_sampler_latent_inside_the_mask(monkeypatch, forge_denoiser):
    p, composer = clora_p(monkeypatch, mask=MASK)
    p.sample()
    assert composer.updated == [0]
    nmask = 1.0 - MASK
    assert torch.equal(p.latents[0], DELTA * nmask), "the sampler's latent must get the update where it is inpainted"
    assert torch.equal(p.latents[1], p.latents[0])  # and only once
    # the model input of the update step: Forge's kept region (noisy init) untouched, the inpainted region updated
    seen = p.sampler.model_wrap_cfg.model_inputs[0]
    assert torch.equal(seen, DELTA * nmask + 7.0 * MASK)
    # the next call builds its input from the updated latent: the same as the updated input
    assert torch.equal(p.sampler.model_wrap_cfg.model_inputs[1], seen)


def test_classic_ddim_update_reaches_the_sampler_latent_unscaled(monkeypatch, forge_denoiser):
    p, composer = clora_p(monkeypatch, classic=True)
    p.sample()
    scale = ((SIGMA ** 2 + 1) ** 0.5)[:, None, None, None]
    assert torch.allclose(p.latents[0], DELTA / scale, atol=1e-6)
    inputs = p.sampler.model_wrap_cfg.model_inputs
    assert torch.allclose(inputs[1], inputs[0], atol=1e-6)  # the next input is the updated one


def test_inpainting_with_classic_ddim(monkeypatch, forge_denoiser):
    p, _ = clora_p(monkeypatch, mask=MASK, classic=True)
    p.sample()
    scale = ((SIGMA ** 2 + 1) ** 0.5)[:, None, None, None]
    assert torch.allclose(p.latents[0], DELTA * (1.0 - MASK) / scale, atol=1e-6)
    inputs = p.sampler.model_wrap_cfg.model_inputs
    assert torch.allclose(inputs[1], inputs[0], atol=1e-6)


@pytest.mark.parametrize("mask,classic", [(None, False), (MASK, False), (None, True)])
def test_plain_run_without_clora_is_untouched(forge_denoiser, mask, classic):
    original = forge_denoiser.__dict__["forward"]
    p = SamplingP(mask=mask, classic=classic)
    ForgeHost().process_batch(p, CloraSettings())  # CLoRA off
    p.sample()
    assert torch.equal(p.latent, torch.zeros(2, 4, 4, 4))
    assert forge_denoiser.__dict__["forward"] is original


def test_denoiser_patch_spans_exactly_the_sampling_call(monkeypatch, forge_denoiser):
    original = forge_denoiser.__dict__["forward"]
    host_sample = SamplingP.sample
    seen = []

    def watching_sample(self, *a, **kw):
        seen.append(forge_denoiser.__dict__["forward"] is not original)
        return host_sample(self, *a, **kw)

    monkeypatch.setattr(SamplingP, "sample", watching_sample)
    p, _ = clora_p(monkeypatch, mask=MASK)
    assert forge_denoiser.__dict__["forward"] is original  # not patched before sampling
    p.sample()
    assert seen == [True]
    assert forge_denoiser.__dict__["forward"] is original
    assert ForgeHost().run_of(p).host_call is None


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_denoiser_patch_removed_on_error_and_interrupt(monkeypatch, forge_denoiser, exc_type):
    original = forge_denoiser.__dict__["forward"]
    p, composer = clora_p(monkeypatch, mask=MASK, fail=exc_type)
    with pytest.raises(exc_type):
        p.sample()
    assert composer.updated == [0] and torch.equal(p.latents[0], DELTA * (1.0 - MASK))
    assert forge_denoiser.__dict__["forward"] is original
    assert ForgeHost().run_of(p).host_call is None
    plain = SamplingP(mask=MASK)
    plain.sample()  # the host's own forward again
    assert torch.equal(plain.latent, torch.zeros(2, 4, 4, 4))


class WrapperCallingDenoiser(ForgeLikeDenoiser):
    """The Forge-like denoiser that also makes the model call through the UNet patcher's function wrapper."""

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        out = ForgeLikeDenoiser.forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)
        wrapper = self.p.sd_model.forge_objects.unet.model_options.get("model_function_wrapper")
        if wrapper is not None:
            wrapper(lambda x_, t_, **c: x_, {"input": out, "timestep": sigma, "c": {}, "cond_or_uncond": [0]})
        return out


@pytest.mark.parametrize("user_error", [True, False], ids=["user-error", "bug"])
def test_error_while_patching_stops_sampling_at_the_first_model_call(monkeypatch, forge_denoiser, user_error):
    """Forge only logs what ``process_before_every_sampling`` raises and samples on: a user's error (e.g. a NaN
    conditioning) is kept, not raised there (no traceback), and the first model call raises it; a bug is raised
    there too (Forge prints its traceback) and also stops the sampling at its first model call."""
    from tests.test_webui_glue import fake_module

    fake_module(monkeypatch, "modules.sd_samplers_cfg_denoiser", CFGDenoiser=WrapperCallingDenoiser)
    monkeypatch.setattr(ForgeRun, "prepare", lambda self: None)
    monkeypatch.setattr(ForgeRun, "_should_stop", lambda self: False)
    error = CloraError("The text encoder gave non-finite values (NaN or inf).") if user_error else KeyError("boom")

    def encode(self, steps):
        raise error

    monkeypatch.setattr(ForgeRun, "encode_variants", encode, raising=False)
    host = ForgeHost()
    p = SamplingP(host=host, settings=SETTINGS)
    original_patcher = p.sd_model.forge_objects.unet
    host.process_batch(p, SETTINGS)
    forge_hook = host.process_before_every_sampling
    raised_by_hook = []

    def logging_hook(p_, settings):  # Forge's scripts runner: logs the exception and goes on
        try:
            forge_hook(p_, settings)
        except Exception as exc:
            raised_by_hook.append(exc)

    host.process_before_every_sampling = logging_hook
    with pytest.raises(CloraError, match="non-finite" if user_error else "boom"):
        p.sample()
    assert p.latents == []  # not one step sampled
    assert (raised_by_hook == []) == user_error
    assert original_patcher.model_options == {}  # the host's own patcher untouched (a clone was patched)
    assert p.sd_model.forge_objects.unet is original_patcher  # and back in place: no patched clone stays


def test_patched_clone_is_removed_from_the_shared_model_after_sampling(monkeypatch, forge_denoiser):
    """Forge's model object outlives the generation: the patched clone (whose callbacks refer to the run) must not
    stay on it, in any of the ``forge_objects`` the passes used."""
    p, composer = clora_p(monkeypatch)
    original_patcher = p.sd_model.forge_objects.unet
    p.sample()
    assert composer.updated == [0]
    assert p.sd_model.forge_objects.unet is original_patcher and original_patcher.model_options == {}
    run = ForgeHost().run_of(p)
    assert run.patched == []
    ForgeHost().postprocess_batch(p)
    assert ForgeHost().run_of(p) is None and run.composer is None
