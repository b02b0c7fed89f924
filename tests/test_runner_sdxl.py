"""End-to-end CLoRA on the tiny SDXL through the standalone runner (`SDXLModel`), for both layouts of the second
text encoder (open_clip as A1111/sgm hold it, transformers' CLIPTextModelWithProjection as Forge holds it)."""
from __future__ import annotations

import math

import pytest
import torch

from tests.models import TINY_SDXL, make_tiny_sdxl, sdxl_context_arg
from tests.test_runner import _module_state

SIZE = 128  # latent 16x16; the H/32 maps (4x4) come from the down-sampling-4 level, as SDXL's at 1024 px
PROMPT = "a photo of a cat and a dog"


def _vae():
    from ldm.models.autoencoder import AutoencoderKL
    from tools.make_fixtures import tiny_vae_ddconfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        vae = AutoencoderKL(ddconfig=tiny_vae_ddconfig(), lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)
    return vae.eval().requires_grad_(False)


def _lm(kind: str):
    from clora.runner import SDXLModel
    from tests.models import clip_tokenizer

    unet, te1, te2 = make_tiny_sdxl(kind)
    return SDXLModel(unet, te1, te2, clip_tokenizer(), vae=_vae(), size_dim=TINY_SDXL["size_dim"],
                     context_arg=lambda c: sdxl_context_arg(unet, c))


@pytest.fixture(scope="module", params=["open_clip", "hf"])
def lm(request):
    return _lm(request.param)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    from tools.lora_writer import write_sdxl

    unet, te1, te2 = make_tiny_sdxl("open_clip")  # te2 keys under HF names: the same file fits both layouts
    d = tmp_path_factory.mktemp("sdxl-runner-loras")
    return {"cat": write_sdxl(d / "cat.safetensors", unet, te1, te2, "kohya", seed=31),
            "dog": write_sdxl(d / "dog.safetensors", unet, te1, te2, "loha", seed=32)}


def _settings(**kw):
    from clora.settings import Binding, CloraSettings

    return CloraSettings(enabled=True, bindings=(Binding("cat", ("cat",), "sks"), Binding("dog", ("dog",), "")), **kw)


def _state(lm):
    return [_module_state(m) for m in (lm.unet, lm.text_model, lm.text_model_2)]


def _reference_conditioning(lm, texts, h, w):
    """SDXL's context and y written here from the libraries' own forwards, independently of clora.sdxl: te1
    ``hidden_states[-2]``; te2's penultimate hidden state caught at the input of its last block (open_clip) or
    ``hidden_states[-2]`` (HF), its pooled output from its own forward; sizes by the written-out formula."""
    tok = lm.tokenizer_obj(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids = tok["input_ids"]
    h1 = lm.text_model(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    te2 = lm.text_model_2
    if hasattr(te2, "transformer") and hasattr(te2.transformer, "resblocks"):
        caught = {}
        hook = te2.transformer.resblocks[-1].register_forward_pre_hook(
            lambda _m, args: caught.__setitem__("x", args[0].permute(1, 0, 2)))
        try:
            pooled = te2(ids)
        finally:
            hook.remove()
        h2 = caught["x"]
    else:
        out = te2(input_ids=ids, output_hidden_states=True)
        h2, pooled = out.hidden_states[-2], out.text_embeds
    dim = TINY_SDXL["size_dim"]
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    feats = []
    for v in (h, w, 0, 0, h, w):
        a = float(v) * freqs
        feats.append(torch.cat([torch.cos(a), torch.sin(a)]))
    sizes = torch.cat(feats).expand(ids.shape[0], -1)
    return torch.cat([h1, h2], -1), torch.cat([pooled, sizes], -1)


def _plain_reference(lm, prompt, negative, steps, cfg, seed, size):
    """Plain CFG sampling on the SDXL UNet written here: k-diffusion Euler over ``CompVisDenoiser`` of a small
    wrapper whose schedule is ldm's own ``make_beta_schedule`` (linear 0.00085..0.012, SDXL's)."""
    import k_diffusion as K
    import numpy as np
    from ldm.modules.diffusionmodules.util import make_beta_schedule

    betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    ac = torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("alphas_cumprod", ac)

        def apply_model(self, x, t, cond):
            return lm.unet(x, t, context=[cond[0]] * 2, y=cond[1])

    den = K.external.CompVisDenoiser(Wrap())
    sigmas = den.get_sigmas(steps)
    x = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    with torch.no_grad():
        c = _reference_conditioning(lm, [prompt], size, size)
        u = _reference_conditioning(lm, [negative], size, size)

        def f(x_, s_):
            out = den(torch.cat([x_, x_]), torch.cat([s_, s_]),
                      cond=(torch.cat([u[0], c[0]]), torch.cat([u[1], c[1]])))
            a, b = out.chunk(2)
            return a + (b - a) * cfg

        torch.manual_seed(seed)
        return K.sampling.sample_euler(f, x, sigmas, disable=True)


def test_disabled_is_bit_identical_to_plain_sampling(lm, loras):
    from dataclasses import replace

    from clora.runner import generate

    res = generate(lm, PROMPT, replace(_settings(), enabled=False), loras=list(loras.values()), steps=4,
                   cfg_scale=6.0, seed=3, width=SIZE, height=SIZE, progress=False)
    ref = _plain_reference(lm, PROMPT, "", 4, 6.0, 3, SIZE)
    assert torch.equal(res.latent, ref)
    assert res.images[0].size == (SIZE, SIZE)


def test_clora_runs_loss_falls_and_state_is_restored(lm, loras):
    from dataclasses import replace

    from clora.runner import generate

    before = _state(lm)
    plain_before = generate(lm, PROMPT, replace(_settings(), enabled=False), steps=3, seed=5, width=SIZE,
                            height=SIZE, progress=False)
    kw = dict(loras=[loras["cat"], loras["dog"]], steps=4, seed=5, width=SIZE, height=SIZE, progress=False)
    a = generate(lm, PROMPT, _settings(refine_iters=3), **kw)
    b = generate(lm, PROMPT, _settings(refine_iters=3), **kw)
    assert torch.equal(a.latent, b.latent) and torch.isfinite(a.latent).all()
    assert [r.step for r in a.history] == [0, 1]  # opt_end 0.5 of 4 steps
    assert a.history[0].iterations == 4 and len(a.history[0].losses) == 4
    assert a.history[0].losses[-1] < a.history[0].losses[0], a.history[0].losses
    assert a.masks.shape == (1, 3, 1, SIZE // 8, SIZE // 8)
    assert "sks cat" in a.prompts[1]
    no_update = generate(lm, PROMPT, _settings(refine_iters=3, step_size=0.0), **kw)
    assert not torch.equal(no_update.latent, a.latent)
    after = _state(lm)
    for (hb, wb), (ha, wa) in zip(before, after):
        assert ha == hb
        assert all(torch.equal(wb[k], wa[k]) for k in wb)
    plain_after = generate(lm, PROMPT, replace(_settings(), enabled=False), steps=3, seed=5, width=SIZE,
                           height=SIZE, progress=False)
    assert torch.equal(plain_before.latent, plain_after.latent)


@pytest.mark.parametrize("how", ["error", "interrupt"])
def test_error_and_interrupt_restore_everything(lm, loras, monkeypatch, how):
    import clora.compose as compose
    from clora.runner import generate

    before = _state(lm)
    calls = {"n": 0}
    real = compose.fuse

    def exploding(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt if how == "interrupt" else RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(compose, "fuse", exploding)
    with pytest.raises(KeyboardInterrupt if how == "interrupt" else RuntimeError):
        generate(lm, PROMPT, _settings(), loras=[loras["cat"], loras["dog"]], steps=4, seed=2, width=SIZE,
                 height=SIZE, progress=False)
    assert calls["n"] == 3
    for (hb, wb), (ha, wa) in zip(before, _state(lm)):
        assert ha == hb
        assert all(torch.equal(wb[k], wa[k]) for k in wb)


def test_plain_loras_equal_sampling_with_merged_weights(loras):
    """CLoRA off with ``plain_loras``: hooks on the UNet and te1, functional calls on open_clip's te2 = sampling a
    copy with all three merged (float32 rounding only)."""
    import copy

    from clora.lora.files import load_lora
    from clora.lora.keymap import resolve
    from clora.runner import SDXLModel, generate
    from tests.test_rows import ref_delta

    lm = _lm("open_clip")
    pairs = [(loras["cat"], 0.8), (loras["dog"], -0.5)]
    res = generate(lm, PROMPT, _settings().__class__(enabled=False), loras=[p for p, _ in pairs], negative="blurry",
                   plain_loras=[("cat", 0.8), ("dog", -0.5)], steps=4, cfg_scale=6.0, seed=7, width=SIZE,
                   height=SIZE, progress=False)
    unet, te1, te2 = (copy.deepcopy(m) for m in (lm.unet, lm.text_model, lm.text_model_2))
    originals = {id(m): n for root in (lm.unet, lm.text_model) for n, m in root.named_modules()}
    copies = {**{n: m for n, m in unet.named_modules()}}
    te1_layers = dict(te1.named_modules())
    te2_params = dict(te2.named_parameters())
    with torch.no_grad():
        for path, weight in pairs:
            r = resolve(load_lora(path), unet=lm.unet, text_model=lm.text_model, text_model_2=lm.text_model_2)
            for comp, _p, module, lmod in r.targets:
                layer = (copies if comp == "unet" else te1_layers)[originals[id(module)]]
                layer.weight.copy_((layer.weight.double() + weight * ref_delta(lmod, layer.weight)).float())
            for t in r.param_targets:
                part = te2_params[t.param][t.span[0]:t.span[0] + t.span[1]] if t.span else te2_params[t.param]
                part.copy_((part.double() + weight * ref_delta(t.module, part)).float())
    merged = SDXLModel(unet, te1, te2, lm.tokenizer_obj, size_dim=TINY_SDXL["size_dim"],
                       context_arg=lambda c: sdxl_context_arg(unet, c))
    ref = _plain_reference(merged, PROMPT, "blurry", 4, 6.0, 7, SIZE)
    plain = _plain_reference(lm, PROMPT, "blurry", 4, 6.0, 7, SIZE)
    atol = 1e-5 * float(ref.abs().max())
    assert float((ref - plain).abs().max()) > 1e3 * atol
    err = float((res.latent - ref).abs().max())
    assert err <= atol, (err, atol)
    print(f"\nSDXL plain LoRAs vs merged sampling: max abs error {err:.2e} (latent up to {float(ref.abs().max()):.1f})")


def test_sd1_lora_refused_on_sdxl_and_checkpoint_family(lm, tmp_path):
    from safetensors.torch import save_file

    from clora.lora.types import LoraError
    from clora.runner import RunnerError, generate, load_model
    from tests.models import make_tiny_clip, make_tiny_unet
    from tools.lora_writer import write_kohya

    sd1 = write_kohya(tmp_path / "cat.safetensors", make_tiny_unet(), make_tiny_clip(), seed=3)
    # its header says sd_v1 (kohya's ss_base_model_version): refused by family before any module is bound
    with pytest.raises(LoraError, match=r"^LoRA 'cat' is for SD 1\.x; the loaded model is SDXL\.$"):
        generate(lm, "a photo of a cat", _one_binding(), loras=[sd1], steps=1, width=SIZE, height=SIZE,
                 progress=False)
    ckpt = tmp_path / "xl.safetensors"
    save_file({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(64, 2048)},
              str(ckpt))
    with pytest.raises(RunnerError, match="is an SDXL model; .*SDXLModel"):
        load_model(ckpt)


def _one_binding():
    from clora.settings import Binding, CloraSettings

    return CloraSettings(enabled=True, bindings=(Binding("cat", ("cat",), ""),))


def test_ddim_with_clora_updates_the_latent(lm, loras):
    """DDIM (ε space, SDXL's schedule from `SDXLModel.alphas_cumprod`): the update runs at the scheduled steps and
    the refinement lowers the loss."""
    from clora.runner import generate

    kw = dict(loras=[loras["cat"], loras["dog"]], sampler="ddim", steps=4, seed=4, width=SIZE, height=SIZE,
              progress=False)
    res = generate(lm, PROMPT, _settings(refine_iters=3), **kw)
    off = generate(lm, PROMPT, _settings(refine_iters=3, step_size=0.0), **kw)
    assert [r.step for r in res.history] == [0, 1]
    assert res.history[0].losses[-1] < res.history[0].losses[0], res.history[0].losses
    assert torch.isfinite(res.latent).all() and not torch.equal(res.latent, off.latent)
