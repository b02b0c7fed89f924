"""Write random-weight LoRA files with real key names and shapes, for tests and fixtures.

Every writer takes the module trees it targets (an ldm ``UNetModel`` and an HF ``CLIPTextModel``, real-size ones may
live on the ``meta`` device: only the LoRA tensors are materialised) and draws the factors from a seeded generator.
Up factors are nonzero (small Gaussians) so every update is nonzero.

Layouts: `write_kohya` (LoRA, LoCon incl. 3x3, CP ``lora_mid``), `write_peft` (peft ``lora_A/lora_B``, older diffusers
``lora.down``/``lora_linear_layer``/``processor.to_q_lora`` forms, ``base_model.model.`` prefix), `write_loha`,
`write_lokr`, `write_dora`; and files that must be refused: `write_sdxl_like`, `write_pickle`, `write_unknown`,
`write_mostly_unmatched`.  `write_all` writes one of each for a model.

Module names come from `clora.lora.keymap` (diffusers path <-> ldm path derived from the tree itself).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from safetensors.torch import save_file  # noqa: E402

from clora.lora.keymap import text_paths, unet_paths  # noqa: E402

PathLike = Union[str, Path]
Target = tuple[str, str, tuple[int, ...]]  # (component "unet"/"text", diffusers or HF path, weight shape)

DEFAULT_TAGS = {"10_sks_dog": {"sks dog": 20, "dog": 15, "outdoors": 6, "grass": 6}, "5_reg": {"dog": 5, "sitting": 3}}

__all__ = [
    "targets", "sdxl_targets", "write_sdxl", "write_kohya", "write_peft", "write_loha", "write_lokr", "write_dora", "write_sdxl_like", "write_pickle",
    "write_unknown", "write_mostly_unmatched", "write_all", "kohya_metadata",
]


# ----- helpers ------------------------------------------------------------------------------------

def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _randn(g: torch.Generator, shape: Iterable[int], std: float, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(tuple(shape), generator=g) * std).to(dtype).contiguous()


def _is_attention(dpath: str) -> bool:
    return ".attentions." in dpath


def _is_conv_block(dpath: str) -> bool:
    return any(s in dpath for s in (".resnets.", ".downsamplers.", ".upsamplers."))


def targets(unet: Optional[nn.Module], text_model: Optional[nn.Module], conv: bool = False) -> list[Target]:
    """The modules kohya's trainer targets: every Linear/Conv2d inside UNet transformer blocks and the CLIP encoder
    layers; with ``conv`` also the resnets (conv1/conv2 3x3, time_emb_proj, conv_shortcut) and the samplers."""
    out: list[Target] = []
    if unet is not None:
        for dpath, lpath in unet_paths(unet).items():
            if _is_attention(dpath) or (conv and _is_conv_block(dpath)):
                out.append(("unet", dpath, tuple(unet.get_submodule(lpath).weight.shape)))
    if text_model is not None:
        for hf, rel in text_paths(text_model).items():
            if ".encoder.layers." in hf:
                out.append(("text", hf, tuple(text_model.get_submodule(rel).weight.shape)))
    return out


def _kohya_stem(component: str, path: str, te_prefix: str = "lora_te_") -> str:
    return ("lora_unet_" if component == "unet" else te_prefix) + path.replace(".", "_")


def kohya_metadata(name: str, rank: int, alpha: float, tags: Optional[dict] = None,
                   module: str = "networks.lora", base_model: str = "sd_v1") -> dict[str, str]:
    """The kohya sd-scripts header entries the loader reads (plus a few it ignores)."""
    return {
        "ss_base_model_version": base_model,
        "ss_output_name": name,
        "ss_tag_frequency": json.dumps(DEFAULT_TAGS if tags is None else tags),
        "ss_network_module": module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
    }


def _lora_factors(g: torch.Generator, shape: tuple[int, ...], rank: int, cp: bool, dtype: torch.dtype,
                  ) -> dict[str, torch.Tensor]:
    """down/up(/mid) for a Linear ``(out, in)`` or Conv2d ``(out, in, kh, kw)`` weight."""
    out_f, in_f = shape[0], shape[1]
    if len(shape) == 2:
        return {"down": _randn(g, (rank, in_f), 0.1, dtype), "up": _randn(g, (out_f, rank), 0.05, dtype)}
    kernel = shape[2:]
    t = {"up": _randn(g, (out_f, rank, 1, 1), 0.05, dtype)}
    if cp and kernel != (1, 1):
        t["down"] = _randn(g, (rank, in_f, 1, 1), 0.1, dtype)
        t["mid"] = _randn(g, (rank, rank, *kernel), 0.1, dtype)
    else:
        t["down"] = _randn(g, (rank, in_f, *kernel), 0.1, dtype)
    return t


def _save(path: PathLike, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(p), metadata=metadata)
    return p


def _alpha(alpha: Optional[float], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(float(alpha), dtype=dtype)


# ----- kohya / LyCORIS ----------------------------------------------------------------------------

def write_kohya(path: PathLike, unet: Optional[nn.Module], text_model: Optional[nn.Module], rank: int = 4,
                alpha: Optional[float] = 2.0, conv: bool = False, cp: bool = False, seed: int = 0,
                metadata: Optional[dict[str, str]] = None, dtype: torch.dtype = torch.float32) -> Path:
    """kohya LoRA (``conv``: LoCon incl. 3x3 resnet/sampler convs; ``cp``: 3x3 convs as down 1x1 / mid / up)."""
    g = _gen(seed)
    tensors: dict[str, torch.Tensor] = {}
    for comp, p, shape in targets(unet, text_model, conv):
        s = _kohya_stem(comp, p)
        for short, t in _lora_factors(g, shape, rank, cp, dtype).items():
            tensors[f"{s}.lora_{short}.weight"] = t
        if alpha is not None:
            tensors[f"{s}.alpha"] = _alpha(alpha, dtype)
    meta = kohya_metadata(Path(path).stem, rank, alpha if alpha is not None else rank)
    meta.update(metadata or {})
    return _save(path, tensors, meta)


def write_loha(path: PathLike, unet: Optional[nn.Module], text_model: Optional[nn.Module], rank: int = 4,
               alpha: Optional[float] = 2.0, conv: bool = True, tucker: bool = False, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> Path:
    """LyCORIS LoHa; ``tucker`` gives 3x3 convs ``hada_t1``/``hada_t2`` cores (then ``w·a`` is ``(r, out)``)."""
    g = _gen(seed)
    tensors: dict[str, torch.Tensor] = {}
    for comp, p, shape in targets(unet, text_model, conv):
        s = _kohya_stem(comp, p)
        out_f, in_f, kernel = shape[0], shape[1], shape[2:]
        if tucker and kernel not in ((), (1, 1)):
            for i in (1, 2):
                tensors[f"{s}.hada_t{i}"] = _randn(g, (rank, rank, *kernel), 0.3, dtype)
                tensors[f"{s}.hada_w{i}_a"] = _randn(g, (rank, out_f), 0.3, dtype)
                tensors[f"{s}.hada_w{i}_b"] = _randn(g, (rank, in_f), 0.3, dtype)
        else:
            rest = in_f * math.prod(kernel)
            for i in (1, 2):
                tensors[f"{s}.hada_w{i}_a"] = _randn(g, (out_f, rank), 0.3, dtype)
                tensors[f"{s}.hada_w{i}_b"] = _randn(g, (rank, rest), 0.3, dtype)
        if alpha is not None:
            tensors[f"{s}.alpha"] = _alpha(alpha, dtype)
    meta = kohya_metadata(Path(path).stem, rank, alpha if alpha is not None else rank, module="lycoris.kohya")
    return _save(path, tensors, meta)


def _split(n: int) -> tuple[int, int]:
    """``n = a·b`` with ``a`` the largest divisor not above ``sqrt(n)`` (LyCORIS' factorization, roughly)."""
    a = max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)
    return a, n // a


def write_lokr(path: PathLike, unet: Optional[nn.Module], text_model: Optional[nn.Module], rank: int = 4,
               alpha: Optional[float] = 2.0, conv: bool = True, decompose: bool = True, tucker: bool = False,
               seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """LyCORIS LoKr: ``w1`` full ``(a, c)``; ``w2`` ``(b, d·k·k)`` as ``lokr_w2_a @ lokr_w2_b`` when ``decompose``
    (or with a ``lokr_t2`` core for 3x3 convs when ``tucker``), else a full ``lokr_w2``."""
    g = _gen(seed)
    tensors: dict[str, torch.Tensor] = {}
    for comp, p, shape in targets(unet, text_model, conv):
        s = _kohya_stem(comp, p)
        (a, b), (c, d), kernel = _split(shape[0]), _split(shape[1]), shape[2:]
        tensors[f"{s}.lokr_w1"] = _randn(g, (a, c), 0.3, dtype)
        if not decompose:
            tensors[f"{s}.lokr_w2"] = _randn(g, (b, d, *kernel), 0.1, dtype)
        elif tucker and kernel not in ((), (1, 1)):
            tensors[f"{s}.lokr_t2"] = _randn(g, (rank, rank, *kernel), 0.3, dtype)
            tensors[f"{s}.lokr_w2_a"] = _randn(g, (rank, b), 0.3, dtype)
            tensors[f"{s}.lokr_w2_b"] = _randn(g, (rank, d), 0.3, dtype)
        else:
            tensors[f"{s}.lokr_w2_a"] = _randn(g, (b, rank), 0.3, dtype)
            tensors[f"{s}.lokr_w2_b"] = _randn(g, (rank, d * math.prod(kernel)), 0.3, dtype)
        if alpha is not None:
            tensors[f"{s}.alpha"] = _alpha(alpha, dtype)
    meta = kohya_metadata(Path(path).stem, rank, alpha if alpha is not None else rank, module="lycoris.kohya")
    return _save(path, tensors, meta)


def write_dora(path: PathLike, unet: Optional[nn.Module], text_model: Optional[nn.Module], rank: int = 4,
               alpha: Optional[float] = 2.0, axis: str = "out", seed: int = 0, dtype: torch.dtype = torch.float32,
               ) -> Path:
    """kohya/LyCORIS DoRA: a kohya LoRA plus ``dora_scale`` magnitudes, ``(out, 1[,1,1])`` for ``axis="out"``
    (LyCORIS ``wd_on_out``) or ``(1, in[,1,1])`` for ``axis="in"`` (early LyCORIS). Magnitudes are random positive
    numbers (the weights may be on ``meta``)."""
    g = _gen(seed)
    tensors: dict[str, torch.Tensor] = {}
    for comp, p, shape in targets(unet, text_model, False):
        s = _kohya_stem(comp, p)
        for short, t in _lora_factors(g, shape, rank, False, dtype).items():
            tensors[f"{s}.lora_{short}.weight"] = t
        if alpha is not None:
            tensors[f"{s}.alpha"] = _alpha(alpha, dtype)
        ones = [1] * (len(shape) - 2)
        mshape = (shape[0], 1, *ones) if axis == "out" else (1, shape[1], *ones)
        tensors[f"{s}.dora_scale"] = (torch.rand(mshape, generator=g) + 0.5).to(dtype)
    meta = kohya_metadata(Path(path).stem, rank, alpha if alpha is not None else rank, module="lycoris.kohya")
    return _save(path, tensors, meta)


# ----- peft / diffusers ---------------------------------------------------------------------------

_PROCESSOR_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}


def write_peft(path: PathLike, unet: Optional[nn.Module], text_model: Optional[nn.Module], rank: int = 4,
               alpha: Optional[float] = None, style: str = "peft", seed: int = 0,
               dtype: torch.dtype = torch.float32) -> Path:
    """diffusers/peft layouts. ``style``:

    * ``"peft"``: ``unet.<path>.lora_A.weight`` / ``lora_B.weight``, ``text_encoder.<path>...`` (+ ``.alpha``);
    * ``"base_model"``: the same keys under ``base_model.model.`` without the component prefix;
    * ``"diffusers"``: ``unet.<path>.lora.down.weight`` / ``lora.up.weight`` and
      ``text_encoder.<path>.lora_linear_layer.down.weight``;
    * ``"processor"``: ``unet.<attn>.processor.to_q_lora.down.weight`` (attention projections only) and the
      ``lora_linear_layer`` text keys.
    """
    g = _gen(seed)
    tensors: dict[str, torch.Tensor] = {}
    for comp, p, shape in targets(unet, text_model, False):
        if style == "base_model":
            base = f"base_model.model.{p}"
        else:
            base = f"{'unet' if comp == 'unet' else 'text_encoder'}.{p}"
        f = _lora_factors(g, shape, rank, False, dtype)
        if style in ("peft", "base_model"):
            names = {"down": f"{base}.lora_A.weight", "up": f"{base}.lora_B.weight"}
        elif comp == "text":
            names = {"down": f"{base}.lora_linear_layer.down.weight", "up": f"{base}.lora_linear_layer.up.weight"}
        elif style == "diffusers":
            names = {"down": f"{base}.lora.down.weight", "up": f"{base}.lora.up.weight"}
        elif style == "processor":
            attn, _, proj = p.rpartition(".attn")
            head, _, tail = proj.partition(".")  # "1", "to_q" / "to_out.0"
            if tail not in _PROCESSOR_PROJ:
                continue
            prefix = f"unet.{attn}.attn{head}.processor.{_PROCESSOR_PROJ[tail]}_lora"
            names = {"down": f"{prefix}.down.weight", "up": f"{prefix}.up.weight"}
        else:
            raise ValueError(f"unknown peft style {style!r}")
        for short, key in names.items():
            tensors[key] = f[short]
        if alpha is not None and style in ("peft", "base_model"):
            tensors[f"{base}.alpha"] = _alpha(alpha, dtype)
    return _save(path, tensors, None)


# ----- files to refuse ----------------------------------------------------------------------------

def write_sdxl_like(path: PathLike, rank: int = 4, seed: int = 0) -> Path:
    """An SDXL-shaped kohya file: ``lora_te1_`` (768 wide) and ``lora_te2_`` (1280 wide) text keys, ldm-style UNet keys
    whose cross-attention reads a 2048-wide context."""
    g = _gen(seed)
    tensors: dict[str, torch.Tensor] = {}

    def add(stem_: str, out_f: int, in_f: int) -> None:
        tensors[f"{stem_}.lora_down.weight"] = _randn(g, (rank, in_f), 0.1, torch.float16)
        tensors[f"{stem_}.lora_up.weight"] = _randn(g, (out_f, rank), 0.05, torch.float16)
        tensors[f"{stem_}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)

    for prefix, width, layers in (("lora_te1_", 768, 12), ("lora_te2_", 1280, 4)):
        for i in range(layers):
            base = f"{prefix}text_model_encoder_layers_{i}_"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                add(f"{base}self_attn_{proj}", width, width)
            add(f"{base}mlp_fc1", 4 * width, width)
            add(f"{base}mlp_fc2", width, 4 * width)
    for block, ch in (("input_blocks_4_1", 640), ("input_blocks_7_1", 1280), ("middle_block_1", 1280),
                      ("output_blocks_0_1", 1280), ("output_blocks_3_1", 640)):
        for t in range(2):
            base = f"lora_unet_{block}_transformer_blocks_{t}_"
            for a in ("attn1", "attn2"):
                add(f"{base}{a}_to_q", ch, ch)
                add(f"{base}{a}_to_k", ch, ch if a == "attn1" else 2048)
                add(f"{base}{a}_to_v", ch, ch if a == "attn1" else 2048)
                add(f"{base}{a}_to_out_0", ch, ch)
    meta = kohya_metadata(Path(path).stem, rank, rank, base_model="sdxl_base_v1-0")
    return _save(path, tensors, meta)


def write_pickle(path: PathLike, seed: int = 0) -> Path:
    """A ``.pt`` LoRA made with ``torch.save`` of a dict (the loader must refuse it without unpickling)."""
    g = _gen(seed)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"lora_unet_conv_in.lora_down.weight": _randn(g, (4, 4, 3, 3), 0.1, torch.float32),
                "lora_unet_conv_in.lora_up.weight": _randn(g, (4, 4, 1, 1), 0.05, torch.float32)}, str(p))
    return p


def write_unknown(path: PathLike, seed: int = 0) -> Path:
    """A safetensors file with no LoRA keys (a bit of a checkpoint)."""
    g = _gen(seed)
    return _save(path, {
        "model.diffusion_model.input_blocks.0.0.weight": _randn(g, (8, 4, 3, 3), 0.1, torch.float32),
        "model.diffusion_model.input_blocks.0.0.bias": _randn(g, (8,), 0.1, torch.float32),
        "first_stage_model.encoder.conv_in.weight": _randn(g, (8, 3, 3, 3), 0.1, torch.float32),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": _randn(g, (8,), 0.1, torch.float32),
    }, {"format": "pt"})


def write_mostly_unmatched(path: PathLike, unet: nn.Module, text_model: Optional[nn.Module], rank: int = 4,
                           real: int = 2, fake: int = 20, seed: int = 0) -> Path:
    """A valid kohya file with ``real`` modules that exist in the model, one real stem with a wrong shape, and
    ``fake`` stems naming modules the model does not have (a deeper level than it has)."""
    g = _gen(seed)
    tensors: dict[str, torch.Tensor] = {}
    tg = [t for t in targets(unet, text_model, False) if t[0] == "unet"]
    for comp, p, shape in tg[:real]:
        s = _kohya_stem(comp, p)
        for short, t in _lora_factors(g, shape, rank, False, torch.float32).items():
            tensors[f"{s}.lora_{short}.weight"] = t
    comp, p, shape = tg[real]
    s = _kohya_stem(comp, p)
    tensors[f"{s}.lora_down.weight"] = _randn(g, (rank, shape[1] + 3, *shape[2:]), 0.1, torch.float32)
    tensors[f"{s}.lora_up.weight"] = _randn(g, (shape[0], rank, *([1] * (len(shape) - 2))), 0.05, torch.float32)
    for i in range(fake):
        s = f"lora_unet_down_blocks_9_attentions_{i}_transformer_blocks_0_attn1_to_q"
        tensors[f"{s}.lora_down.weight"] = _randn(g, (rank, 64), 0.1, torch.float32)
        tensors[f"{s}.lora_up.weight"] = _randn(g, (64, rank), 0.05, torch.float32)
    return _save(path, tensors, kohya_metadata(Path(path).stem, rank, rank))


# ----- everything ---------------------------------------------------------------------------------

def write_all(out_dir: PathLike, unet: nn.Module, text_model: nn.Module, seed: int = 0) -> dict[str, Path]:
    """One file per layout for the given model, named ``<layout>.safetensors`` (``pickle.pt`` for the pickle)."""
    d = Path(out_dir)
    files = {
        "kohya": write_kohya(d / "kohya.safetensors", unet, text_model, seed=seed),
        "kohya_noalpha": write_kohya(d / "kohya_noalpha.safetensors", unet, text_model, alpha=None, seed=seed + 1),
        "locon": write_kohya(d / "locon.safetensors", unet, text_model, conv=True, seed=seed + 2),
        "locon_cp": write_kohya(d / "locon_cp.safetensors", unet, text_model, conv=True, cp=True, seed=seed + 3),
        "peft": write_peft(d / "peft.safetensors", unet, text_model, alpha=8.0, seed=seed + 4),
        "peft_base_model": write_peft(d / "peft_base_model.safetensors", unet, text_model, style="base_model",
                                      seed=seed + 5),
        "diffusers": write_peft(d / "diffusers.safetensors", unet, text_model, style="diffusers", seed=seed + 6),
        "diffusers_processor": write_peft(d / "diffusers_processor.safetensors", unet, text_model, style="processor",
                                          seed=seed + 7),
        "loha": write_loha(d / "loha.safetensors", unet, text_model, seed=seed + 8),
        "loha_tucker": write_loha(d / "loha_tucker.safetensors", unet, text_model, tucker=True, seed=seed + 9),
        "lokr": write_lokr(d / "lokr.safetensors", unet, text_model, seed=seed + 10),
        "lokr_full": write_lokr(d / "lokr_full.safetensors", unet, text_model, decompose=False, seed=seed + 11),
        "lokr_tucker": write_lokr(d / "lokr_tucker.safetensors", unet, text_model, tucker=True, seed=seed + 12),
        "dora": write_dora(d / "dora.safetensors", unet, text_model, seed=seed + 13),
        "sdxl": write_sdxl_like(d / "sdxl.safetensors", seed=seed + 14),
        "pickle": write_pickle(d / "pickle.pt", seed=seed + 15),
        "unknown": write_unknown(d / "unknown.safetensors", seed=seed + 16),
        "mostly_unmatched": write_mostly_unmatched(d / "mostly_unmatched.safetensors", unet, text_model,
                                                   seed=seed + 17),
    }
    return files


# ----- SDXL (two text encoders) -------------------------------------------------------------------

def sdxl_targets(unet: Optional[nn.Module], te1: Optional[nn.Module], te2: Optional[nn.Module]) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(component, HF/diffusers path, weight shape)`` for an SDXL model: UNet transformer modules, te1 and te2 encoder
    layers under their HF names (``text_model.encoder.layers.i.self_attn.q_proj``...), whatever te2's layout: an
    open_clip tower's shapes are read from its fused parameters (q/k/v: one third of ``in_proj_weight``)."""
    from clora.lora.keymap import is_open_clip_text, open_clip_param_table

    out = [t for t in targets(unet, te1, False)]
    if te2 is not None:
        if is_open_clip_text(te2):
            for stem_, (pname, span) in open_clip_param_table(te2, prefix="").items():
                w = te2.get_parameter(pname)
                shape = tuple(w.shape) if span is None else (span[1], *w.shape[1:])
                hf = stem_.replace("text_model_encoder_layers_", "text_model.encoder.layers.")
                layer, _, rest = hf[len("text_model.encoder.layers."):].partition("_")
                rest = rest.replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
                out.append(("text2", f"text_model.encoder.layers.{layer}.{rest}", shape))
        else:
            for hf, rel in text_paths(te2).items():
                if ".encoder.layers." in hf:
                    out.append(("text2", hf, tuple(te2.get_submodule(rel).weight.shape)))
    return out


def write_sdxl(path: PathLike, unet: Optional[nn.Module], te1: Optional[nn.Module], te2: Optional[nn.Module],
               layout: str = "kohya", rank: int = 4, alpha: Optional[float] = 2.0, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> Path:
    """An SDXL LoRA for the given modules. ``layout``: ``"kohya"`` (``lora_unet_*``, ``lora_te1_*``, ``lora_te2_*`` with
    ``lora_down``/``lora_up``), ``"loha"`` (the same stems, LyCORIS ``hada_*``) or ``"peft"`` (``unet.*``,
    ``text_encoder.*``, ``text_encoder_2.*`` with ``lora_A``/``lora_B``)."""
    g = _gen(seed)
    tensors: dict[str, torch.Tensor] = {}
    kohya_prefix = {"unet": "lora_unet_", "text": "lora_te1_", "text2": "lora_te2_"}
    peft_prefix = {"unet": "unet.", "text": "text_encoder.", "text2": "text_encoder_2."}
    for comp, p, shape in sdxl_targets(unet, te1, te2):
        if layout == "peft":
            base = peft_prefix[comp] + p
            f = _lora_factors(g, shape, rank, False, dtype)
            tensors[f"{base}.lora_A.weight"] = f["down"]
            tensors[f"{base}.lora_B.weight"] = f["up"]
            if alpha is not None:
                tensors[f"{base}.alpha"] = _alpha(alpha, dtype)
            continue
        s = kohya_prefix[comp] + p.replace(".", "_")
        if layout == "kohya":
            for short, t in _lora_factors(g, shape, rank, False, dtype).items():
                tensors[f"{s}.lora_{short}.weight"] = t
        elif layout == "loha":
            out_f, rest = shape[0], math.prod(shape[1:])
            for i in (1, 2):
                tensors[f"{s}.hada_w{i}_a"] = _randn(g, (out_f, rank), 0.3, dtype)
                tensors[f"{s}.hada_w{i}_b"] = _randn(g, (rank, rest), 0.3, dtype)
        else:
            raise ValueError(f"unknown layout {layout!r}")
        if alpha is not None:
            tensors[f"{s}.alpha"] = _alpha(alpha, dtype)
    meta = kohya_metadata(Path(path).stem, rank, alpha if alpha is not None else rank, base_model="sdxl_base_v1-0",
                          module="lycoris.kohya" if layout == "loha" else "networks.lora")
    return _save(path, tensors, meta)
