"""LoRA files written by the real tools, read by clora and checked against each tool's own forward.

Our fixtures come from our own writer (tools/lora_writer.py), so reader and writer could share a mistake.  Here the
files are written by the tools people train with, all pinned in .ci/requirements*.txt:

* LyCORIS 4.1.3 (``lycoris-lora``) through its kohya-ss entry point ``lycoris.kohya.create_network`` (the one
  sd-scripts calls; its LoCon module writes kohya's ``lora_down``/``lora_up``/``alpha`` keys): LoRA with and without
  conv layers, LoCon with Tucker (``lora_mid``), rs-LoRA, LoHa, LoHa + Tucker, LoKr, LoKr with full factors, DoRA on the
  output and on the input axis, LoHa + DoRA, LoKr + DoRA; fp16, bf16 and fp32 files with kohya's ``ss_*`` metadata.
* peft 0.13.2 with diffusers 0.30.3: the raw peft state dict (``get_peft_model_state_dict``), the diffusers format
  (``convert_state_dict_to_diffusers`` + ``StableDiffusionLoraLoaderMixin.save_lora_weights``, as diffusers' training
  scripts save) and diffusers' own ``convert_state_dict_to_kohya``; each plain and with DoRA (``use_dora``).

The models are the real architectures at a small size: an ldm ``UNetModel`` of the tiny SD1 layout (tests/models.py)
with 32 channels on every level (reading a layer's weight out of its forward costs (in·k²)²·out: 64 channels would
cost 8× more), the same weights in diffusers' ``UNet2DConditionModel`` (through diffusers' own
``convert_ldm_unet_checkpoint``), and the tiny ``CLIPTextModel``; everything float64.  The tools train on the diffusers
UNet and the CLIP; clora reads their file and binds it to the ldm UNet (`keymap`) and the CLIP, as the hosts do.

Reference: each tool's own **forward**.  Every LoRA parameter is randomised (rounded to the file's dtype first, so
the file holds exactly what the tool computes with), then each wrapped layer's effective weight is read out of its
forward (one-hot inputs; the layer is linear in its input) and ``ΔW_tool = W_eff - W``.  clora's ``ΔW`` is
``LoraModule.dense_delta`` on the ldm target, whose weight must be the tool layer's own (checked: the binding is right).
Not the tools' merge code: LyCORIS 4.1.3's ``get_diff_weight``/``merge_to`` apply ``α/r`` twice for LoHa/LoKr.

The error of a module is ``max|ΔW_clora - ΔW_tool| / max|ΔW_tool|``; the worst per layout is kept in `RESULTS` and
printed at the end of the run (tests/conftest.py).
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from clora.lora.files import check_family, load_lora
from clora.lora.keymap import resolve
from clora.lora.rows import LoraRows, RowPlan
from clora.lora.types import LoraError
from tests.models import make_tiny_clip, make_unet, tiny_unet_config

import diffusers  # 0.30.3, .ci/requirements-nodeps.txt
import lycoris.logging as lycoris_logging  # lycoris-lora 4.1.3, .ci/requirements.txt
import peft  # 0.13.2, .ci/requirements.txt
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from lycoris.kohya import create_network

lycoris_logging.logger.setLevel(logging.ERROR)

UNET = {**tiny_unet_config(), "channel_mult": [1, 1, 1, 1]}
DIFFUSERS_UNET = dict(sample_size=32, in_channels=4, out_channels=4,
                      down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                      up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                      block_out_channels=[32, 32, 32, 32], layers_per_block=2, cross_attention_dim=64,
                      attention_head_dim=2, norm_num_groups=32)
# LyCORIS's default preset "full" crashes on SD1 UNets ("duplicated lora name": it lists time_embedding.linear_1 by name
# and inside TimestepEmbedding); this is "full" for SD1 without the duplicate: every Linear/Conv2d.
PRESET = """enable_conv = {conv}
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
PEFT_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                     "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]
PEFT_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TAGS = '{"10_sks cat": {"sks cat": 12, "cat": 7, "sofa": 2}}'

#: layout name -> worst relative ΔW error over its modules (filled by the tests, printed by tests/conftest.py)
RESULTS: dict[str, dict] = {}


# ----- models -------------------------------------------------------------------------------------------------------

class Bases:
    """The float64 models: ldm UNet (clora's side), the same weights as a diffusers UNet (the tools' side), CLIP."""

    def __init__(self) -> None:
        self.ldm = make_unet(UNET, seed=0).double()
        state = {"model.diffusion_model." + k: v for k, v in self.ldm.state_dict().items()}
        self.diffusers = diffusers.UNet2DConditionModel(**DIFFUSERS_UNET)
        self.diffusers.load_state_dict(convert_ldm_unet_checkpoint(state, DIFFUSERS_UNET), strict=True)
        self.diffusers = self.diffusers.double().eval().requires_grad_(False)
        self.clip = make_tiny_clip().double()
        self.cache: dict = {}  # shared tool models, and each tool layer's ΔW read out of its forward

    def unet_copy(self, config: Optional[dict] = None) -> nn.Module:
        """A fresh diffusers UNet for a tool to wrap: the bases' weights (copied), or random ones for another
        ``config``.  Built on the meta device and filled: much cheaper than ``copy.deepcopy``."""
        if config is not None:
            return diffusers.UNet2DConditionModel(**config).double().eval().requires_grad_(False)
        with torch.device("meta"):
            unet = diffusers.UNet2DConditionModel(**DIFFUSERS_UNET)
        state = {k: v.clone() for k, v in self.diffusers.state_dict().items()}
        unet.load_state_dict(state, strict=True, assign=True)
        return unet.eval().requires_grad_(False)

    def tool_delta(self, layer: nn.Module) -> torch.Tensor:
        """``W_eff - W`` of a tool's layer (cached: the peft layers serve three file forms)."""
        key = ("delta", id(layer))
        if key not in self.cache:
            self.cache[key] = effective_weight(layer) - getattr(layer, "base_layer", layer).weight
        return self.cache[key]

    def targets(self) -> int:
        """Linear/Conv2d layers of the diffusers UNet and of the CLIP encoder layers, counted on the tools' trees."""
        unet = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in self.diffusers.modules())
        text = sum(isinstance(m, nn.Linear) and ".encoder.layers." in n for n, m in self.clip.named_modules())
        return unet + text


@pytest.fixture(scope="module")
def bases() -> Bases:
    return Bases()


@torch.no_grad()
def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a wrapped Linear/Conv2d computes with, read out of its forward (bias removed): the layer is linear
    in its input, so one-hot inputs give its columns."""
    geo = getattr(layer, "base_layer", layer)  # peft wraps the layer; LyCORIS replaces its forward
    w = geo.weight
    if w.dim() == 2:
        eye = torch.eye(w.shape[1], dtype=w.dtype)
        return (layer(eye) - layer(torch.zeros_like(eye[:1]))).T
    cin, k = w.shape[1], tuple(w.shape[2:])
    same = tuple((kk - 1) // 2 for kk in k)
    if tuple(geo.stride) == (1, 1) and tuple(geo.dilation) == (1, 1) and tuple(geo.padding) == same:
        # one impulse per input channel at the centre of a k x k image: output (i, j) reads tap (k-1-i, k-1-j)
        x = torch.zeros(cin, cin, *k, dtype=w.dtype)
        x[torch.arange(cin), torch.arange(cin), same[0], same[1]] = 1
        y = layer(x) - layer(torch.zeros_like(x[:1]))
        return y.flip(2, 3).transpose(0, 1)
    # general case (the stride-2 downsamplers): one impulse per (channel, tap) under one output position
    s, p = geo.stride, geo.padding
    i0 = [math.ceil(pp / ss) for pp, ss in zip(p, s)]
    r0 = [a * ss - pp for a, ss, pp in zip(i0, s, p)]
    n = cin * k[0] * k[1]
    x = torch.zeros(n, cin, r0[0] + k[0], r0[1] + k[1], dtype=w.dtype)
    idx = torch.arange(n)
    x[idx, idx // (k[0] * k[1]), r0[0] + (idx // k[1]) % k[0], r0[1] + idx % k[1]] = 1
    y = layer(x)[:, :, i0[0], i0[1]] - layer(torch.zeros_like(x[:1]))[:, :, i0[0], i0[1]]
    return y.T.reshape(w.shape[0], cin, *k)


def _randomise(params, dtype: torch.dtype, seed: int) -> None:
    """Every LoRA parameter random, rounded to the file's dtype (so the file holds what the tool computes with);
    DoRA magnitudes positive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in params:
            val = torch.randn(prm.shape, generator=g, dtype=torch.float64) * 0.2
            if "dora_scale" in name or "magnitude" in name:
                val = val.abs() + 0.5
            prm.copy_(val.to(dtype).to(prm.dtype))


def _tool_layers(unet: nn.Module, text: nn.Module, te_prefix: str = "lora_te_") -> dict[str, nn.Module]:
    """Kohya stem -> the tool's layer, named from the diffusers/HF trees (independent of clora's keymap)."""
    out = {"lora_unet_" + n.replace(".", "_"): m for n, m in unet.named_modules() if n}
    out.update({te_prefix + n.replace(".", "_"): m for n, m in text.named_modules() if n})
    return out


# ----- writers: the tools themselves --------------------------------------------------------------------------------

def kohya_metadata(algo: str, dim: int, alpha: float) -> dict[str, str]:
    return {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(dim), "ss_network_alpha": str(alpha),
            "ss_network_args": f'{{"algo": "{algo}"}}', "ss_base_model_version": "sd_v1", "ss_output_name": "catlora",
            "ss_tag_frequency": TAGS}


def write_lycoris(path: Path, bases: Bases, algo: str, dtype: torch.dtype, dim: int = 4, alpha: float = 2.0,
                  conv: bool = True, unet: Optional[nn.Module] = None, **kwargs) -> tuple[Path, dict, list]:
    """A LyCORIS network on copies of the bases, parameters randomised, saved by LyCORIS's ``save_weights``.
    Returns the file, stem -> wrapped layer, and the network's modules."""
    unet = bases.unet_copy() if unet is None else unet
    text = copy.deepcopy(bases.clip)
    preset = path.with_suffix(".toml")
    preset.write_text(PRESET.format(conv="true" if conv else "false"))
    net = create_network(1.0, dim, alpha, None, text, unet, algo=algo, preset=str(preset), **kwargs)
    net.apply_to(text, unet, True, True)
    net = net.double()
    _randomise(net.named_parameters(), dtype, seed=len(path.name))
    net.save_weights(str(path), dtype, kohya_metadata(algo, dim, alpha))
    return path, _tool_layers(unet, text), list(net.unet_loras) + list(net.text_encoder_loras)


def _peft_models(bases: Bases, dora: bool) -> tuple[nn.Module, nn.Module]:
    """peft LoRA (``lora_alpha = r``: peft files carry no alpha) on copies of the bases, parameters randomised; one
    pair per DoRA flag, shared by the three file forms."""
    key = ("peft", dora)
    if key not in bases.cache:
        unet, text = bases.unet_copy(), copy.deepcopy(bases.clip)
        for model, targets in ((unet, PEFT_UNET_TARGETS), (text, PEFT_TEXT_TARGETS)):
            config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets, use_dora=dora, init_lora_weights=False)
            peft.inject_adapter_in_model(config, model)
            _randomise(((n, p) for n, p in model.named_parameters() if "lora_" in n), torch.float32, seed=7 + dora)
        bases.cache[key] = (unet, text)
    return bases.cache[key]


def write_peft(path: Path, bases: Bases, form: str, dora: bool) -> tuple[Path, dict, list]:
    """The peft model written in ``form``: ``raw`` (peft's state dict), ``diffusers`` (as diffusers' training scripts
    save) or ``kohya`` (diffusers' ``convert_state_dict_to_kohya``)."""
    unet, text = _peft_models(bases, dora)
    u_sd, t_sd = ({k: v.float() for k, v in peft.get_peft_model_state_dict(m).items()} for m in (unet, text))
    if form == "raw":
        save_file({**u_sd, **t_sd}, str(path))
    elif form == "diffusers":
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            str(path.parent), unet_lora_layers=convert_state_dict_to_diffusers(u_sd),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(t_sd), weight_name=path.name)
    else:
        packed = {**{f"unet.{k}": v for k, v in u_sd.items()}, **{f"text_encoder.{k}": v for k, v in t_sd.items()}}
        save_file(convert_state_dict_to_kohya(packed), str(path))
    layers = _tool_layers(unet, text, "lora_te1_" if form == "kohya" else "lora_te_")
    wrapped = [m for m in list(unet.modules()) + list(text.modules()) if isinstance(m, peft.tuners.lora.LoraLayer)]
    return path, layers, wrapped


def _ly(algo: str, dtype: torch.dtype = torch.float32, **kw) -> Callable:
    return lambda path, bases: write_lycoris(path, bases, algo, dtype, **kw)


def _pf(form: str, dora: bool) -> Callable:
    return lambda path, bases: write_peft(path, bases, form, dora)


# name -> (writer, clora layout, module kinds, DoRA, tolerance of the relative ΔW error)
LAYOUTS: dict[str, tuple[Callable, str, set, bool, float]] = {
    "lycoris_locon_fp16": (_ly("lora", torch.float16, conv_dim=4, conv_alpha=1.0), "kohya", {"lora"}, False, 1e-12),
    "lycoris_lora_noconv_bf16": (_ly("lora", torch.bfloat16, conv=False), "kohya", {"lora"}, False, 1e-12),
    "lycoris_locon_tucker": (_ly("lora", use_tucker=True), "kohya", {"lora"}, False, 1e-12),
    # the file stores α·√r (here in fp32): 1e-7 is that rounding
    "lycoris_rslora": (_ly("lora", dim=8, rs_lora=True), "kohya", {"lora"}, False, 1e-7),
    "lycoris_loha": (_ly("loha"), "lycoris", {"loha"}, False, 1e-12),
    "lycoris_loha_tucker_fp16": (_ly("loha", torch.float16, use_tucker=True), "lycoris", {"loha"}, False, 1e-12),
    "lycoris_lokr": (_ly("lokr", factor=4), "lycoris", {"lokr"}, False, 1e-12),
    "lycoris_lokr_full": (_ly("lokr", full_matrix=True), "lycoris", {"lokr"}, False, 1e-12),
    "lycoris_dora": (_ly("lora", dora_wd=True), "kohya", {"lora"}, True, 1e-12),
    "lycoris_dora_input_axis": (_ly("lora", dora_wd=True, wd_on_output=False), "kohya", {"lora"}, True, 1e-12),
    "lycoris_loha_dora": (_ly("loha", dora_wd=True), "lycoris", {"loha"}, True, 1e-12),
    "lycoris_lokr_dora": (_ly("lokr", dora_wd=True), "lycoris", {"lokr"}, True, 1e-12),
    "peft_raw": (_pf("raw", False), "peft", {"lora"}, False, 1e-12),
    "peft_raw_dora": (_pf("raw", True), "peft", {"lora"}, True, 1e-12),
    "diffusers": (_pf("diffusers", False), "peft", {"lora"}, False, 1e-12),
    "diffusers_dora": (_pf("diffusers", True), "peft", {"lora"}, True, 1e-12),
    "diffusers_to_kohya": (_pf("kohya", False), "kohya", {"lora"}, False, 1e-12),
    "diffusers_to_kohya_dora": (_pf("kohya", True), "kohya", {"lora"}, True, 1e-12),
}


@pytest.fixture(scope="module")
def written(bases: Bases, tmp_path_factory) -> dict[str, tuple[Path, dict, list]]:
    folder = tmp_path_factory.mktemp("real_tool_loras")
    return {name: spec[0](folder / f"{name}.safetensors", bases) for name, spec in LAYOUTS.items()}


# ----- every layout against its tool ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(LAYOUTS))
def test_real_tool_file_matches_the_tools_forward(name: str, bases: Bases, written) -> None:
    _writer, layout, kinds, dora, tol = LAYOUTS[name]
    path, layers, tool_modules = written[name]
    lora = load_lora(path)
    assert lora.layout == layout and {m.kind for m in lora.modules.values()} == kinds
    assert not lora.skipped_keys, lora.skipped_keys[:3]
    assert (all(m.dora_scale is not None for m in lora.modules.values()) if dora
            else all(m.dora_scale is None for m in lora.modules.values()))
    # every module the tool made, bound to its own layer, with the tool's ΔW: nothing dropped, nothing for SDXL
    assert len(lora.modules) == len(tool_modules)
    res = resolve(lora, bases.ldm, bases.clip, min_match=0.0)
    errors, n_conv = {}, 0
    for _component, _path, target, module in res.targets:
        tool = layers[module.key]
        w = target.weight.detach()
        assert torch.equal(getattr(tool, "base_layer", tool).weight, w), module.key  # bound to the tool's own layer
        ref = bases.tool_delta(tool)
        errors[module.key] = float((module.dense_delta(w) - ref).abs().max() / ref.abs().max())
        n_conv += w.dim() == 4
    bad = sorted(((e, k) for k, e in errors.items() if not e < tol), reverse=True)
    assert not bad and not res.unmatched, (
        f"{len(bad)} modules with a relative ΔW error over {tol:g} (worst {bad[0][0] if bad else 0:.3g} at "
        f"{bad[0][1] if bad else '-'}); {len(res.unmatched)} of {res.total} not bound (e.g. "
        f"{[(k, res.reasons[k]) for k in res.unmatched[:1]]})")
    assert (res.matched, res.total, res.skipped, res.note) == (len(tool_modules), len(tool_modules), [], None)
    check_family(lora, "sd1")
    worst = max(errors.values())
    dtype = next(iter(next(iter(lora.modules.values())).tensors.values())).dtype
    RESULTS[name] = {"modules": res.matched, "conv": n_conv, "worst": worst, "dtype": str(dtype).replace("torch.", "")}


def test_the_layouts_cover_every_layer(bases: Bases, written) -> None:
    """The full layouts bind every Linear/Conv2d of the UNet and the CLIP encoder (292 here), counted on the tools'
    trees; without conv layers (LyCORIS ``enable_conv = false``), all but the 3x3 ones."""
    n = bases.targets()
    assert n == 292
    for name in ("lycoris_locon_fp16", "lycoris_loha", "lycoris_lokr_dora", "peft_raw_dora", "diffusers_to_kohya"):
        assert len(load_lora(written[name][0]).modules) == n, name
    k3 = sum(isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) for m in bases.diffusers.modules())
    assert len(load_lora(written["lycoris_lora_noconv_bf16"][0]).modules) == n - k3  # LyCORIS keeps 1x1 convs


# ----- what Civitai files carry -------------------------------------------------------------------------------------

def test_kohya_metadata_dtypes_and_alpha(written) -> None:
    lora = load_lora(written["lycoris_locon_fp16"][0])
    assert lora.metadata["ss_network_module"] == "lycoris.kohya" and lora.family == "sd1"  # tiny shapes: the header
    assert lora.trigger_words == ["sks cat", "cat", "sofa", "catlora"]
    with safe_open(str(written["lycoris_locon_fp16"][0]), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float16}  # alpha scalars too
    conv_in, attn = lora.modules["lora_unet_conv_in"], lora.modules["lora_unet_mid_block_attentions_0_proj_in"]
    assert (conv_in.alpha, conv_in.scale) == (1.0, 0.25)  # conv_alpha 1, rank 4
    assert lora.modules["lora_te_text_model_encoder_layers_0_mlp_fc1"].scale == 0.5  # alpha 2, rank 4
    assert attn.tensors["down"].dim() == 4  # 1x1 conv proj_in
    bf16 = load_lora(written["lycoris_lora_noconv_bf16"][0])
    assert {t.dtype for m in bf16.modules.values() for t in m.tensors.values()} == {torch.bfloat16}
    assert all(m.tensors["down"].shape[2:] in ((), (1, 1)) for m in bf16.modules.values())  # 1x1 convs only


def test_rslora_alpha_as_stored(bases: Bases, tmp_path: Path) -> None:
    """rs-LoRA stores α·√r as ``alpha`` (LyCORIS: α=2, r=8 -> 5.657), in the file's dtype: fp16 rounds it.  We read
    the file as written, ``scale = alpha / r``, as A1111 and Forge do."""
    path, _, _ = write_lycoris(tmp_path / "rs16.safetensors", bases, "lora", torch.float16, dim=8, alpha=4.0,
                               conv=False, rs_lora=True)
    m = load_lora(path).modules["lora_te_text_model_encoder_layers_1_self_attn_q_proj"]
    assert m.alpha == 11.3125 and m.scale == 11.3125 / 8  # 4·√8 = 11.3137 in fp16
    assert abs(m.scale - 4 / math.sqrt(8)) / (4 / math.sqrt(8)) < 2e-4


def test_lokr_full_factors_have_no_alpha_scale(written) -> None:
    lora = load_lora(written["lycoris_lokr_full"][0])
    assert all("lokr_w1" in m.tensors and "lokr_w2" in m.tensors and m.rank == 0 and m.scale == 1.0
               for m in lora.modules.values())
    assert all(m.alpha is not None for m in lora.modules.values())


def test_dora_magnitude_layouts(written) -> None:
    """The three magnitude conventions the tools write, with clora's reading of each."""
    out = load_lora(written["lycoris_dora"][0]).modules
    assert tuple(out["lora_unet_up_blocks_1_resnets_0_conv1"].dora_scale.shape) == (32, 1, 1, 1)
    inp = load_lora(written["lycoris_dora_input_axis"][0]).modules
    assert tuple(inp["lora_unet_up_blocks_1_resnets_0_conv1"].dora_scale.shape) == (1, 64, 1, 1)
    for name in ("peft_raw_dora", "diffusers_dora", "diffusers_to_kohya_dora"):
        mods = load_lora(written[name][0]).modules
        conv = mods["lora_unet_up_blocks_1_resnets_0_conv1"]  # 64 -> 32
        square = mods["lora_unet_down_blocks_0_resnets_0_conv2"]  # 32 -> 32: the shape alone would read "input"
        assert tuple(conv.dora_scale.shape) == (1, 32, 1, 1) and tuple(square.dora_scale.shape) == (1, 32, 1, 1)
        assert conv.dora_axis == square.dora_axis == "out"
        lin = mods["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"]
        assert tuple(lin.dora_scale.shape) == (32,)


# ----- diffusers' kohya converter on SD1.5 ---------------------------------------------------------------------------

def test_diffusers_kohya_file_for_sd15_is_sd1(tmp_path: Path) -> None:
    """``convert_state_dict_to_kohya`` names SD1's text encoder ``lora_te1_``: at SD1.5's real shapes the file is an
    SD 1.x LoRA (768-wide cross-attention), and its text modules bind to SD1's CLIP."""
    from tests.test_keymap import SD15, SD15_DIFFUSERS
    import ldm.modules.diffusionmodules.openaimodel as openaimodel
    import transformers

    with torch.device("meta"):
        dunet = diffusers.UNet2DConditionModel(**SD15_DIFFUSERS)
        cfg = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12)
        clip = transformers.CLIPTextModel(cfg)
        ldm = openaimodel.UNetModel(**SD15)
    config = dict(r=1, lora_alpha=1, init_lora_weights=False)
    peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0"], **config), dunet)
    peft.inject_adapter_in_model(peft.LoraConfig(target_modules=PEFT_TEXT_TARGETS, **config), clip)
    packed = {**{f"unet.{k}": v for k, v in peft.get_peft_model_state_dict(dunet).items()},
              **{f"text_encoder.{k}": v for k, v in peft.get_peft_model_state_dict(clip).items()}}
    kohya = convert_state_dict_to_kohya(packed)
    assert any(k.startswith("lora_te1_") for k in kohya) and not any(k.startswith("lora_te_t") for k in kohya)
    save_file({k: torch.zeros(v.shape) for k, v in kohya.items()}, str(tmp_path / "sd15.safetensors"))
    lora = load_lora(tmp_path / "sd15.safetensors")
    assert lora.family == "sd1" and len(lora.modules) == 128 + 72
    check_family(lora, "sd1")
    with pytest.raises(LoraError, match=r"is for SD 1\.x; the loaded model is SDXL"):
        check_family(lora, "sdxl")
    res = resolve(lora, ldm, clip, min_match=1.0)
    assert (res.matched, res.total) == (200, 200)


# ----- modules the model lacks, modules clora does not support ------------------------------------------------------

def test_dropped_modules_are_counted_and_warned(bases: Bases, tmp_path: Path, caplog) -> None:
    """A LyCORIS file made on a UNet with a third resnet on the last level, and with LyCORIS's norm modules
    (``train_norm``), on our two-resnet UNet: the modules the model lacks and the unsupported tensors are counted,
    logged once as a warning and kept as the note for the infotext."""
    bigger = bases.unet_copy({**DIFFUSERS_UNET, "layers_per_block": (2, 2, 2, 3)})
    path, _, tool_modules = write_lycoris(tmp_path / "extra.safetensors", bases, "lora", torch.float32,
                                          unet=bigger, train_norm=True)
    names = {n for n, m in bases.diffusers.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    lacking = sorted(n for n, m in bigger.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n not in names)
    assert len(lacking) == 7  # down_blocks.3.resnets.2 (3 layers), up_blocks.0.resnets.3 (4)
    with safe_open(str(path), "pt") as f:
        norm_tensors = [k for k in f.keys() if k.endswith((".w_norm", ".b_norm"))]
    assert norm_tensors
    lora = load_lora(path)
    assert sorted(lora.skipped_keys) == sorted(norm_tensors)
    total = len(lora.modules)
    with caplog.at_level(logging.WARNING, logger="clora"):
        res = resolve(lora, bases.ldm, bases.clip)  # 90 %: the file is for this architecture
    assert sorted(res.unmatched) == sorted("lora_unet_" + n.replace(".", "_") for n in lacking)
    assert (res.matched, res.total) == (total - 7, total)
    assert [r.getMessage() for r in caplog.records] == ["CLoRA: " + res.note]
    assert res.note.startswith(f"LoRA 'extra': 7 of {total} modules do not fit this model and are not applied (e.g. "
                               f"lora_unet_")
    assert f"; {len(norm_tensors)} tensors of unsupported or incomplete modules are ignored (e.g. " in res.note


# ----- DoRA at a weight other than 1 -------------------------------------------------------------------------------

def test_dora_at_weight_half_is_half_the_full_dora_update(bases: Bases, written) -> None:
    """``<lora:name:0.5>`` on a DoRA file: A1111 (``finalize_updown``) and Forge (``weight_decompose``) both apply
    ``0.5·ΔW_dora`` with ``ΔW_dora`` the full-strength DoRA update; so does clora's per-row application.  LyCORIS's
    own multiplier 0.5 scales the low-rank part inside the normalisation and gives another result (checked too, so that
    this test would notice if the two agreed)."""
    path, layers, tool_modules = written["lycoris_dora"]
    lycoris_of = {m.lora_name: m for m in tool_modules}
    lora = load_lora(path)
    res = resolve(lora, bases.ldm, bases.clip, min_match=1.0)
    picked = [t for t in res.targets if t[3].key in ("lora_unet_up_blocks_1_resnets_0_conv1",
                                                     "lora_te_text_model_encoder_layers_0_mlp_fc1")]
    assert len(picked) == 2
    g = torch.Generator().manual_seed(3)
    for _c, _p, target, module in picked:
        tool = layers[module.key]
        w = target.weight.detach()
        full = effective_weight(tool) - w  # the tool at multiplier 1
        x = (torch.randn(2, w.shape[1], 6, 6, generator=g, dtype=torch.float64) if w.dim() == 4
             else torch.randn(2, 5, w.shape[1], generator=g, dtype=torch.float64))
        plain = target(x)
        with LoraRows([(target, 0, module)]) as rows:
            rows.plan = RowPlan.from_lists([[(0, 0.5)], []])
            ours = target(x)
        op = (lambda t, wt: F.conv2d(t, wt, padding=1)) if w.dim() == 4 else F.linear
        torch.testing.assert_close(ours[0], plain[0] + op(x[:1], 0.5 * full)[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours[1], plain[1], rtol=0, atol=0)
        lycoris_of[module.key].multiplier = 0.5
        try:
            inside = effective_weight(tool) - w
        finally:
            lycoris_of[module.key].multiplier = 1.0
        assert float((inside - 0.5 * full).abs().max() / full.abs().max()) > 1e-3
