"""LoRA files: writer -> load_lora round trips, dense ΔW against independent computations, family, refusals, metadata.

The tiny models are built here by `_tiny_unet` / `_tiny_text` (the same configs tests/models.py is to provide; switch
to it once it exists).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from clora.lora.dense import dense_delta
from clora.lora.files import check_family, load_lora
from clora.lora.keymap import resolve
from clora.lora.types import LoraError, LoraModule
from tools import lora_writer as lw

import ldm.modules.diffusionmodules.openaimodel as openaimodel
import transformers

TINY_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2, 2, 2],
                 attention_resolutions=[4, 2, 1], num_res_blocks=2, num_heads=2, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=64, use_checkpoint=False, legacy=False)
# Counted from the architecture: attention on 3 of 4 levels -> 6 down + 1 mid + 9 up transformer blocks of 12 target
# modules each (proj_in, proj_out, attn1/attn2 to_q/k/v/out.0, ff.net.0.proj, ff.net.2); 2 text layers x 6 Linear.
N_ATTN = 16 * 12
N_TEXT = 2 * 6


def _tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    return openaimodel.UNetModel(**TINY_UNET)


def _tiny_text() -> nn.Module:
    torch.manual_seed(1)
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77))


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, nn.Module]:
    return _tiny_unet(), _tiny_text()


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory) -> dict[str, Path]:
    unet, text = tiny
    return lw.write_all(tmp_path_factory.mktemp("loras"), unet, text, seed=0)


def _n_conv_targets(unet: nn.Module) -> int:
    """Resnet/sampler Linear+Conv2d modules, counted from ldm names directly (not through keymap)."""
    names = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    resnet = [n for n in names if n.endswith(("in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection"))]
    samplers = [n for n in names if n.endswith(".op") or (n.startswith("output_blocks") and n.endswith(".conv"))]
    return len(resnet) + len(samplers)


# ----- round trips --------------------------------------------------------------------------------

LAYOUTS = {
    "kohya": ("kohya", "lora", False), "kohya_noalpha": ("kohya", "lora", False), "locon": ("kohya", "lora", True),
    "locon_cp": ("kohya", "lora", True), "peft": ("peft", "lora", False), "peft_base_model": ("peft", "lora", False),
    "diffusers": ("diffusers", "lora", False), "loha": ("lycoris", "loha", True),
    "loha_tucker": ("lycoris", "loha", True), "lokr": ("lycoris", "lokr", True),
    "lokr_full": ("lycoris", "lokr", True), "lokr_tucker": ("lycoris", "lokr", True), "dora": ("kohya", "lora", False),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_round_trip_every_layout(name: str, files, tiny) -> None:
    unet, text = tiny
    layout, kind, conv = LAYOUTS[name]
    lora = load_lora(files[name])
    assert lora.name == name and lora.layout == layout and not lora.skipped_keys
    assert {m.kind for m in lora.modules.values()} == {kind}
    expected = N_ATTN + N_TEXT + (_n_conv_targets(unet) if conv else 0)
    assert len(lora.modules) == expected
    r = resolve(lora, unet, text, min_match=1.0)
    assert (r.matched, r.total, r.unmatched) == (expected, expected, [])
    for _, _, target, module in r.targets[:: max(1, len(r.targets) // 25)]:
        delta = module.dense_delta(target.weight)
        assert delta.shape == target.weight.shape and delta.dtype == target.weight.dtype
        assert delta.abs().max() > 0


def test_kohya_tensors_alpha_and_dtype(tmp_path: Path, tiny) -> None:
    unet, text = tiny
    p = lw.write_kohya(tmp_path / "half.safetensors", unet, text, rank=8, alpha=4.0, dtype=torch.float16)
    raw = load_file(str(p))
    lora = load_lora(p)
    stem = "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k"
    m = lora.modules[stem]
    assert torch.equal(m.tensors["down"], raw[f"{stem}.lora_down.weight"])
    assert torch.equal(m.tensors["up"], raw[f"{stem}.lora_up.weight"])
    assert m.tensors["down"].dtype == torch.float16 and m.tensors["down"].device.type == "cpu"
    assert (m.rank, m.alpha, m.scale) == (8, 4.0, 0.5)
    assert m.tensors["down"].shape == (8, 64)  # attn2.to_k reads the 64-wide context


def test_peft_and_old_diffusers_keys_convert(files) -> None:
    cases = {
        "peft": ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight",
                 "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0", "up"),
        "peft_base_model": ("base_model.model.text_model.encoder.layers.1.mlp.fc1.lora_A.weight",
                            "lora_te_text_model_encoder_layers_1_mlp_fc1", "down"),
        "diffusers": ("unet.mid_block.attentions.0.proj_in.lora.down.weight",
                      "lora_unet_mid_block_attentions_0_proj_in", "down"),
        "diffusers_processor": (
            "unet.up_blocks.2.attentions.1.transformer_blocks.0.attn2.processor.to_out_lora.up.weight",
            "lora_unet_up_blocks_2_attentions_1_transformer_blocks_0_attn2_to_out_0", "up"),
    }
    for name, (key, stem, short) in cases.items():
        raw = load_file(str(files[name]))
        lora = load_lora(files[name])
        assert torch.equal(lora.modules[stem].tensors[short], raw[key]), name
    te = load_lora(files["diffusers_processor"]).modules["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    assert te.tensors["down"].shape == (4, 64)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert load_lora(files["peft"]).modules[q].alpha == 8.0  # written with alpha 8, rank 4
    assert load_lora(files["peft"]).modules[q].scale == 2.0
    assert load_lora(files["peft_base_model"]).modules[q].alpha is None


def test_sdxl_diffusers_text_encoders(tmp_path: Path) -> None:
    t = {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 768),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(768, 2),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 1280),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(1280, 2),
    }
    save_file(t, str(tmp_path / "xl.safetensors"))
    lora = load_lora(tmp_path / "xl.safetensors")
    assert set(lora.modules) == {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                 "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"}
    assert lora.family == "sdxl"


def test_peft_dora_magnitude(tmp_path: Path, tiny) -> None:
    _, text = tiny
    base = "base_model.model.text_model.encoder.layers.0.self_attn.k_proj"
    g = _g(3)
    t = {f"{base}.lora_A.weight": _r(g, 2, 64).float(), f"{base}.lora_B.weight": _r(g, 64, 2).float(),
         f"{base}.lora_magnitude_vector.weight": (_r(g, 64).abs() + 0.5).float()}
    save_file(t, str(tmp_path / "pdora.safetensors"))
    m = load_lora(tmp_path / "pdora.safetensors").modules["lora_te_text_model_encoder_layers_0_self_attn_k_proj"]
    assert torch.equal(m.dora_scale, t[f"{base}.lora_magnitude_vector.weight"]) and m.factors() is None
    w = text.get_submodule("text_model.encoder.layers.0.self_attn.k_proj").weight.detach()
    torch.testing.assert_close((w + m.dense_delta(w)).norm(dim=1), m.dora_scale)


def test_unknown_and_incomplete_keys_are_counted(tmp_path: Path) -> None:
    t = {
        "lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
        "lora_unet_conv_in.lora_up.weight": torch.ones(8, 2, 1, 1),
        "lora_unet_conv_out.lora_down.weight": torch.ones(2, 8, 3, 3),  # no up: incomplete
        "lora_unet_time_embedding_linear_1.on_input": torch.ones(4),  # IA3: not supported
        "bundle_emb.sks.string_to_param.*": torch.ones(1, 8),  # embedding bundled in the file
    }
    save_file(t, str(tmp_path / "odd.safetensors"))
    lora = load_lora(tmp_path / "odd.safetensors")
    assert list(lora.modules) == ["lora_unet_conv_in"]
    assert sorted(lora.skipped_keys) == sorted(k for k in t if not k.startswith("lora_unet_conv_in"))


# ----- dense ΔW against independent computations --------------------------------------------------

def _g(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _r(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64)


def test_dense_linear_lora_and_scale() -> None:
    g = _g(0)
    down, up, x = _r(g, 4, 12), _r(g, 10, 4), _r(g, 3, 12)
    w = torch.zeros(10, 12, dtype=torch.float64)
    m = LoraModule("k", "lora", {"down": down, "up": up}, alpha=2.0)
    assert (m.rank, m.scale) == (4, 0.5)
    torch.testing.assert_close(F.linear(x, dense_delta(m, w)), 0.5 * F.linear(F.linear(x, down), up))
    no_alpha = LoraModule("k", "lora", {"down": down, "up": up})
    assert no_alpha.scale == 1.0
    torch.testing.assert_close(F.linear(x, dense_delta(no_alpha, w)), F.linear(F.linear(x, down), up))
    half = dense_delta(m, torch.zeros(10, 12, dtype=torch.float16))
    assert half.dtype == torch.float16 and half.shape == (10, 12)


@pytest.mark.parametrize("kernel", [1, 3])
def test_dense_locon_conv(kernel: int) -> None:
    g = _g(kernel)
    down, up, x = _r(g, 3, 5, kernel, kernel), _r(g, 7, 3, 1, 1), _r(g, 2, 5, 9, 9)
    m = LoraModule("k", "lora", {"down": down, "up": up}, alpha=1.5)
    d = dense_delta(m, torch.zeros(7, 5, kernel, kernel, dtype=torch.float64))
    pad = kernel // 2
    torch.testing.assert_close(F.conv2d(x, d, padding=pad), 0.5 * F.conv2d(F.conv2d(x, down, padding=pad), up))


def test_dense_cp_lora_mid() -> None:
    g = _g(5)
    down, mid, up, x = _r(g, 3, 5, 1, 1), _r(g, 3, 3, 3, 3), _r(g, 7, 3, 1, 1), _r(g, 2, 5, 8, 8)
    m = LoraModule("k", "lora", {"down": down, "mid": mid, "up": up}, alpha=3.0)
    d = dense_delta(m, torch.zeros(7, 5, 3, 3, dtype=torch.float64))
    seq = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    torch.testing.assert_close(F.conv2d(x, d, padding=1), seq)


def test_dense_loha() -> None:
    g = _g(6)
    w1a, w1b, w2a, w2b = _r(g, 6, 3), _r(g, 3, 8), _r(g, 6, 3), _r(g, 3, 8)
    m = LoraModule("k", "loha", {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}, alpha=1.0)
    assert m.rank == 3
    d = dense_delta(m, torch.zeros(6, 8, dtype=torch.float64))
    ref = torch.einsum("oa,ai,ob,bi->oi", w1a, w1b, w2a, w2b) / 3
    torch.testing.assert_close(d, ref)
    # conv without Tucker: w·b holds (in, kh, kw) flattened
    c = LoraModule("c", "loha", {"hada_w1_a": w1a, "hada_w1_b": _r(g, 3, 2 * 9), "hada_w2_a": w2a,
                                 "hada_w2_b": _r(g, 3, 2 * 9)})
    dc = dense_delta(c, torch.zeros(6, 2, 3, 3, dtype=torch.float64))
    ref_c = (w1a @ c.tensors["hada_w1_b"]) * (w2a @ c.tensors["hada_w2_b"])
    torch.testing.assert_close(dc.reshape(6, -1), ref_c)


def test_dense_loha_tucker_matches_conv_chains() -> None:
    """Each Tucker product is the conv chain w·b (1x1) -> t (3x3) -> w·a^T (1x1); the update is their product."""
    g = _g(7)
    r, out_f, in_f = 3, 6, 4
    t1, w1a, w1b = _r(g, r, r, 3, 3), _r(g, r, out_f), _r(g, r, in_f)
    t2, w2a, w2b = _r(g, r, r, 3, 3), _r(g, r, out_f), _r(g, r, in_f)
    zero = torch.zeros(out_f, in_f, 3, 3, dtype=torch.float64)
    ones = {"hada_t2": torch.ones(1, 1, 3, 3, dtype=torch.float64), "hada_w2_a": torch.ones(1, out_f, dtype=torch.float64),
            "hada_w2_b": torch.ones(1, in_f, dtype=torch.float64)}
    only1 = LoraModule("a", "loha", {"hada_t1": t1, "hada_w1_a": w1a, "hada_w1_b": w1b, **ones})
    x = _r(g, 2, in_f, 7, 7)
    d1 = dense_delta(only1, zero)
    chain = F.conv2d(F.conv2d(F.conv2d(x, w1b[:, :, None, None]), t1, padding=1), w1a.t()[:, :, None, None])
    torch.testing.assert_close(F.conv2d(x, d1, padding=1), chain)
    swap = {"hada_t2": t1, "hada_w2_a": w1a, "hada_w2_b": w1b}
    only2 = LoraModule("b", "loha", {"hada_t1": t2, "hada_w1_a": w2a, "hada_w1_b": w2b, **swap})
    both = LoraModule("c", "loha", {"hada_t1": t1, "hada_w1_a": w1a, "hada_w1_b": w1b,
                                    "hada_t2": t2, "hada_w2_a": w2a, "hada_w2_b": w2b}, alpha=1.5)
    d12 = dense_delta(only2, zero)  # = W2 ⊙ W1
    torch.testing.assert_close(dense_delta(both, zero), 0.5 * d12)
    # W1 ⊙ W2 divided elementwise by W1 recovers W2's chain
    w2_chain = F.conv2d(F.conv2d(F.conv2d(x, w2b[:, :, None, None]), t2, padding=1), w2a.t()[:, :, None, None])
    torch.testing.assert_close(F.conv2d(x, d12 / d1, padding=1), w2_chain)


def test_dense_lokr() -> None:
    g = _g(8)
    w1, w2a, w2b = _r(g, 2, 3), _r(g, 4, 2), _r(g, 2, 5)
    m = LoraModule("k", "lokr", {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b}, alpha=1.0)
    assert (m.rank, m.scale) == (2, 0.5)
    torch.testing.assert_close(dense_delta(m, torch.zeros(8, 15, dtype=torch.float64)),
                               0.5 * torch.kron(w1, w2a @ w2b))
    # full factors: alpha does not apply; conv w2 as a 4-D kronecker factor
    w2 = _r(g, 4, 5, 3, 3)
    full = LoraModule("f", "lokr", {"lokr_w1": w1, "lokr_w2": w2}, alpha=1.0)
    assert full.scale == 1.0
    torch.testing.assert_close(dense_delta(full, torch.zeros(8, 15, 3, 3, dtype=torch.float64)),
                               torch.kron(w1[:, :, None, None], w2))
    w1a, w1b = _r(g, 2, 2), _r(g, 2, 3)
    both = LoraModule("b", "lokr", {"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_w2": w2[:, :, 0, 0]}, alpha=4.0)
    torch.testing.assert_close(dense_delta(both, torch.zeros(8, 15, dtype=torch.float64)),
                               2.0 * torch.kron(w1a @ w1b, w2[:, :, 0, 0]))


def test_dense_lokr_tucker_matches_conv_chain() -> None:
    g = _g(9)
    t2, w2a, w2b, x = _r(g, 2, 2, 3, 3), _r(g, 2, 4), _r(g, 2, 5), _r(g, 1, 5, 6, 6)
    m = LoraModule("k", "lokr", {"lokr_w1": torch.ones(1, 1, dtype=torch.float64), "lokr_t2": t2,
                                 "lokr_w2_a": w2a, "lokr_w2_b": w2b})
    d = dense_delta(m, torch.zeros(4, 5, 3, 3, dtype=torch.float64))
    chain = F.conv2d(F.conv2d(F.conv2d(x, w2b[:, :, None, None]), t2, padding=1), w2a.t()[:, :, None, None])
    torch.testing.assert_close(F.conv2d(x, d, padding=1), chain)


def test_dense_dora_norm_axes() -> None:
    g = _g(10)
    w, down, up = _r(g, 6, 5), _r(g, 2, 5), _r(g, 6, 2)
    mag_out = _r(g, 6, 1).abs() + 0.5
    m = LoraModule("k", "lora", {"down": down, "up": up}, alpha=1.0, dora_scale=mag_out)
    merged = w + dense_delta(m, w)
    # rows of W + ΔW_eff have the stored magnitudes and the direction of W + sΔW
    torch.testing.assert_close(merged.norm(dim=1), mag_out[:, 0])
    direction = w + 0.5 * up @ down
    torch.testing.assert_close(merged, F.normalize(direction, dim=1) * mag_out)
    assert m.factors() is None  # DoRA depends on W: dense only
    # peft's 1-D magnitude is per output row too
    m1 = LoraModule("k", "lora", {"down": down, "up": up}, alpha=1.0, dora_scale=mag_out[:, 0])
    torch.testing.assert_close(dense_delta(m1, w), dense_delta(m, w))
    mag_in = _r(g, 1, 5).abs() + 0.5
    mi = LoraModule("k", "lora", {"down": down, "up": up}, alpha=1.0, dora_scale=mag_in)
    torch.testing.assert_close((w + dense_delta(mi, w)).norm(dim=0), mag_in[0])
    # conv: one norm per output filter
    wc, dc, uc = _r(g, 4, 3, 3, 3), _r(g, 2, 3, 3, 3), _r(g, 4, 2, 1, 1)
    mc = LoraModule("c", "lora", {"down": dc, "up": uc}, dora_scale=_r(g, 4, 1, 1, 1).abs() + 0.5)
    torch.testing.assert_close((wc + dense_delta(mc, wc)).reshape(4, -1).norm(dim=1), mc.dora_scale.reshape(4))
    bad = LoraModule("k", "lora", {"down": down, "up": up}, dora_scale=torch.ones(3))
    with pytest.raises(LoraError, match="DoRA magnitude of shape"):
        dense_delta(bad, w)


def test_dense_shape_mismatch_is_an_error() -> None:
    m = LoraModule("lora_unet_x", "lora", {"down": torch.ones(2, 5), "up": torch.ones(6, 2)})
    with pytest.raises(LoraError, match="lora_unet_x"):
        dense_delta(m, torch.zeros(6, 4))


def test_written_dora_file_magnitudes(files, tiny) -> None:
    unet, text = tiny
    lora = load_lora(files["dora"])
    stem = "lora_te_text_model_encoder_layers_1_self_attn_v_proj"
    w = text.get_submodule("text_model.encoder.layers.1.self_attn.v_proj").weight.detach()
    m = lora.modules[stem]
    torch.testing.assert_close((w + m.dense_delta(w)).norm(dim=1), m.dora_scale.reshape(-1))


# ----- family -------------------------------------------------------------------------------------

def test_family_tiny_and_real_shapes(files, tmp_path: Path) -> None:
    assert load_lora(files["kohya"]).family == "sd1"  # tiny shapes say nothing: the kohya header does
    assert load_lora(files["peft"]).family == "unknown"  # no header, tiny shapes
    with torch.device("meta"):
        unet = openaimodel.UNetModel(**{**TINY_UNET, "model_channels": 320, "channel_mult": [1, 2, 4, 4],
                                        "num_heads": 8, "context_dim": 768})
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                                      num_hidden_layers=12, num_attention_heads=12))
    # SD1.5 shapes win over a header that claims otherwise
    p = lw.write_kohya(tmp_path / "real.safetensors", unet, text, rank=1,
                       metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    real = load_lora(p)
    assert real.family == "sd1" and len(real.modules) == 192 + 72
    check_family(real, "sd1")
    with pytest.raises(LoraError, match=r"is for SD 1\.x; the loaded model is SD 2\.x"):
        check_family(real, "sd2")
    with torch.device("meta"):
        sd2 = openaimodel.UNetModel(**{**TINY_UNET, "model_channels": 320, "channel_mult": [1, 2, 4, 4],
                                       "num_head_channels": 64, "num_heads": -1, "context_dim": 1024,
                                       "use_linear_in_transformer": True})
    assert load_lora(lw.write_peft(tmp_path / "sd2.safetensors", sd2, None, rank=1)).family == "sd2"


def test_sdxl_file_refused_for_sd1(files) -> None:
    lora = load_lora(files["sdxl"])
    assert lora.family == "sdxl"
    with pytest.raises(LoraError, match=r"LoRA 'sdxl' is for SDXL; the loaded model is SD 1\.x"):
        check_family(lora, "sd1")
    check_family(lora, "sdxl")
    check_family(lora, "unknown")


# ----- refusals -----------------------------------------------------------------------------------

def test_pickle_refused_without_unpickling(files, monkeypatch, tmp_path: Path) -> None:
    import pickle

    def boom(*a, **k):
        raise AssertionError("unpickling was attempted")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    with pytest.raises(LoraError, match=r"LoRA 'pickle' \(pickle\.pt\) is a pickle file; only \.safetensors LoRAs"):
        load_lora(files["pickle"])
    for ext in (".ckpt", ".bin"):
        target = tmp_path / f"other{ext}"
        target.write_bytes(files["pickle"].read_bytes())
        with pytest.raises(LoraError, match="is a pickle file"):
            load_lora(target)


def test_unknown_layout_and_unreadable(files, tmp_path: Path) -> None:
    with pytest.raises(LoraError, match=r"LoRA 'unknown' has an unknown layout: none of its 4 tensors.*"
                                        r"model\.diffusion_model\.input_blocks\.0\.0"):
        load_lora(files["unknown"])
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(LoraError, match="'broken'.*not a readable safetensors file"):
        load_lora(broken)
    with pytest.raises(LoraError, match="not a .safetensors file"):
        load_lora(tmp_path / "notes.txt")
    with pytest.raises(LoraError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors")


def test_mostly_unmatched_via_resolve(files, tiny) -> None:
    unet, text = tiny
    lora = load_lora(files["mostly_unmatched"])
    # written: 2 real modules, 1 real stem with a wrong input width, 20 stems of a level the model lacks
    with pytest.raises(LoraError, match=r"LoRA 'mostly_unmatched': only 2 of 23 modules match this model \(e\.g\. "):
        resolve(lora, unet, text)
    r = resolve(lora, unet, text, min_match=0.0)
    assert (r.matched, r.total, len(r.unmatched)) == (2, 23, 21)
    assert sum("needs" in v for v in r.reasons.values()) == 1


# ----- metadata -----------------------------------------------------------------------------------

def test_trigger_words_from_metadata(tmp_path: Path, tiny) -> None:
    unet, text = tiny
    tags = {"10_a": {" sks cat ": 3, "cat": 9, "indoors": 1}, "5_b": {"sks cat": 4, "window": 2}}
    meta = {"ss_tag_frequency": json.dumps(tags), "ss_output_name": "catlora", "modelspec.trigger_phrase": "mycat"}
    p = lw.write_kohya(tmp_path / "cat.safetensors", None, text, metadata=meta)
    lora = load_lora(p)
    # merged counts: cat 9, sks cat 7, window 2, indoors 1
    assert lora.trigger_words == ["mycat", "cat", "sks cat", "window", "indoors", "catlora"]
    assert lora.metadata["ss_output_name"] == "catlora" and lora.has_text_encoder and not lora.has_unet
    assert load_lora(p, max_tags=1).trigger_words == ["mycat", "cat", "catlora"]


def test_sidecar_json(tmp_path: Path, tiny) -> None:
    unet, text = tiny
    p = lw.write_kohya(tmp_path / "dog.safetensors", None, text, metadata={"ss_tag_frequency": "{}"})
    (tmp_path / "dog.json").write_text(json.dumps({"activation text": "sks dog, red collar", "sd version": "SDXL",
                                                   "preferred weight": 0.8}))
    lora = load_lora(p)
    assert lora.trigger_words == ["sks dog", "red collar", "dog"]
    assert lora.user_metadata["preferred weight"] == 0.8
    assert lora.family == "sd1"  # tiny shapes say nothing; the file's header (sd_v1) outranks the sidecar
    no_header = lw.write_peft(tmp_path / "cat.safetensors", None, text)
    (tmp_path / "cat.json").write_text(json.dumps({"sd version": "SDXL"}))
    assert load_lora(no_header).family == "sdxl"
    (tmp_path / "dog.json").write_text("{not json")
    assert load_lora(p).trigger_words == ["dog"]


def test_loading_a_lora_leaves_nothing_behind(tmp_path):
    """The WebUI glue loads every bound LoRA for every generation: nothing may stay allocated per load.  (Reading
    tensors through safetensors' memory-mapped ``safe_open``/``load_file`` leaves ~60 bytes per tensor behind with
    the safetensors 0.4 / torch pinned here: ~50 KB per load of this file, and a server that grew per request.)"""
    import gc
    import tracemalloc

    from tests.models import fixtures_dir

    path = fixtures_dir() / "loras" / "locon.safetensors"
    first = load_lora(path)
    n_tensors = sum(len(m.tensors) for m in first.modules.values())
    assert n_tensors > 100
    for _ in range(2):
        load_lora(path)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(10):
            load_lora(path)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    per_load = sum(s.size_diff for s in after.compare_to(before, "filename")) / 10
    assert per_load < 2048, f"{per_load:.0f} bytes stay allocated per load of a {n_tensors}-tensor LoRA"
    again = load_lora(path)
    reference = load_file(str(path))  # safetensors' own reader
    for key, m in first.modules.items():
        for short, t in m.tensors.items():
            assert torch.equal(t, again.modules[key].tensors[short]), (key, short)
    stored = sum(t.numel() for t in reference.values() if t.dim() > 0)
    assert sum(t.numel() for m in again.modules.values() for t in m.tensors.values()) == stored
