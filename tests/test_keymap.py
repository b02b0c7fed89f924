"""keymap: kohya stem -> ldm module path, checked against diffusers' own module names and its ldm->diffusers converter.

The reference is independent of `clora.lora.keymap`: diffusers' ``UNet2DConditionModel`` gives the true diffusers
module names, and diffusers' single-file converter (``convert_ldm_unet_checkpoint``) maps each ldm state-dict entry
to its diffusers name.  Real-size models live on the meta device (no memory, no weights).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from clora.lora.keymap import (HOST_ROOTS, full_path, resolve, text_stem_table, unet_paths, unet_stem_table)
from clora.lora.types import LoraError, LoraFile, LoraModule

import ldm.modules.diffusionmodules.openaimodel as openaimodel
import transformers
import diffusers  # pinned 0.30.3 in .ci/requirements-nodeps.txt (installed --no-deps)
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

TARGETS = (nn.Linear, nn.Conv2d)
SD15 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4],
            attention_resolutions=[4, 2, 1], num_res_blocks=2, num_heads=8, use_spatial_transformer=True,
            transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)
SD15_DIFFUSERS = dict(sample_size=64, in_channels=4, out_channels=4,
                      down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                      up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                      block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                      attention_head_dim=8)
# a differently shaped UNet: 3 levels, one resnet per level, attention only on the middle level
ODD = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2, 2],
           attention_resolutions=[2], num_res_blocks=1, num_heads=2, use_spatial_transformer=True,
           transformer_depth=1, context_dim=64, use_checkpoint=False, legacy=False)
ODD_DIFFUSERS = dict(sample_size=32, in_channels=4, out_channels=4,
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                     block_out_channels=[32, 64, 64], layers_per_block=1, cross_attention_dim=64,
                     attention_head_dim=2, norm_num_groups=32)


def _meta_ldm(params: dict) -> nn.Module:
    with torch.device("meta"):
        return openaimodel.UNetModel(**params)


def _meta_diffusers(config: dict) -> nn.Module:
    with torch.device("meta"):
        return diffusers.UNet2DConditionModel(**config)


def _reference(ldm: nn.Module, config: dict) -> dict[str, str]:
    """diffusers module path -> ldm module path, from diffusers' converter (tensor identity tells which is which)."""
    sd = {"model.diffusion_model." + k: v for k, v in ldm.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(sd, config)
    by_id = {id(v): k[len("model.diffusion_model."):] for k, v in sd.items()}
    out = {}
    for dkey, tensor in converted.items():
        if dkey.endswith(".weight"):
            out[dkey[: -len(".weight")]] = by_id[id(tensor)][: -len(".weight")]
    return out


@pytest.fixture(scope="module")
def sd15() -> nn.Module:
    return _meta_ldm(SD15)


@pytest.fixture(scope="module")
def clip_l() -> nn.Module:
    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77)
    with torch.device("meta"):
        return transformers.CLIPTextModel(cfg)


@pytest.mark.parametrize("ldm_params,config", [(SD15, SD15_DIFFUSERS), (ODD, ODD_DIFFUSERS)], ids=["sd15", "odd"])
def test_unet_table_agrees_with_diffusers(ldm_params: dict, config: dict) -> None:
    ldm = _meta_ldm(ldm_params)
    dunet = _meta_diffusers(config)
    ref = _reference(ldm, config)
    true_names = {n for n, m in dunet.named_modules() if isinstance(m, TARGETS)}
    table = unet_stem_table(ldm)
    ldm_targets = {n for n, m in ldm.named_modules() if isinstance(m, TARGETS)}
    # every Linear/Conv2d of the diffusers model is reachable by its kohya stem, at the module the converter names
    for dpath in true_names:
        stem = "lora_unet_" + dpath.replace(".", "_")
        assert stem in table, stem
        assert table[stem] == ref[dpath], dpath
    # and nothing else: no invented diffusers names, every ldm target has a diffusers name
    assert set(unet_paths(ldm)) == true_names
    assert set(unet_paths(ldm).values()) == ldm_targets


def test_sd15_civitai_targets_reachable(sd15: nn.Module) -> None:
    """Counts from the SD1.5 architecture: 16 transformer blocks (6 down, 1 mid, 9 up), 22 resnets (8/2/12),
    14 conv shortcuts (2 down, 12 up), 3 down- and 3 upsamplers."""
    stems = set(unet_stem_table(sd15))
    diff = {s for s in stems if not any(p in s for p in ("input_blocks", "middle_block", "output_blocks",
                                                          "time_embed_", "out_2"))}

    def count(*parts: str) -> int:
        return sum(all(p in s for p in parts) for s in diff)

    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v", "to_out_0"):
            assert count(f"_{attn}_{proj}") == 16
    assert count("_ff_net_0_proj") == count("_ff_net_2") == 16
    assert count("_proj_in") == count("_proj_out") == 16
    assert count("_resnets_", "_conv1") == count("_resnets_", "_conv2") == count("_time_emb_proj") == 22
    assert count("_conv_shortcut") == 14
    assert count("_downsamplers_0_conv") == 3 and count("_upsamplers_0_conv") == 3
    for s in ("conv_in", "conv_out", "time_embedding_linear_1", "time_embedding_linear_2"):
        assert "lora_unet_" + s in diff
    # kohya's standard SD1.5 LoRA: 12 modules per transformer block = 192 UNet modules
    assert count("_attentions_") == 192


# Hand-checked pairs, from reading the SD1.5 architecture (independent of diffusers and of keymap).
HAND_PAIRS = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.0.attentions.1.proj_in": "input_blocks.2.1.proj_in",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k": "input_blocks.5.1.transformer_blocks.0.attn2.to_k",
    "down_blocks.2.resnets.1.time_emb_proj": "input_blocks.8.0.emb_layers.1",
    "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
    "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3",
    "mid_block.resnets.0.conv1": "middle_block.0.in_layers.2",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": "middle_block.1.transformer_blocks.0.ff.net.0.proj",
    "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
    "up_blocks.0.resnets.0.conv_shortcut": "output_blocks.0.0.skip_connection",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
    "up_blocks.1.attentions.0.proj_out": "output_blocks.3.1.proj_out",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.attentions.2.transformer_blocks.0.attn1.to_out.0": "output_blocks.8.1.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.2.upsamplers.0.conv": "output_blocks.8.2.conv",
    "up_blocks.3.resnets.0.conv1": "output_blocks.9.0.in_layers.2",
    "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2": "output_blocks.11.1.transformer_blocks.0.ff.net.2",
    "conv_out": "out.2",
}


def test_sd15_hand_checked_pairs(sd15: nn.Module) -> None:
    table = unet_stem_table(sd15)
    for dpath, lpath in HAND_PAIRS.items():
        assert table["lora_unet_" + dpath.replace(".", "_")] == lpath


def test_ldm_alias_stems(sd15: nn.Module) -> None:
    table = unet_stem_table(sd15)
    assert table["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"] == \
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert table["lora_unet_output_blocks_5_2_conv"] == table["lora_unet_up_blocks_1_upsamplers_0_conv"]
    for name, module in sd15.named_modules():
        if isinstance(module, TARGETS):
            assert table["lora_unet_" + name.replace(".", "_")] == name
    assert all(isinstance(sd15.get_submodule(p), TARGETS) for p in table.values())


def test_text_table_clip_l(clip_l: nn.Module) -> None:
    table = text_stem_table(clip_l)
    subs = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
    expected = {f"lora_te_text_model_encoder_layers_{i}_{s}" for i in range(12) for s in subs}
    assert set(table) == expected  # kohya's 72 text-encoder modules for SD1.5, nothing else
    assert table["lora_te_text_model_encoder_layers_11_mlp_fc2"] == "text_model.encoder.layers.11.mlp.fc2"
    assert clip_l.get_submodule(table["lora_te_text_model_encoder_layers_3_self_attn_out_proj"]).in_features == 768
    # the inner CLIPTextTransformer gives the same stems, with paths relative to it
    inner = text_stem_table(clip_l.text_model, prefix="lora_te1_")
    assert inner["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == "encoder.layers.0.self_attn.q_proj"


def test_host_roots() -> None:
    assert full_path("a1111", "unet", "input_blocks.1.1.proj_in") == "model.diffusion_model.input_blocks.1.1.proj_in"
    assert full_path("a1111", "text", "text_model.encoder.layers.0.mlp.fc1") == \
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1"
    assert full_path("forge", "unet", "out.2") == "diffusion_model.out.2"
    assert HOST_ROOTS["forge"]["text"] == "clip_l.transformer"
    with pytest.raises(LoraError, match="^Unknown host"):
        full_path("comfy", "unet", "x")


def _lora(key: str, out_f: int, in_f: int, rank: int = 2) -> LoraModule:
    return LoraModule(key, "lora", {"down": torch.ones(rank, in_f), "up": torch.ones(out_f, rank)})


def test_resolve_counts_mismatches_and_threshold(sd15: nn.Module, clip_l: nn.Module) -> None:
    good = [
        _lora("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768),
        _lora("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", 1280, 1280),
        _lora("lora_unet_input_blocks_7_1_transformer_blocks_0_attn2_to_v", 1280, 768),
        LoraModule("lora_unet_up_blocks_1_upsamplers_0_conv", "lora",
                   {"down": torch.ones(2, 1280, 3, 3), "up": torch.ones(1280, 2, 1, 1)}),
    ]
    bad = [
        _lora("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q", 320, 768),  # to_q reads 320
        _lora("lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn2_to_q", 320, 320),  # no such level
    ]
    te = _lora("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)
    lora = LoraFile("mix", "mix.safetensors", "sd1", "kohya", {m.key: m for m in good + bad + [te]})
    r = resolve(lora, unet=sd15, min_match=0.5)
    assert (r.matched, r.total) == (4, 6)
    assert sorted(r.unmatched) == sorted(m.key for m in bad)
    assert r.skipped == [te.key]  # no text model given: not counted, but reported
    assert "no such module" in r.reasons[bad[1].key] and "320" in r.reasons[bad[0].key]
    paths = {p for _, p, _, _ in r.targets}
    assert "output_blocks.5.2.conv" in paths and "input_blocks.7.1.transformer_blocks.0.attn2.to_v" in paths
    with pytest.raises(LoraError, match=r"LoRA 'mix': only 5 of 7 modules match this model"):
        resolve(lora, unet=sd15, text_model=clip_l)
    r2 = resolve(lora, unet=sd15, text_model=clip_l, min_match=0.7)
    assert ("text", "text_model.encoder.layers.0.self_attn.q_proj") in {(c, p) for c, p, _, _ in r2.targets}


def test_uneven_res_blocks_per_level() -> None:
    """ldm accepts one resnet count per level; diffusers' converter does not, so the pairs are derived by hand:
    levels with 2, 1, 1 resnets -> input_blocks 1,2 | 3 (down) | 4 | 5 (down) | 6; the up levels mirror them with
    1+1, 1+1, 2+1 output blocks (0,1 | 2,3 | 4,5,6), upsamplers at the end of the first two."""
    ldm = _meta_ldm({**ODD, "num_res_blocks": [2, 1, 1], "attention_resolutions": [1]})
    dunet = _meta_diffusers({**ODD_DIFFUSERS, "layers_per_block": (2, 1, 1),
                             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                             "up_block_types": ["UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"]})
    assert set(unet_paths(ldm)) == {n for n, m in dunet.named_modules() if isinstance(m, TARGETS)}
    table = {d: l for d, l in unet_paths(ldm).items()}
    pairs = {
        "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
        "down_blocks.0.attentions.1.proj_in": "input_blocks.2.1.proj_in",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.resnets.0.conv2": "input_blocks.4.0.out_layers.3",
        "down_blocks.1.downsamplers.0.conv": "input_blocks.5.0.op",
        "down_blocks.2.resnets.0.conv1": "input_blocks.6.0.in_layers.2",
        "up_blocks.0.resnets.1.conv1": "output_blocks.1.0.in_layers.2",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.1.1.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.3.1.conv",
        "up_blocks.2.resnets.0.conv1": "output_blocks.4.0.in_layers.2",
        "up_blocks.2.attentions.2.proj_out": "output_blocks.6.1.proj_out",
    }
    for dpath, lpath in pairs.items():
        assert table[dpath] == lpath, dpath
