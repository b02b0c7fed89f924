"""SDXL in the WebUI glue without a WebUI: only what the glue touches is faked (``p``, the SDXL model's attributes the
glue reads, ``modules.prompt_parser``'s encode/schedule functions, ``modules.shared``, the CFG denoiser, Forge's UNet
patcher and model).  The text encoders, the UNet, the LoRA files and the Composer are the real tiny SDXL ones
(tests/models.py), so what reaches the model rows is computed, not stubbed."""
from __future__ import annotations

from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch

from clora.compose import Conditioning
from clora.hosts.a1111 import A1111Run
from clora.hosts.common import CloraError
from clora.hosts.forge import ForgeRun, _host_cond
from clora.lora.functional import run_with_loras
from clora.sdxl import OpenClipEncode, hf_clip_encode, size_vector
from clora.settings import Binding, CloraSettings
from tests.models import TINY_SDXL, clip_tokenizer, sdxl_context_arg
from tests.test_webui_glue import WordClip, fake_module, fake_modules_package

SPC = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])
SETTINGS = CloraSettings(enabled=True, refine_iters=1,
                         bindings=(Binding("cat_v1", ("cat",)), Binding("dog_v1", ("dog",))))


@pytest.fixture(scope="module")
def sdxl_loras(oc_model, tmp_path_factory):
    from tools.lora_writer import write_sdxl

    unet, te1, te2 = oc_model
    d = tmp_path_factory.mktemp("sdxl-glue-loras")
    return {"cat_v1": write_sdxl(d / "cat_v1.safetensors", unet, te1, te2, "kohya", seed=31),
            "dog_v1": write_sdxl(d / "dog_v1.safetensors", unet, te1, te2, "kohya", seed=32)}


@pytest.fixture(scope="module")
def sd1_lora(tmp_path_factory):
    from tests.models import make_tiny_clip, make_tiny_unet
    from tools import lora_writer as lw

    d = tmp_path_factory.mktemp("sd1-lora")
    return lw.write_kohya(d / "sd1.safetensors", make_tiny_unet(), make_tiny_clip(), seed=3)


# ----- fakes ----------------------------------------------------------------------------------------------------------


class SdConditioning(list):
    """A1111's/Forge's ``prompt_parser.SdConditioning`` (a list with the image size and the negative flag)."""

    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__(prompts)
        self.is_negative_prompt, self.width, self.height = is_negative_prompt, width, height


def encoder(te1, te2):
    """The host's SDXL text conditioning (sgm's conditioner / Forge's engine, reduced): context = te1 ⊕ te2
    penultimate layers, vector = te2's pooled output ⊕ the size embedding; an all-empty negative prompt is zeros."""
    tok = clip_tokenizer()
    seen: list = []

    def get_learned_conditioning(model, texts, steps):
        seen.append((list(texts), getattr(texts, "width", None), getattr(texts, "height", None),
                     getattr(texts, "is_negative_prompt", False)))
        ids = torch.tensor(tok(list(texts), padding="max_length", max_length=77, truncation=True).input_ids)
        h1, _ = hf_clip_encode(te1, ids)
        if hasattr(te2, "text_model"):
            h2, pooled = hf_clip_encode(te2, ids)
        else:
            h2, pooled = OpenClipEncode(te2)(ids)
        w, h = getattr(texts, "width", None) or 1024, getattr(texts, "height", None) or 1024
        vec = torch.cat([pooled, size_vector(len(texts), (h, w), (0, 0), (h, w), dim=TINY_SDXL["size_dim"])], -1)
        cross = torch.cat([h1, h2], -1)
        if getattr(texts, "is_negative_prompt", False) and all(t == "" for t in texts):
            cross, vec = torch.zeros_like(cross), torch.zeros_like(vec)
        return [[SPC(steps, {"crossattn": cross[i], "vector": vec[i]})] for i in range(len(texts))]

    return get_learned_conditioning, seen


def reconstruct_cond_batch(c, step):
    """A1111's reconstruct_cond_batch for single-entry schedules (a dict of stacked rows for dict conditionings)."""
    first = c[0][0].cond
    if isinstance(first, dict):
        return {k: torch.stack([s[0].cond[k] for s in c]) for k in first}
    return torch.stack([s[0].cond for s in c])


def install_fakes(monkeypatch, te1, te2, medvram_sdxl=False):
    fake_modules_package(monkeypatch)
    get, seen = encoder(te1, te2)
    fake_module(monkeypatch, "modules.shared", state=SimpleNamespace(interrupted=False, skipped=False),
                cmd_opts=SimpleNamespace(lowvram=False, medvram=False, medvram_sdxl=medvram_sdxl))
    fake_module(monkeypatch, "modules.prompt_parser", SdConditioning=SdConditioning, get_learned_conditioning=get,
                reconstruct_cond_batch=reconstruct_cond_batch,
                get_learned_conditioning_prompt_schedules=lambda prompts, steps: [[[steps, p]] for p in prompts])
    return seen


class Emb0(WordClip):
    """A1111's hijacked CLIP-L embedder: the tokenizer the glue reads, wrapping sgm's FrozenCLIPEmbedder."""

    def __init__(self, te1):
        super().__init__()
        self.wrapped = SimpleNamespace(transformer=te1)


def a1111_sdxl_model(model):
    unet, te1, te2 = model
    embedders = [Emb0(te1), SimpleNamespace(wrapped=SimpleNamespace(model=te2))]
    return SimpleNamespace(is_sdxl=True, conditioner=SimpleNamespace(embedders=embedders),
                           model=SimpleNamespace(diffusion_model=unet, conditioning_key="crossattn"))


class P:
    def __init__(self, sd_model, prompt="a cat and a dog", negative="ugly", width=128, height=96):
        self.sd_model, self.prompt, self.prompts = sd_model, prompt, [prompt]
        self.negative_prompt, self.negative_prompts = negative, [negative]
        self.steps, self.width, self.height = 4, width, height
        self.extra_generation_params, self.refiner_checkpoint_info = {}, None


def a1111_run(p, files, settings=SETTINGS):
    class Run(A1111Run):
        def lora_file(self, name):
            return files[name]

    return Run(p=p, settings=settings)


def _params(module):
    return {k: (v, v.detach().clone()) for k, v in module.named_parameters()}


def _untouched(module, saved):
    now = dict(module.named_parameters())
    assert now.keys() == saved.keys()
    for k, (obj, val) in saved.items():
        assert now[k] is obj and torch.equal(obj, val), k


def _no_hooks(*modules):
    for m in modules:
        for sub in m.modules():
            assert not sub._forward_hooks and not sub._forward_pre_hooks, type(sub).__name__


# ----- A1111: preparation, refusals -----------------------------------------------------------------------------------


def test_a1111_sdxl_prepare_binds_te2_as_parameter_targets(monkeypatch, oc_model, sdxl_loras):
    install_fakes(monkeypatch, *oc_model[1:])
    run = a1111_run(P(a1111_sdxl_model(oc_model)), sdxl_loras)
    run.prepare()
    assert run.error is None, run.error
    assert run.family == "sdxl" and run.text2 is oc_model[2] and run.text is oc_model[1]
    # every te2 module of both files is a parameter target, with its own LoRA index
    assert {t.lora_index for t in run.text2_params} == {0, 1}
    assert all(t.param.startswith("transformer.resblocks.") for t in run.text2_params)
    assert run.text_targets and all(m in set(oc_model[1].modules()) for m, _i, _l in run.text_targets)


@pytest.mark.parametrize("case", ["medvram_sdxl", "refiner", "sd1_lora", "sd2"])
def test_a1111_sdxl_refusals(monkeypatch, oc_model, sdxl_loras, sd1_lora, case):
    install_fakes(monkeypatch, *oc_model[1:], medvram_sdxl=case == "medvram_sdxl")
    sd_model = a1111_sdxl_model(oc_model)
    p = P(sd_model)
    files = dict(sdxl_loras)
    if case == "refiner":
        p.refiner_checkpoint_info = SimpleNamespace(title="refiner.safetensors")
    if case == "sd1_lora":
        files["dog_v1"] = sd1_lora
    if case == "sd2":
        sd_model.is_sdxl, sd_model.is_sd2 = False, True
    run = a1111_run(p, files)
    run.prepare()
    message = str(CloraError(run.error))
    expected = {
        "medvram_sdxl": "CLoRA: A gradient pass through the UNet is needed, which --medvram-sdxl",
        "refiner": "CLoRA: The refiner is not supported (it swaps the model during sampling): set Refiner to none",
        "sd1_lora": "CLoRA: LoRA 'sd1' is for SD 1.x; the loaded model is SDXL.",
        "sd2": "CLoRA: Only SD 1.x and SDXL models are supported; the loaded model is SD2.",
    }[case]
    assert message.startswith(expected), message


# ----- A1111: per-variant encoding, and what reaches the model rows --------------------------------------------------


def test_a1111_sdxl_encode_applies_each_variants_loras_with_the_pass_size(monkeypatch, oc_model, sdxl_loras):
    """Each variant's prompt is encoded by the host's own conditioning call with SdConditioning carrying the image
    size (and the negative flag), te1 LoRAs through row hooks, te2 LoRAs through functional W + ΔW; afterwards the
    encoders are untouched (same parameter objects and values, no hooks)."""
    seen = install_fakes(monkeypatch, *oc_model[1:])
    te1, te2 = oc_model[1:]
    saved = [_params(te1), _params(te2)]
    run = a1111_run(P(a1111_sdxl_model(oc_model)), sdxl_loras)
    run.prepare()
    assert run.error is None, run.error
    with torch.no_grad():
        run.encode_variants(4)
    assert all((w, h) == (128, 96) for _t, w, h, _n in seen)
    assert [n for _t, _w, _h, n in seen].count(True) == sum(s is not None for s in run.negative_schedules) >= 2
    conds, unconds = run.variant_conds(0, reconstruct_cond_batch(run._encode("ugly", [], 4, negative=True), 0))
    assert isinstance(conds, Conditioning) and isinstance(unconds, Conditioning)
    V = len(run.variants.prompts)
    assert conds.crossattn.shape == (V, 1, 77, TINY_SDXL["te1"] + TINY_SDXL["te2"])
    assert conds.vector.shape == (V, 1, TINY_SDXL["te2_proj"] + 6 * TINY_SDXL["size_dim"])
    # the size part of every vector is this pass's size
    sizes = size_vector(1, (96, 128), (0, 0), (96, 128), dim=TINY_SDXL["size_dim"])
    assert torch.equal(conds.vector[:, 0, TINY_SDXL["te2_proj"]:], sizes.expand(V, -1))
    # variants differ by their LoRAs on both encoders (te1 part of the context, te2 part and pooled vector)
    for a in range(V):
        for b in range(a + 1, V):
            assert (conds.crossattn[a, 0, :, :64] - conds.crossattn[b, 0, :, :64]).abs().max() > 1e-3
            assert (conds.crossattn[a, 0, :, 64:] - conds.crossattn[b, 0, :, 64:]).abs().max() > 1e-3
            assert (conds.vector[a] - conds.vector[b]).abs().max() > 1e-4
    # the binding's variant equals encoding with merged weights (the LoRA really is the file's)
    from tests.test_sdxl import _merged, _resolved

    res = _resolved(oc_model, sdxl_loras["cat_v1"])
    merged1, merged2 = _merged(te1, [(res, 1.0, "text")]), _merged(te2, [(res, 1.0, "text2")])
    ref, _ = encoder(merged1, merged2)
    cat_v = next(v for v, loras in enumerate(run.plan.cond_loras) if [i for i, _w in loras] == [0])
    want = ref(None, SdConditioning([run.variants.prompts[cat_v]], width=128, height=96), 4)[0][0].cond
    assert (want["crossattn"] - conds.crossattn[cat_v, 0]).abs().max() < 1e-4
    assert (want["vector"] - conds.vector[cat_v, 0]).abs().max() < 1e-4
    for m, s in zip((te1, te2), saved):
        _untouched(m, s)
    _no_hooks(te1, te2)


def test_a1111_sdxl_empty_negative_prompt_is_zeroed_as_the_host_does(monkeypatch, oc_model, sdxl_loras):
    seen = install_fakes(monkeypatch, *oc_model[1:])
    run = a1111_run(P(a1111_sdxl_model(oc_model), negative=""), sdxl_loras)
    run.prepare()
    with torch.no_grad():
        run.encode_variants(4)
    negs = [s for s in run.negative_schedules if s is not None]
    assert negs and all(not s[0][0].cond["vector"].any() for s in negs)
    assert any(n and t == [""] for t, _w, _h, n in seen)


def test_te2_functional_restores_the_tower_after_an_error_in_the_host_encode(oc_model, sdxl_loras):
    from clora.lora.files import load_lora
    from clora.lora.keymap import resolve

    unet, te1, te2 = oc_model
    targets = resolve(load_lora(sdxl_loras["cat_v1"]), unet=unet, text_model=te1, text_model_2=te2).param_targets
    saved = _params(te2)
    inside = {}

    def host_encode():
        blk = te2.transformer.resblocks[0].attn
        inside["swapped"] = not isinstance(blk.in_proj_weight, torch.nn.Parameter)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_with_loras(te2, targets, [(0, 1.0)], host_encode)
    assert inside["swapped"]
    _untouched(te2, saved)


class CFGDenoiser(torch.nn.Module):  # A1111's is an nn.Module
    def get_pred_x0(self, x_in, x_out, sigma):
        return x_out


class TimestepDenoiser(CFGDenoiser):
    """A DDIM-like denoiser (eps space): its own get_pred_x0; ``inner_model`` is ``model_wrap`` as in A1111."""

    def __init__(self, inner):
        super().__init__()
        self.model_wrap, self.steps, self.step, self.total_steps = inner, 4, 0, None

    @property
    def inner_model(self):
        return self.model_wrap

    def get_pred_x0(self, x_in, x_out, sigma):
        return x_in - x_out


def host_forward(denoiser, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
    """A1111 1.8's CFGDenoiser.forward for SDXL, reduced: dict conditionings, ``{**c_crossattn, "c_concat": [...]}``,
    cond rows then uncond rows through ``inner_model``, then CFG."""
    c, u = reconstruct_cond_batch(cond, denoiser.step), reconstruct_cond_batch(uncond, denoiser.step)
    B = x.shape[0]
    cond_in = {k: torch.cat([c[k], u[k]]) for k in c}
    out = denoiser.inner_model(torch.cat([x, x]), torch.cat([sigma, sigma]),
                               cond={**cond_in, "c_concat": [torch.cat([image_cond, image_cond])]})
    denoiser.step += 1
    return out[B:] + cond_scale * (out[:B] - out[B:])


def test_a1111_sdxl_forward_feeds_each_variants_crossattn_and_vector_to_the_model_rows(monkeypatch, oc_model,
                                                                                       sdxl_loras):
    install_fakes(monkeypatch, *oc_model[1:])
    fake_module(monkeypatch, "modules.sd_samplers_cfg_denoiser", CFGDenoiser=CFGDenoiser)
    unet = oc_model[0]
    p = P(a1111_sdxl_model(oc_model), width=64, height=64)
    run = a1111_run(p, sdxl_loras)
    run.prepare()
    assert run.error is None, run.error
    with torch.no_grad():
        run.encode_variants(4)
    calls = []

    def inner(x, sigma, cond):  # sgm's DiffusionEngine.apply_model -> OpenAIWrapper: crossattn -> context, vector -> y
        calls.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in cond.items()})
        return unet(x, sigma, context=sdxl_context_arg(unet, cond["crossattn"]), y=cond["vector"])

    host_cond = run._encode(p.prompt, [], 4)
    host_uncond = run._encode(p.negative_prompt, [], 4, negative=True)
    denoiser = TimestepDenoiser(inner)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    image_cond = torch.zeros(1, 5, 1, 1)
    with torch.no_grad():
        out = run.forward(denoiser, host_forward, x, torch.tensor([900.0]), host_uncond, host_cond, 7.0, 0.0,
                          image_cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert denoiser.model_wrap is inner  # the interceptor was swapped in for the host's call only
    assert calls and all(set(c) == {"crossattn", "vector", "c_concat"} for c in calls)
    conds, unconds = run.variant_conds(0, reconstruct_cond_batch(host_uncond, 0))
    V = conds.shape[0]
    want_vec = torch.cat([unconds.vector.flatten(0, 1), conds.vector.flatten(0, 1)])  # [uncond × V][cond × V]
    want_ctx = torch.cat([unconds.crossattn.flatten(0, 1), conds.crossattn.flatten(0, 1)])
    full = [c for c in calls if c["vector"].shape[0] == 2 * V]
    assert full, [c["vector"].shape for c in calls]
    for c in full:
        assert torch.equal(c["vector"], want_vec) and torch.equal(c["crossattn"], want_ctx)
        assert c["c_concat"][0].shape[0] == 2 * V
    # the host's own base rows never reached the model: the fused prediction answered them
    host_vec = reconstruct_cond_batch(host_cond, 0)["vector"]
    assert not any(c["vector"].shape[0] == 2 and torch.equal(c["vector"][:1], host_vec) for c in calls)


# ----- Forge ----------------------------------------------------------------------------------------------------------


class FakePatcher:
    def __init__(self, model, options=None):
        self.model, self.model_options = model, options or {}

    def clone(self):
        return FakePatcher(self.model, dict(self.model_options))

    def add_conditioning_modifier(self, fn):
        self.model_options.setdefault("conditioning_modifiers", []).append(fn)

    def set_model_unet_function_wrapper(self, fn):
        self.model_options["model_function_wrapper"] = fn


def forge_sdxl_model(model, refiner=False):
    unet, te1, te2 = model
    calls = []

    def apply_model(x, t, c_crossattn=None, y=None, transformer_options=None, c_concat=None, **kw):
        calls.append({"c_crossattn": c_crossattn.detach().clone(), "y": None if y is None else y.detach().clone(),
                      "cond_or_uncond": list(transformer_options["cond_or_uncond"])})
        return unet(x, t, context=sdxl_context_arg(unet, c_crossattn), y=y)

    km = SimpleNamespace(diffusion_model=unet, apply_model=apply_model)
    clip = SimpleNamespace(cond_stage_model=SimpleNamespace(clip_l=SimpleNamespace(transformer=te1),
                                                            clip_g=SimpleNamespace(transformer=te2)))
    m = SimpleNamespace(is_sdxl=True, forge_objects=SimpleNamespace(unet=FakePatcher(km), clip=clip))
    if not refiner:
        m.text_processing_engine_l = WordClip()
    return m, calls


def forge_run(p, files):
    class Run(ForgeRun):
        def lora_file(self, name):
            return files[name]

    return Run(p=p, settings=SETTINGS)


def test_forge_host_cond_reads_the_pooled_vector():
    ctx, vec = torch.randn(2, 77, 8), torch.randn(2, 5)
    assert torch.equal(_host_cond({"cross_attn": ctx}), ctx)
    c = _host_cond({"cross_attn": ctx, "pooled_output": vec, "model_conds": {}})
    assert isinstance(c, Conditioning) and c.vector is vec and c.crossattn is ctx
    c = _host_cond({"cross_attn": ctx, "model_conds": {"y": SimpleNamespace(cond=vec)}})
    assert c.vector is vec


def test_forge_sdxl_refiner_is_refused(monkeypatch, hf_model, sdxl_loras):
    install_fakes(monkeypatch, *hf_model[1:])
    m, _ = forge_sdxl_model(hf_model, refiner=True)
    run = forge_run(P(m), sdxl_loras)
    run.prepare()
    assert str(CloraError(run.error)) == ("CLoRA: SDXL refiner models are not supported (CLoRA needs SDXL's CLIP-L "
                                          "text encoder); load an SDXL base model.")


def _forge_sdxl_step(monkeypatch, hf_model, sdxl_loras, batch: int = 1):
    """A Forge SDXL run prepared and patched, then one sampling step through its conditioning modifier and UNet
    wrapper on a batch of ``batch`` images.  Returns (run, apply_model calls, the wrapper's output)."""
    install_fakes(monkeypatch, *hf_model[1:])
    m, calls = forge_sdxl_model(hf_model)
    p = P(m, width=64, height=64)
    p.prompts, p.negative_prompts, p.batch_size = [p.prompt] * batch, [p.negative_prompt] * batch, batch
    p.sampler = SimpleNamespace(model_wrap_cfg=SimpleNamespace(step=0, steps=4, total_steps=None))
    run = forge_run(p, sdxl_loras)
    run.prepare()
    assert run.error is None, run.error
    with torch.no_grad():
        run.patch_unet()
    patched = m.forge_objects.unet
    [modifier] = patched.model_options["conditioning_modifiers"]
    wrapper = patched.model_options["model_function_wrapper"]
    rows = lambda d: {k: v.repeat(batch, *([1] * (v.dim() - 1))) for k, v in d.items()}  # noqa: E731
    host_c = rows(reconstruct_cond_batch(run._encode(p.prompt, [], 4), 0))
    host_u = rows(reconstruct_cond_batch(run._encode(p.negative_prompt, [], 4, negative=True), 0))
    compiled = lambda d: [{"cross_attn": d["crossattn"], "pooled_output": d["vector"],  # noqa: E731
                           "model_conds": {"y": SimpleNamespace(cond=d["vector"])}}]
    x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((batch,), 5.0)
    with torch.no_grad():
        modifier(patched.model, x, sigma, compiled(host_u), compiled(host_c), 7.0, {}, 0)
        out = wrapper(lambda *a, **k: pytest.fail("the host's rows must be answered by CLoRA"),
                      {"input": torch.cat([x, x]), "timestep": torch.cat([sigma, sigma]), "c": {},
                       "cond_or_uncond": [0, 1]})
    assert out.shape == (2 * batch, 4, 8, 8) and torch.isfinite(out).all()
    return run, calls, out


def test_forge_sdxl_variants_reach_apply_model_as_c_crossattn_and_y(monkeypatch, hf_model, sdxl_loras):
    """Forge: clip_l and clip_g both get per-row hooks (no parameter targets); the conditioning modifier and the UNet
    wrapper hand ``apply_model`` each variant's context as ``c_crossattn`` and its pooled vector as ``y``."""
    unet, te1, te2 = hf_model
    saved = [_params(te1), _params(te2)]
    run, calls, _out = _forge_sdxl_step(monkeypatch, hf_model, sdxl_loras)
    assert not run.text2_params
    te2_modules = set(te2.modules())
    assert any(mod in te2_modules for mod, _i, _l in run.text_targets)
    conds, unconds = run.pass_state["conds"], run.pass_state["uncond"]
    assert isinstance(conds, Conditioning) and isinstance(unconds, Conditioning)
    V = conds.shape[0]
    want_y = torch.cat([unconds.vector.flatten(0, 1), conds.vector.flatten(0, 1)])
    full = [c for c in calls if c["y"].shape[0] == 2 * V]
    assert full and all(torch.equal(c["y"], want_y) for c in full)
    assert all(c["y"] is not None and c["c_crossattn"].shape[0] == c["y"].shape[0] for c in calls)
    assert all(c["cond_or_uncond"] == [1] * V + [0] * V for c in full)
    for a in range(V):  # each variant's own vector (its clip_g LoRA changes the pooled output)
        for b in range(a + 1, V):
            assert (conds.vector[a] - conds.vector[b]).abs().max() > 1e-4
    for mod, s in zip((te1, te2), saved):
        _untouched(mod, s)
    _no_hooks(te1, te2)


def test_forge_sdxl_every_model_call_is_whole_chunks_of_the_batch(monkeypatch, hf_model, sdxl_loras):
    """Forge labels a model call's rows in chunks of the batch size (``cond_or_uncond``, from which it derives
    ``cond_mark`` / ``cond_indices`` for its patches): with a batch of 2, every call CLoRA makes — the prediction,
    the gradient passes and the pass that learns the H/32 layers' order for the recomputing memory mode — must carry
    whole chunks (a 1-row call would get an empty label list)."""
    run, calls, _out = _forge_sdxl_step(monkeypatch, hf_model, sdxl_loras, batch=2)
    assert run.settings.grad_memory == "auto"  # checkpoint on SDXL: the layer-order pass runs
    assert len(calls) >= 3  # layer order, gradient pass(es), prediction
    assert any(c["c_crossattn"].shape[0] == 2 for c in calls)  # the layer-order pass: one chunk
    for c in calls:
        assert c["cond_or_uncond"] and len(c["cond_or_uncond"]) * 2 == c["c_crossattn"].shape[0], (
            c["cond_or_uncond"], c["c_crossattn"].shape)
