"""SDXL core: the tiny SDXL fixture, SDXL LoRA files on two text encoders (HF and open_clip layouts), LoRAs applied
without writing weights (per-row hooks, functional calls into open_clip's fused attention) against merged-weight
copies, family refusals, and the per-variant pooled vector ``y`` through the Composer."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.models import TINY_SDXL, sdxl_context_arg, tiny_sdxl_adm_channels
from tests.test_rows import ref_delta

SIZE_DIM = TINY_SDXL["size_dim"]


@pytest.fixture(scope="module")
def sdxl_files(oc_model, hf_model, tmp_path_factory):
    """SDXL LoRA files for the tiny model: kohya, LyCORIS LoHa, peft; te2 keys under HF names (they fit both te2
    layouts, whose shapes agree)."""
    from tools.lora_writer import write_sdxl

    unet, te1, te2 = oc_model
    d = tmp_path_factory.mktemp("sdxl-loras")
    return {
        "kohya": write_sdxl(d / "a.safetensors", unet, te1, te2, "kohya", seed=21),
        "kohya_b": write_sdxl(d / "b.safetensors", unet, te1, te2, "kohya", seed=22),
        "loha": write_sdxl(d / "c.safetensors", unet, te1, te2, "loha", seed=23),
        "peft": write_sdxl(d / "d.safetensors", unet, te1, hf_model[2], "peft", seed=24),
    }


def _ids(n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49000, (n, 77), generator=g)
    ids[:, 0] = 49406
    for r in range(n):
        ids[r, 5 + 3 * r:] = 49407  # EOS then EOS padding, at a different place in each row
    return ids


def _params(module: torch.nn.Module):
    return {k: (v, v.detach().clone()) for k, v in module.named_parameters()}


def _assert_untouched(module: torch.nn.Module, saved) -> None:
    now = dict(module.named_parameters())
    assert now.keys() == saved.keys()
    for k, (obj, value) in saved.items():
        assert now[k] is obj, k
        assert torch.equal(now[k], value), k
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


def _merged(model: torch.nn.Module, res_weights) -> torch.nn.Module:
    """A deep copy of ``model`` with ``W + weight·ΔW`` written into it for ``(ResolvedLora, weight, component)``;
    ΔW from tests/test_rows.ref_delta (float64, from the factors), not from the code under test."""
    names = {id(m): n for n, m in model.named_modules()}
    out = copy.deepcopy(model)
    layers = dict(out.named_modules())
    params = dict(out.named_parameters())
    with torch.no_grad():
        for res, weight, comp in res_weights:
            for c, _path, module, lmod in res.targets:
                if c == comp and id(module) in names:
                    w = layers[names[id(module)]].weight
                    w.copy_((w.double() + weight * ref_delta(lmod, w)).to(w.dtype))
            if comp == "text2":
                for t in res.param_targets:
                    p = params[t.param]
                    part = p if t.span is None else p[t.span[0]:t.span[0] + t.span[1]]
                    part.copy_((part.double() + weight * ref_delta(t.module, part)).to(p.dtype))
    return out


# ----- fixture ------------------------------------------------------------------------------------------------------


def test_tiny_sdxl_fixture_shapes(oc_model):
    from clora.runner import unet_family

    unet, te1, te2 = oc_model
    attn2 = [n for n, _ in unet.named_modules() if n.endswith("attn2")]
    # attention only at down-sampling 2 and 4 (levels 1, 2), two transformer blocks each, none at level 0
    assert {n.split(".transformer_blocks.")[0] for n in attn2} == {
        "input_blocks.4.1", "input_blocks.5.1", "input_blocks.7.1", "input_blocks.8.1", "middle_block.1",
        *(f"output_blocks.{k}.1" for k in range(6))}
    assert {n.split(".transformer_blocks.")[1][0] for n in attn2} == {"0", "1"}
    assert unet.get_submodule(attn2[0]).to_k.in_features == TINY_SDXL["te1"] + TINY_SDXL["te2"]
    assert isinstance(unet.input_blocks[4][1].proj_in, torch.nn.Linear)  # use_linear_in_transformer
    assert unet.label_emb[0][0].in_features == tiny_sdxl_adm_channels() == TINY_SDXL["te2_proj"] + 6 * SIZE_DIM
    assert isinstance(te2.transformer.resblocks[0].attn, torch.nn.MultiheadAttention)
    assert unet_family(unet) == "sdxl"


def test_fourier_size_embedding_matches_sgm_formula():
    from clora.sdxl import fourier_embedding, size_vector

    v = torch.tensor([[1024.0, 768.0]])
    emb = fourier_embedding(v, 8)
    # written out: cos/sin of v * 10000^(-i/4), i = 0..3, per scalar
    freqs = torch.tensor([10000.0 ** (-i / 4) for i in range(4)], dtype=torch.float64)
    ref = torch.cat([torch.cat([torch.cos(x * freqs), torch.sin(x * freqs)]) for x in (1024.0, 768.0)])
    torch.testing.assert_close(emb[0].double(), ref, atol=1e-4, rtol=0)
    sv = size_vector(2, (1024, 768), (0, 16), (512, 512), 8)
    assert sv.shape == (2, 48)
    torch.testing.assert_close(sv[1, :16], emb[0])
    assert torch.equal(sv[0], sv[1])
    assert torch.equal(sv[:, 16:20], torch.ones(2, 4))  # crop top 0: cos 0 = 1


def test_open_clip_encode_matches_open_clip(oc_model):
    """`OpenClipEncode` (sgm's computation) agrees with open_clip's own ``encode_text``-style forward: the pooled
    output is what ``TextTransformer.forward`` returns."""
    from clora.sdxl import open_clip_encode

    te2 = oc_model[2]
    ids = _ids()
    hidden, pooled = open_clip_encode(te2, ids)
    with torch.no_grad():
        ref_pooled = te2(ids)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=1e-5)
    assert hidden.shape == (3, 77, TINY_SDXL["te2"])


# ----- LoRA files and keymap ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["kohya", "loha", "peft"])
@pytest.mark.parametrize("te2_kind", ["open_clip", "hf"])
def test_sdxl_lora_files_bind_every_module(layout, te2_kind, oc_model, hf_model, sdxl_files):
    from clora.lora.files import load_lora
    from clora.lora.keymap import resolve

    unet, te1, te2 = oc_model if te2_kind == "open_clip" else hf_model
    lora = load_lora(sdxl_files[layout])
    assert lora.family == "sdxl"
    assert {k.split("_text_model")[0] for k in lora.modules if k.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    res = resolve(lora, unet=unet, text_model=te1, text_model_2=te2)
    assert res.unmatched == [] and res.skipped == [] and res.note is None
    assert res.matched == res.total == len(lora.modules)
    n_te2 = 6 * TINY_SDXL["te2_layers"]
    comps = [c for c, *_ in res.targets]
    assert comps.count("text") == 6 * 2  # tiny CLIP-L: 2 layers
    if te2_kind == "open_clip":
        assert len(res.param_targets) == n_te2 and "text2" not in comps
        spans = {t.span for t in res.param_targets if t.param.endswith("in_proj_weight")}
        d = TINY_SDXL["te2"]
        assert spans == {(0, d), (d, d), (2 * d, d)}
    else:
        assert comps.count("text2") == n_te2 and not res.param_targets
    # transformer_blocks.1 (depth 2) and label_emb-free attention layers are reached
    assert any(".transformer_blocks.1." in p for c, p, *_ in res.targets if c == "unet")


def test_open_clip_keymap_matches_a1111_names(oc_model):
    """The HF names kohya writes for te2 map onto open_clip's modules as A1111's Lora extension does:
    q/k/v -> thirds of attn.in_proj_weight, out_proj -> attn.out_proj, fc1/fc2 -> mlp.c_fc/c_proj."""
    from clora.lora.keymap import open_clip_param_table

    table = open_clip_param_table(oc_model[2])
    d = TINY_SDXL["te2"]
    assert table["lora_te2_text_model_encoder_layers_1_self_attn_k_proj"] == (
        "transformer.resblocks.1.attn.in_proj_weight", (d, d))
    assert table["lora_te2_text_model_encoder_layers_0_self_attn_out_proj"] == (
        "transformer.resblocks.0.attn.out_proj.weight", None)
    assert table["lora_te2_text_model_encoder_layers_0_mlp_fc1"] == ("transformer.resblocks.0.mlp.c_fc.weight", None)
    assert table["lora_te2_text_model_encoder_layers_0_mlp_fc2"] == ("transformer.resblocks.0.mlp.c_proj.weight", None)
    assert len(table) == 6 * TINY_SDXL["te2_layers"]


def test_family_refusals_both_ways(tmp_path, oc_model, sdxl_files):
    from clora.lora.files import check_family, detect_family, load_lora
    from clora.lora.keymap import resolve
    from clora.lora.types import LoraError, LoraModule
    from clora.runner import checkpoint_family
    from tools.lora_writer import write_sdxl_like

    def mod(key, out_f, in_f):
        return LoraModule(key, "lora", {"down": torch.zeros(4, in_f), "up": torch.zeros(out_f, 4)})

    base = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_"
    for width, family in ((768, "sd1"), (1024, "sd2"), (2048, "sdxl")):
        mods = {base + p: mod(base + p, 640, width) for p in ("to_k", "to_v")}
        assert detect_family(mods) == family
    sd1 = load_lora(write_sdxl_like(tmp_path / "x.safetensors"))
    sd1.family = "sd1"
    with pytest.raises(LoraError, match=r"^LoRA 'x' is for SD 1\.x; the loaded model is SDXL\.$"):
        check_family(sd1, "sdxl")
    xl = load_lora(sdxl_files["kohya"])
    with pytest.raises(LoraError, match=r"^LoRA 'a' is for SDXL; the loaded model is SD 1\.x\.$"):
        check_family(xl, "sd1")
    check_family(xl, "sdxl")

    # a LoRA for the tiny SD1 model does not fit the tiny SDXL (its shapes say nothing about the family)
    from tests.models import make_tiny_clip, make_tiny_unet
    from tools.lora_writer import write_kohya

    tiny_sd1 = load_lora(write_kohya(tmp_path / "sd1.safetensors", make_tiny_unet(), make_tiny_clip(), seed=3))
    unet, te1, te2 = oc_model
    with pytest.raises(LoraError, match="only .* modules match this model"):
        resolve(tiny_sd1, unet=unet, text_model=te1, text_model_2=te2)

    # checkpoints: the width of attn2.to_k decides, a second text encoder + label_emb make a tiny one SDXL
    k = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    assert checkpoint_family({k: torch.zeros(640, 2048)}) == "sdxl"
    assert checkpoint_family({k: torch.zeros(320, 768)}) == "sd1"
    assert checkpoint_family({k: torch.zeros(64, 160)}) == "unknown"
    assert checkpoint_family({k: torch.zeros(64, 160), "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1),
                              "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1)}) == "sdxl"


# ----- LoRAs applied without writing: against merged copies -------------------------------------------------------


def _resolved(model, path):
    from clora.lora.files import load_lora
    from clora.lora.keymap import resolve

    unet, te1, te2 = model
    return resolve(load_lora(path), unet=unet, text_model=te1, text_model_2=te2)


def test_open_clip_functional_loras_equal_merged_weights(oc_model, sdxl_files):
    """Per-row-group functional application on open_clip's fused attention = a copy with the LoRAs merged (≤1e-5),
    and the tower is untouched afterwards, also after an exception inside the functional call."""
    import dataclasses

    from clora.sdxl import open_clip_encode

    te2 = oc_model[2]
    ra, rb = _resolved(oc_model, sdxl_files["kohya"]), _resolved(oc_model, sdxl_files["loha"])
    targets = [dataclasses.replace(t, lora_index=0) for t in ra.param_targets] + [
        dataclasses.replace(t, lora_index=1) for t in rb.param_targets]
    ids = _ids(3)
    saved = _params(te2)
    rows = [[], [(0, 0.8)], [(0, 0.5), (1, -0.7)]]
    hidden, pooled = open_clip_encode(te2, ids, targets, rows)
    _assert_untouched(te2, saved)
    refs = [te2, _merged(te2, [(ra, 0.8, "text2")]), _merged(te2, [(ra, 0.5, "text2"), (rb, -0.7, "text2")])]
    worst = 0.0
    plain_h, _ = open_clip_encode(te2, ids)
    for r, ref in enumerate(refs):
        h, p = open_clip_encode(ref, ids[r:r + 1])
        worst = max(worst, float((h - hidden[r:r + 1]).abs().max()), float((p - pooled[r:r + 1]).abs().max()))
        if r:
            assert float((h - plain_h[r:r + 1]).abs().max()) > 1e-2  # the LoRA does change the encoding
    assert worst <= 1e-5, worst
    print(f"\nopen_clip functional vs merged: max abs error {worst:.2e}")

    class Boom(RuntimeError):
        pass

    def explode(*_):
        raise Boom

    h = te2.transformer.resblocks[1].register_forward_hook(explode)
    try:
        with pytest.raises(Boom):
            open_clip_encode(te2, ids, targets, rows)
    finally:
        h.remove()
    _assert_untouched(te2, saved)
    again, _ = open_clip_encode(te2, ids, targets, rows)
    assert torch.equal(again, hidden)


@pytest.mark.parametrize("te2_kind", ["open_clip", "hf"])
def test_sdxl_encode_per_row_equals_merged(te2_kind, oc_model, hf_model, sdxl_files):
    """The SDXL conditioning (context te1 ⊕ te2, y = pooled ⊕ sizes) of rows with different LoRAs, computed by hooks
    (te1, HF te2) and functional calls (open_clip te2) in one encode, equals encoding with merged copies."""
    from clora.lora.rows import LoraRows, RowPlan
    from clora.runner import SDXLModel, _targets
    from tests.models import clip_tokenizer

    model = oc_model if te2_kind == "open_clip" else hf_model
    unet, te1, te2 = model
    lm = SDXLModel(unet, te1, te2, clip_tokenizer(), size_dim=SIZE_DIM, context_arg=lambda c: sdxl_context_arg(unet, c))
    from clora.lora.files import load_lora

    files = [load_lora(sdxl_files["kohya"]), load_lora(sdxl_files["peft"])]
    ptargets: list = []
    _u, text_t, _n = _targets(lm, files, ptargets)
    assert bool(ptargets) == (te2_kind == "open_clip")
    texts = ["a photo of a cat", "a sks cat", "a dog and a cat"]
    rows = [[], [(0, 1.0)], [(0, 0.6), (1, 0.9)]]
    saved = [_params(m) for m in (te1, te2)]
    with LoraRows(text_t) as te, torch.no_grad():
        te.plan = RowPlan.from_lists(rows)
        enc = lm.encode(texts, size=(128, 96), row_loras=rows, param_targets=ptargets)
    for m, s in zip((te1, te2), saved):
        _assert_untouched(m, s)
    assert enc.crossattn.shape == (3, 77, TINY_SDXL["te1"] + TINY_SDXL["te2"])
    assert enc.vector.shape == (3, tiny_sdxl_adm_channels())
    res = [_resolved(model, sdxl_files[k]) for k in ("kohya", "peft")]
    worst = 0.0
    for r, loras in enumerate(rows):
        pairs = [(res[i], w) for i, w in loras]
        m1 = _merged(te1, [(x, w, "text") for x, w in pairs])
        m2 = _merged(te2, [(x, w, "text2") for x, w in pairs])
        ref_lm = SDXLModel(unet, m1, m2, clip_tokenizer(), size_dim=SIZE_DIM)
        with torch.no_grad():
            ref = ref_lm.encode(texts[r:r + 1], size=(128, 96))
        worst = max(worst, float((ref.crossattn - enc.crossattn[r:r + 1]).abs().max()),
                    float((ref.vector - enc.vector[r:r + 1]).abs().max()))
    assert worst <= 1e-5, worst
    print(f"\nSDXL encode ({te2_kind} te2) per-row vs merged: max abs error {worst:.2e}")


def test_sdxl_unet_per_row_equals_merged(oc_model, sdxl_files):
    from clora.lora.rows import LoraRows, RowPlan, targets_of

    unet = oc_model[0]
    res = [_resolved(oc_model, sdxl_files[k]) for k in ("kohya", "loha")]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([900, 500, 100])
    ctx = torch.randn(3, 77, TINY_SDXL["te1"] + TINY_SDXL["te2"], generator=g)
    y = torch.randn(3, tiny_sdxl_adm_channels(), generator=g)
    rows = [[], [(0, 1.0)], [(0, 0.5), (1, 0.3)]]
    saved = _params(unet)
    with LoraRows(targets_of(res, "unet")) as lr, torch.no_grad():
        lr.plan = RowPlan.from_lists(rows)
        out = unet(x, t, context=sdxl_context_arg(unet, ctx), y=y)
    _assert_untouched(unet, saved)
    worst, scale = 0.0, 0.0
    for r, loras in enumerate(rows):
        ref = _merged(unet, [(res[i], w, "unet") for i, w in loras])
        with torch.no_grad():
            o = ref(x[r:r + 1], t[r:r + 1], context=sdxl_context_arg(ref, ctx[r:r + 1]), y=y[r:r + 1])
        worst = max(worst, float((o - out[r:r + 1]).abs().max()))
        scale = max(scale, float(o.abs().max()))
    assert worst <= 1e-5 * max(1.0, scale), (worst, scale)
    print(f"\nSDXL UNet per-row vs merged: max abs error {worst:.2e} (outputs up to {scale:.1f})")


# ----- the per-variant pooled vector through the Composer -----------------------------------------------------------


def _composer(unet, V: int, **kw):
    from clora.attention import AttentionCapture
    from clora.compose import ComposePlan, Composer
    from clora.lora.rows import LoraRows
    from clora.settings import Binding, CloraSettings

    binds = tuple(Binding(f"l{k}", (f"w{k}",), "") for k in range(V - 1))
    settings = CloraSettings(enabled=True, bindings=binds, refine_iters=1, **kw)
    groups = [[[2 + k] for _ in range(V)] for k in range(V - 1)]
    plan = ComposePlan(groups=groups, mask_tokens=[[]] + [[2 + k] for k in range(V - 1)],
                       cond_loras=[[] for _ in range(V)], uncond_loras=[[] for _ in range(V)])
    return Composer(settings=settings, plan=plan, rows=LoraRows([]), capture=AttentionCapture(unet), unet=unet,
                    map_size=(4, 4), total_steps=4)


@pytest.mark.parametrize("batched", [True, False])
def test_each_variant_vector_reaches_label_emb(oc_model, batched):
    """Row r of every UNet call (gradient passes and fused passes) receives, at label_emb, the vector of the variant
    (and part: uncond/cond) that row belongs to."""
    from clora.compose import Conditioning

    unet = oc_model[0]
    V, B, T = 3, 2, 77
    D, Dy = TINY_SDXL["te1"] + TINY_SDXL["te2"], tiny_sdxl_adm_channels()
    g = torch.Generator().manual_seed(9)
    conds = Conditioning(torch.randn(V, B, T, D, generator=g), torch.randn(V, B, Dy, generator=g))
    unconds = Conditioning(torch.randn(V, B, T, D, generator=g), torch.randn(V, B, Dy, generator=g))
    seen: list[torch.Tensor] = []
    hook = unet.label_emb.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))

    def model(x, sigma, cond):
        assert isinstance(cond, Conditioning)
        return unet(x, sigma, context=sdxl_context_arg(unet, cond.crossattn), y=cond.vector)

    comp = _composer(unet, V)
    comp.batched = batched
    x = torch.randn(B, 4, 16, 16, generator=g)
    try:
        with torch.no_grad():
            for step in range(3):
                comp(x, torch.full((B,), 500.0 - 100 * step), unconds, conds, model, step)
    finally:
        hook.remove()
    full = torch.cat([unconds.vector.flatten(0, 1), conds.vector.flatten(0, 1)])  # rows [uncond × V][cond × V]
    per_variant = [torch.cat([unconds.vector[v], conds.vector[v]]) for v in range(V)]
    big = [ys for ys in seen if ys.shape[0] == 2 * V * B]
    small = [ys for ys in seen if ys.shape[0] == 2 * B]
    # grad_memory "auto" recomputes on SDXL: one no-grad pass over one chunk (B rows) first learns the H/32 layer order
    one = [ys for ys in seen if ys.shape[0] == B]
    assert len(big) + len(small) + len(one) == len(seen)
    assert len(one) == 1 and torch.equal(one[0], full[:B])
    assert big and all(torch.equal(ys, full) for ys in big)  # gradient passes (and batched fused passes)
    if batched:
        assert not small
    else:  # fused passes as one call per variant, in variant order
        assert small and len(small) % V == 0
        assert all(torch.equal(ys, per_variant[i % V]) for i, ys in enumerate(small))


def test_conditioning_path_equals_tensor_path_when_the_vector_is_unused(oc_model):
    """The SD1 tensor path and the Conditioning path give bit-identical results when the model ignores the vector
    (the engine moves the context the same way in both)."""
    from clora.compose import Conditioning

    unet = oc_model[0]
    V, B, T = 3, 1, 77
    D, Dy = TINY_SDXL["te1"] + TINY_SDXL["te2"], tiny_sdxl_adm_channels()
    g = torch.Generator().manual_seed(4)
    ctx, uctx = torch.randn(V, B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    fixed_y = torch.randn(1, Dy, generator=g)

    def run(cond_like):
        def model(x, sigma, cond):
            c = cond.crossattn if isinstance(cond, Conditioning) else cond
            return unet(x, sigma, context=sdxl_context_arg(unet, c), y=fixed_y.expand(x.shape[0], -1))

        comp = _composer(unet, V)
        x = torch.randn(B, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        outs = []
        with torch.no_grad():
            for step in range(3):
                outs.append(comp(x, torch.full((B,), 600.0 - 100 * step), cond_like[0], cond_like[1], model, step))
        return x, outs, comp.history

    xa, oa, ha = run((uctx, ctx))
    vec = torch.randn(V, B, Dy, generator=g)
    xb, ob, hb = run((Conditioning(uctx, vec[0]), Conditioning(ctx, vec)))
    assert torch.equal(xa, xb)
    for (ua, ca), (ub, cb) in zip(oa, ob):
        assert torch.equal(ua, ub) and torch.equal(ca, cb)
    assert [r.losses for r in ha] == [r.losses for r in hb] and ha


def test_conditioning_shape_errors():
    from clora.compose import Conditioning

    with pytest.raises(ValueError, match="leading shape"):
        Conditioning(torch.zeros(2, 3, 77, 8), torch.zeros(3, 2, 5))
    c = Conditioning(torch.zeros(2, 3, 77, 8), torch.zeros(2, 3, 5))
    assert c.shape == (2, 3, 77, 8) and c.rows().vector.shape == (6, 5)
    assert c.expand_variants(4).vector.shape == (4, 2, 3, 5)


def test_vector_rows_without_uncond_rows(oc_model):
    """At CFG scale 1 (no uncond rows) the model gets the cond rows' vectors, variant-major."""
    from clora.compose import Conditioning

    unet = oc_model[0]
    V, B = 3, 2
    D, Dy = TINY_SDXL["te1"] + TINY_SDXL["te2"], tiny_sdxl_adm_channels()
    g = torch.Generator().manual_seed(12)
    conds = Conditioning(torch.randn(V, B, 77, D, generator=g), torch.randn(V, B, Dy, generator=g))
    seen = []

    def model(x, sigma, cond):
        seen.append(cond.vector.clone())
        return unet(x, sigma, context=sdxl_context_arg(unet, cond.crossattn), y=cond.vector)

    comp = _composer(unet, V)
    comp.batched = True
    x = torch.randn(B, 4, 16, 16, generator=g)
    u, c = comp(x, torch.full((B,), 500.0), None, conds, model, 0)
    assert u is None and c.shape == x.shape
    full = [v for v in seen if v.shape[0] == V * B]
    assert full and all(torch.equal(v, conds.vector.flatten(0, 1)) for v in full)
    # the rest: the one-chunk pass of grad_memory "auto" (recomputation on SDXL) that learns the layer order
    rest = [v for v in seen if v.shape[0] != V * B]
    assert len(rest) == 1 and torch.equal(rest[0], conds.vector[0])
    with pytest.raises(ValueError, match="both be tensors or both be Conditioning"):
        comp(x, torch.full((B,), 500.0), conds.crossattn[0], conds, model, 1)


def _open_clip_as_hf(te2):
    """A transformers CLIPTextModelWithProjection holding the open_clip tower's weights (in_proj split into q/k/v,
    text_projection transposed): the Forge layout of the same encoder."""
    from transformers import CLIPTextModelWithProjection

    from tests.models import tiny_clip_g_config

    hf = CLIPTextModelWithProjection(tiny_clip_g_config()).eval().requires_grad_(False)
    d = TINY_SDXL["te2"]
    with torch.no_grad():
        tm = hf.text_model
        tm.embeddings.token_embedding.weight.copy_(te2.token_embedding.weight)
        tm.embeddings.position_embedding.weight.copy_(te2.positional_embedding)
        for i, blk in enumerate(te2.transformer.resblocks):
            layer = tm.encoder.layers[i]
            for j, proj in enumerate((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)):
                proj.weight.copy_(blk.attn.in_proj_weight[j * d:(j + 1) * d])
                proj.bias.copy_(blk.attn.in_proj_bias[j * d:(j + 1) * d])
            layer.self_attn.out_proj.weight.copy_(blk.attn.out_proj.weight)
            layer.self_attn.out_proj.bias.copy_(blk.attn.out_proj.bias)
            for a, b in ((layer.layer_norm1, blk.ln_1), (layer.layer_norm2, blk.ln_2), (layer.mlp.fc1, blk.mlp.c_fc),
                         (layer.mlp.fc2, blk.mlp.c_proj)):
                a.weight.copy_(b.weight)
                a.bias.copy_(b.bias)
        tm.final_layer_norm.weight.copy_(te2.ln_final.weight)
        tm.final_layer_norm.bias.copy_(te2.ln_final.bias)
        hf.text_projection.weight.copy_(te2.text_projection.T)
    return hf


def test_open_clip_and_hf_layouts_agree_with_the_same_lora(oc_model, sdxl_files):
    """The same encoder in A1111's layout (open_clip, LoRA through functional calls into the fused in_proj slices)
    and in Forge's (transformers, LoRA through hooks on q/k/v_proj) gives the same context and pooled output with the
    same kohya LoRA: an independent check of the q/k/v slice mapping."""
    import dataclasses

    from clora.lora.files import load_lora
    from clora.lora.keymap import resolve
    from clora.lora.rows import LoraRows, RowPlan, targets_of
    from clora.sdxl import hf_clip_encode, open_clip_encode

    unet, te1, te2 = oc_model
    hf = _open_clip_as_hf(te2)
    ids = _ids(2)
    with torch.no_grad():
        h_hf, p_hf = hf_clip_encode(hf, ids)
    h_oc, p_oc = open_clip_encode(te2, ids)
    base_err = max(float((h_hf - h_oc).abs().max()), float((p_hf - p_oc).abs().max()))
    assert base_err <= 1e-5, base_err

    lora = load_lora(sdxl_files["kohya"])
    r_oc = resolve(lora, unet=unet, text_model=te1, text_model_2=te2)
    r_hf = resolve(lora, unet=unet, text_model=te1, text_model_2=hf)
    rows = [[(0, 0.9)], [(0, -0.6)]]
    targets = [dataclasses.replace(t, lora_index=0) for t in r_oc.param_targets]
    h_oc, p_oc = open_clip_encode(te2, ids, targets, rows)
    with LoraRows(targets_of([r_hf], "text2")) as lr, torch.no_grad():
        lr.plan = RowPlan.from_lists(rows)
        h_hf, p_hf = hf_clip_encode(hf, ids)
    err = max(float((h_hf - h_oc).abs().max()), float((p_hf - p_oc).abs().max()))
    moved = float((h_oc - open_clip_encode(te2, ids)[0]).abs().max())
    assert moved > 1e-2
    assert err <= 1e-5, err
    print(f"\nopen_clip (functional) vs HF (hooks) te2 with one LoRA: max abs error {err:.2e} (no LoRA: {base_err:.2e})")
