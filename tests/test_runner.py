"""End-to-end tests of the engine through the standalone runner on a tiny random-weight SD1-style checkpoint."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from tests.models import fixtures_dir

SIZE = 128  # latent 16x16, attention maps 4x4: small enough for CPU tests


@pytest.fixture(scope="module")
def lm():
    from clora.runner import load_model

    return load_model(fixtures_dir() / "tiny-sd1.safetensors")


@pytest.fixture(scope="module")
def loras(lm, tmp_path_factory):
    """Three distinct kohya LoRAs (one LoCon) shaped for the tiny checkpoint, named by concept."""
    from tools.lora_writer import write_kohya

    d = tmp_path_factory.mktemp("loras")
    return {
        "cat": write_kohya(d / "cat.safetensors", lm.unet, lm.text_model, seed=11),
        "dog": write_kohya(d / "dog.safetensors", lm.unet, lm.text_model, conv=True, seed=12),
        "hat": write_kohya(d / "hat.safetensors", lm.unet, lm.text_model, seed=13),
    }


def _settings(n: int = 2, **kw):
    from clora.settings import Binding, CloraSettings

    binds = (Binding("cat", ("cat",), "sks"), Binding("dog", ("dog",), "xyz"), Binding("hat", ("hat",), ""))[:n]
    return CloraSettings(enabled=True, bindings=binds, **kw)


PROMPT3 = "a photo of a cat and a dog with a hat"


def _plain_reference(lm, prompt, negative, steps, cfg, seed, size):
    """Plain CFG sampling written here, independently of the runner: k-diffusion Euler over CompVisDenoiser."""
    import k_diffusion as K

    den = K.external.CompVisDenoiser(lm.model)
    sigmas = den.get_sigmas(steps)
    x = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    with torch.no_grad():
        c = lm.model.get_learned_conditioning([prompt])
        u = lm.model.get_learned_conditioning([negative])

        def f(x_, s_):
            out = den(torch.cat([x_, x_]), torch.cat([s_, s_]), cond=torch.cat([u, c]))
            a, b = out.chunk(2)
            return a + (b - a) * cfg

        torch.manual_seed(seed)
        return K.sampling.sample_euler(f, x, sigmas, disable=True)


def _module_state(module: torch.nn.Module):
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__) for n, m in module.named_modules()}
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    return hooks, weights


def test_disabled_is_bit_identical_to_plain_sampling(lm, loras):
    from clora.runner import generate

    s = replace(_settings(2), enabled=False)
    res = generate(lm, "a photo of a cat and a dog", s, loras=list(loras.values()), steps=4, cfg_scale=6.0, seed=3,
                   width=SIZE, height=SIZE, progress=False)
    ref = _plain_reference(lm, "a photo of a cat and a dog", "", 4, 6.0, 3, SIZE)
    assert torch.equal(res.latent, ref)


def test_same_seed_same_image_and_host_state_restored(lm, loras):
    from clora.runner import generate

    before_hooks, before_w = _module_state(lm.model)
    plain_before = generate(lm, "a photo of a cat and a dog", replace(_settings(2), enabled=False), steps=3, seed=5,
                            width=SIZE, height=SIZE, progress=False)
    s = _settings(2, refine_iters=1)
    a = generate(lm, "a photo of a cat and a dog", s, loras=[loras["cat"], loras["dog"]], steps=4, seed=5,
                 width=SIZE, height=SIZE, progress=False)
    b = generate(lm, "a photo of a cat and a dog", s, loras=[loras["cat"], loras["dog"]], steps=4, seed=5,
                 width=SIZE, height=SIZE, progress=False)
    assert torch.equal(a.latent, b.latent)
    assert not torch.equal(a.latent, plain_before.latent)
    after_hooks, after_w = _module_state(lm.model)
    assert after_hooks == before_hooks
    assert all(torch.equal(before_w[k], after_w[k]) for k in before_w)
    plain_after = generate(lm, "a photo of a cat and a dog", replace(_settings(2), enabled=False), steps=3, seed=5,
                           width=SIZE, height=SIZE, progress=False)
    assert torch.equal(plain_before.latent, plain_after.latent)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m_karras"])
@pytest.mark.parametrize("n", [2, 3])
def test_runner_two_and_three_loras_across_samplers(lm, loras, sampler, n):
    from clora.runner import generate

    s = _settings(n, refine_iters=1)
    res = generate(lm, PROMPT3, s, loras=list(loras.values())[:n], sampler=sampler, steps=4, seed=1, width=SIZE,
                   height=SIZE, progress=False)
    assert len(res.images) == 1 and res.images[0].size == (SIZE, SIZE)
    assert torch.isfinite(res.latent).all()
    assert res.masks.shape == (1, n + 1, 1, SIZE // 8, SIZE // 8)
    # every latent pixel is covered by at least one variant (the base takes what no concept mask covers)
    assert (res.masks.sum(1) >= 1).all()
    assert [r.step for r in res.history] == [0, 1]  # opt_end 0.5 of 4 steps, one update per step
    assert res.history[0].iterations == 2  # refinement at step 0
    assert len(res.prompts) == n + 1 and "sks cat" in res.prompts[1]


def test_loss_falls_and_concept_masks_separate(lm, loras):
    """Over the optimised steps the contrastive loss falls, and the two concepts' masks overlap less than with the
    same seeds without the latent update (random weights, 4x4 maps: the IoU is averaged over the optimised steps and
    over seeds)."""
    from clora.runner import generate

    base = _settings(2, refine_iters=2, mask_threshold=0.9)
    ious = {0.0: [], 20.0: []}
    drops = []
    for seed in (1, 2, 3):
        for alpha in ious:
            res = generate(lm, "a photo of a cat and a dog", replace(base, step_size=alpha),
                           loras=[loras["cat"], loras["dog"]], steps=10, seed=seed, width=SIZE, height=SIZE,
                           progress=False)
            ious[alpha].extend(iou for step, iou in res.step_ious if step < 5)
            if alpha:
                assert len(res.history) == 5
                # the authors' order: each refinement iteration's pass sees the previous update
                refined = [r for r in res.history if r.iterations > 1]
                assert refined and all(len(r.losses) == r.iterations for r in res.history)
                drops.extend(r.losses[0] - r.losses[-1] for r in refined)
                assert res.history[0].losses[-1] < res.history[0].losses[0]
                assert all(r.loss_after is None for r in res.history)  # no pass runs on the final latent
    assert sum(drops) / len(drops) > 0
    assert sum(ious[20.0]) < sum(ious[0.0]), ious


def test_interrupt_mid_generation_restores_everything(lm, loras, monkeypatch):
    import clora.compose as compose
    from clora.runner import generate

    before_hooks, before_w = _module_state(lm.model)
    calls = {"n": 0}
    real = compose.fuse

    def exploding(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(compose, "fuse", exploding)
    with pytest.raises(KeyboardInterrupt):
        generate(lm, "a photo of a cat and a dog", _settings(2), loras=[loras["cat"], loras["dog"]], steps=4, seed=2,
                 width=SIZE, height=SIZE, progress=False)
    after_hooks, after_w = _module_state(lm.model)
    assert after_hooks == before_hooks
    assert all(torch.equal(before_w[k], after_w[k]) for k in before_w)


def test_should_stop_ends_refinement(lm, loras):
    from clora.runner import generate

    res = generate(lm, "a photo of a cat and a dog", _settings(2, refine_iters=5), loras=[loras["cat"], loras["dog"]],
                   steps=4, seed=2, width=SIZE, height=SIZE, progress=False, should_stop=lambda: True)
    assert res.history[0].iterations == 1


def test_bad_input_messages(lm, loras, tmp_path):
    from clora.lora.types import LoraError
    from clora.prompts import PromptError
    from clora.runner import generate
    from tools.lora_writer import write_sdxl_like

    with pytest.raises(PromptError, match="dog"):
        generate(lm, "a photo of a cat", _settings(2), loras=[loras["cat"], loras["dog"]], steps=2, width=SIZE,
                 height=SIZE, progress=False)
    with pytest.raises(LoraError, match="not found"):
        generate(lm, "a photo of a cat and a dog", _settings(2), loras=[loras["cat"]], steps=2, width=SIZE,
                 height=SIZE, progress=False)
    sdxl = write_sdxl_like(tmp_path / "dog.safetensors")
    with pytest.raises(LoraError, match="SDXL"):
        generate(lm, "a photo of a cat and a dog", _settings(2), loras=[loras["cat"], sdxl], steps=2, width=SIZE,
                 height=SIZE, progress=False)


def test_cli_writes_image_previews_and_report(lm, loras, tmp_path):
    from clora.__main__ import main

    out = tmp_path / "out.png"
    argv = ["generate", "--ckpt", str(fixtures_dir() / "tiny-sd1.safetensors"), "--prompt", "a photo of a cat and a dog",
            "--lora", str(loras["cat"]), "--lora", str(loras["dog"]), "--bind", "cat=cat:sks:0.9", "--bind", "dog=dog",
            "--steps", "3", "--width", str(SIZE), "--height", str(SIZE), "--refine-iters", "1", "--out", str(out)]
    assert main(argv) == 0
    assert out.exists() and out.with_name("out.masks.png").exists() and out.with_name("out.attention.png").exists()
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["settings"]["bindings"][0]["weight"] == 0.9
    assert report["steps"][0]["step"] == 0
    bad = argv[:]
    bad[bad.index("a photo of a cat and a dog")] = "a photo of a cat"
    assert main(bad) == 2


def test_batched_rows_equal_one_call_per_variant(lm, loras):
    """One batched call over all variants' rows gives what separate per-variant calls give (float rounding aside)."""
    from clora.runner import generate

    kw = dict(loras=[loras["cat"], loras["dog"]], steps=3, seed=4, width=SIZE, height=SIZE, progress=False)
    a = generate(lm, "a photo of a cat and a dog", _settings(2, refine_iters=0), batched=True, **kw)
    b = generate(lm, "a photo of a cat and a dog", _settings(2, refine_iters=0), batched=False, **kw)
    assert torch.allclose(a.latent, b.latent, rtol=1e-4, atol=1e-4)
    assert torch.equal(a.masks, b.masks)


def test_gradient_pass_with_checkpointing_and_trainable_params(lm, loras):
    """A host model with ldm checkpointing on and parameters requiring grad (A1111's SD1 yaml and loader) still gets
    a real latent gradient; both settings are back as they were afterwards."""
    from clora.runner import generate

    flags = [(m, a) for m in lm.unet.modules() for a in ("checkpoint", "use_checkpoint") if isinstance(m.__dict__.get(a), bool)]
    assert flags
    params = list(lm.unet.parameters())
    try:
        for m, a in flags:
            setattr(m, a, True)
        for p in params[::2]:
            p.requires_grad_(True)
        res = generate(lm, "a photo of a cat and a dog", _settings(2, refine_iters=0, predict_after_update=True),
                       loras=[loras["cat"], loras["dog"]], steps=4, seed=6, width=SIZE, height=SIZE, progress=False)
        assert res.history[0].loss_after < res.history[0].loss_before
        assert all(getattr(m, a) is True for m, a in flags)
        assert [p.requires_grad for p in params] == [i % 2 == 0 for i in range(len(params))]
    finally:
        for m, a in flags:
            setattr(m, a, False)
        for p in params:
            p.requires_grad_(False)


# ----- context length -------------------------------------------------------------------------------------------------


def test_prompt_length_limit_comes_from_the_model(lm, loras):
    """``LoadedModel.max_tokens`` (BOS and EOS included) decides which prompts are refused, in the plain and the CLoRA
    path: a prompt at the limit runs, one token more is refused with a message naming both numbers."""
    from clora.runner import RunnerError, generate

    assert lm.max_tokens == 77
    prompt = "a photo of a cat and a dog"  # 8 ids: 10 tokens with BOS/EOS
    kw = dict(steps=1, width=SIZE, height=SIZE, progress=False)
    plain = replace(_settings(2), enabled=False)
    small = replace(lm, max_tokens=10)
    generate(small, prompt, plain, **kw)
    with pytest.raises(RunnerError) as e:
        generate(small, prompt + " on grass", plain, **kw)
    assert str(e.value).startswith("The prompt is 12 tokens; this model's text encoder takes at most 10 (")
    with pytest.raises(RunnerError, match="^The negative prompt is 12 tokens; .* at most 10 "):
        generate(small, prompt, plain, negative="a blurry photo of a small bird on the grass", **kw)

    # CLoRA: every variant must fit; the triggers "sks" (1 id) and "xyz" (2 ids) make them 11 and 12 tokens long
    clora = _settings(2, refine_iters=0)
    both = [loras["cat"], loras["dog"]]
    generate(replace(lm, max_tokens=12), prompt, clora, loras=both, **kw)
    with pytest.raises(RunnerError) as e:
        generate(replace(lm, max_tokens=11), prompt, clora, loras=both, **kw)
    assert str(e.value).startswith(
        "The prompt with the trigger words of LoRA 'dog' is 12 tokens; this model's text encoder takes at most 11 (")
    with pytest.raises(RunnerError) as e:
        generate(small, prompt, clora, loras=both, **kw)
    assert str(e.value).startswith(
        "The prompt with the trigger words of LoRA 'cat' is 11 tokens; this model's text encoder takes at most 10 (")
    with pytest.raises(RunnerError, match="^The prompt is 12 tokens; .* at most 10 "):
        generate(small, prompt + " on grass", clora, loras=both, **kw)


def test_default_limit_is_one_sd_chunk(lm, loras):
    from clora.runner import RunnerError, generate

    kw = dict(steps=1, width=SIZE, height=SIZE, progress=False)
    generate(lm, "cat " * 75, replace(_settings(2), enabled=False), **kw)  # 75 ids + BOS + EOS = 77
    with pytest.raises(RunnerError, match="^The prompt is 78 tokens; this model's text encoder takes at most 77 "):
        generate(lm, "cat " * 76, replace(_settings(2), enabled=False), **kw)
    with pytest.raises(RunnerError, match="^The prompt is 78 tokens; .* at most 77 "):
        generate(lm, "a cat and a dog " + "cat " * 71, _settings(2), loras=[loras["cat"], loras["dog"]], **kw)
    with pytest.raises(RunnerError, match="BREAK"):
        generate(lm, "a photo of a cat BREAK a dog", _settings(2), loras=[loras["cat"], loras["dog"]], **kw)


# ----- plain LoRAs (CLoRA off: LoRAs merged) ---------------------------------------------------------------------------


def _merged_lm(lm, lora_weights):
    """A deep copy of ``lm`` with ``W + weight * ΔW`` merged into its weights for each ``(LoRA file, weight)``; ΔW is
    written by the reference of tests/test_rows.py (up @ down · alpha/rank in float64), not by the code under test."""
    import copy

    from clora.lora.files import load_lora
    from clora.lora.keymap import resolve
    from tests.test_rows import ref_delta

    names = {id(m): n for n, m in lm.model.named_modules()}
    model = copy.deepcopy(lm.model)
    layers = dict(model.named_modules())
    components = set()
    with torch.no_grad():
        for path, weight in lora_weights:
            res = resolve(load_lora(path), unet=lm.unet, text_model=lm.text_model)
            for component, _path, module, lmod in res.targets:
                components.add(component)
                w = layers[names[id(module)]].weight
                w.copy_((w.double() + weight * ref_delta(lmod, w)).to(w.dtype))
    assert components == {"unet", "text"}
    return replace(lm, model=model)


def test_plain_loras_equal_sampling_with_merged_weights(lm, loras):
    from clora.runner import generate

    off = _off()
    kw = dict(steps=4, cfg_scale=6.0, seed=7, width=SIZE, height=SIZE, progress=False)
    prompt, negative = "a photo of a cat and a dog", "blurry"
    res = generate(lm, prompt, off, loras=[loras["cat"], loras["dog"]], negative=negative,
                   plain_loras=[("dog", -0.6), ("cat", 0.8)], **kw)
    ref = _plain_reference(_merged_lm(lm, [(loras["cat"], 0.8), (loras["dog"], -0.6)]), prompt, negative, 4, 6.0, 7,
                               SIZE)
    plain = _plain_reference(lm, prompt, negative, 4, 6.0, 7, SIZE)
    # float32 rounding (merged W + ΔW against W x + ΔW x) only: the latents reach ~50, the LoRAs move them by ~10
    atol = 1e-5 * float(ref.abs().max())
    assert float((ref - plain).abs().max()) > 1e4 * atol  # the LoRAs do change the image
    torch.testing.assert_close(res.latent, ref, rtol=1e-4, atol=atol)
    assert res.plain_loras == [("dog", -0.6), ("cat", 0.8)]

    one = generate(lm, prompt, off, loras=[loras["cat"]], negative=negative, plain_loras=[("cat", 0.5)], **kw)
    ref_one = _plain_reference(_merged_lm(lm, [(loras["cat"], 0.5)]), prompt, negative, 4, 6.0, 7, SIZE)
    torch.testing.assert_close(one.latent, ref_one, rtol=1e-4, atol=1e-5 * float(ref_one.abs().max()))


def test_plain_loras_take_loaded_lora_files(lm, loras):
    from clora.lora.files import load_lora
    from clora.runner import generate

    kw = dict(steps=2, seed=3, width=SIZE, height=SIZE, progress=False, plain_loras=[("cat", 0.8)])
    by_path = generate(lm, "a photo of a cat", _off(), loras=[loras["cat"]], **kw)
    by_object = generate(lm, "a photo of a cat", _off(), loras=[load_lora(loras["cat"])], **kw)
    assert torch.equal(by_path.latent, by_object.latent)


def test_no_plain_loras_is_bit_identical_to_plain_sampling(lm, loras):
    from clora.runner import generate

    kw = dict(steps=4, cfg_scale=6.0, seed=3, width=SIZE, height=SIZE, progress=False)
    ref = _plain_reference(lm, "a photo of a cat and a dog", "", 4, 6.0, 3, SIZE)
    for given in ((), []):
        res = generate(lm, "a photo of a cat and a dog", _off(), loras=list(loras.values()),
                       plain_loras=given, **kw)
        assert torch.equal(res.latent, ref)


def test_plain_loras_leave_the_model_as_it_was(lm, loras, monkeypatch):
    import k_diffusion as K

    from clora.runner import generate

    before_hooks, before_w = _module_state(lm.model)
    kw = dict(loras=[loras["cat"], loras["dog"]], plain_loras=[("cat", 1.0), ("dog", 0.5)], steps=2, seed=1,
              width=SIZE, height=SIZE, progress=False)
    generate(lm, "a photo of a cat", _off(), **kw)
    assert _module_state(lm.model)[0] == before_hooks
    assert all(torch.equal(before_w[k], v) for k, v in _module_state(lm.model)[1].items())

    seen = {}

    def exploding(model, x, sigmas, **_):
        model(x, sigmas[0] * x.new_ones([x.shape[0]]))
        seen["hooks"] = sum(len(m._forward_hooks) for m in lm.unet.modules())
        raise RuntimeError("boom inside sampling")

    monkeypatch.setattr(K.sampling, "sample_euler", exploding)
    with pytest.raises(RuntimeError, match="boom inside sampling"):
        generate(lm, "a photo of a cat", _off(), **kw)
    assert seen["hooks"] > 0  # the LoRAs were applied through hooks while sampling ...
    after_hooks, after_w = _module_state(lm.model)
    assert after_hooks == before_hooks  # ... and none is left
    assert all(torch.equal(before_w[k], after_w[k]) for k in before_w)


def test_plain_lora_errors(lm, loras):
    from clora.lora.types import LoraError
    from clora.runner import RunnerError, generate

    kw = dict(steps=1, width=SIZE, height=SIZE, progress=False)
    with pytest.raises(LoraError, match=r"^LoRA 'horse' not found \(given: cat, dog\)"):
        generate(lm, "a cat", _off(), loras=[loras["cat"], loras["dog"]], plain_loras=[("horse", 1.0)], **kw)
    with pytest.raises(LoraError, match=r"^LoRA 'cat' not found \(given: none\)"):
        generate(lm, "a cat", _off(), plain_loras=[("cat", 1.0)], **kw)
    with pytest.raises(RunnerError, match=r"style LoRAs \(settings\.styles"):
        generate(lm, "a photo of a cat and a dog", _settings(2), loras=[loras["cat"], loras["dog"]],
                 plain_loras=[("cat", 1.0)], **kw)
    with pytest.raises(RunnerError, match="finite"):
        generate(lm, "a cat", _off(), loras=[loras["cat"]], plain_loras=[("cat", float("nan"))], **kw)


def test_cli_lora_tag_merges_loras_with_clora_off(lm, loras, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from clora.__main__ import main
    from clora.runner import generate

    out = tmp_path / "merged.png"
    base = ["generate", "--ckpt", str(fixtures_dir() / "tiny-sd1.safetensors"), "--prompt", "a photo of a cat",
            "--lora", str(loras["cat"]), "--lora", str(loras["dog"]), "--steps", "3", "--seed", "2",
            "--width", str(SIZE), "--height", str(SIZE)]
    assert main(base + ["--lora-tag", "cat:0.8", "--lora-tag", "dog", "--out", str(out)]) == 0
    assert out.exists() and not out.with_name("merged.masks.png").exists()
    assert json.loads(out.with_suffix(".json").read_text())["plain_loras"] == [["cat", 0.8], ["dog", 1.0]]
    want = generate(lm, "a photo of a cat", _off(), loras=[loras["cat"], loras["dog"]],
                    plain_loras=[("cat", 0.8), ("dog", 1.0)], steps=3, seed=2, width=SIZE, height=SIZE,
                    progress=False).images[0]
    plain = generate(lm, "a photo of a cat", _off(), steps=3, seed=2, width=SIZE, height=SIZE,
                     progress=False).images[0]
    got = np.asarray(Image.open(out))
    assert np.array_equal(got, np.asarray(want))
    assert not np.array_equal(got, np.asarray(plain))

    capsys.readouterr()
    assert main(base + ["--lora-tag", "horse:1", "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip() == "CLoRA: LoRA 'horse' not found (given: cat, dog)."
    assert main(base + ["--lora-tag", "cat", "--bind", "cat=cat", "--out", str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("CLoRA: Plain LoRAs (--lora-tag) apply only with CLoRA off") and "--style" in err
    with pytest.raises(SystemExit) as e:
        main(base + ["--lora-tag", "cat:heavy"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "CLoRA: Argument --lora-tag: --lora-tag 'cat:heavy': weight 'heavy' is not a number.")


def _off():
    from clora.settings import CloraSettings

    return CloraSettings(enabled=False)
