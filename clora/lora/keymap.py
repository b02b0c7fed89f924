"""Kohya stems <-> module paths in the ldm trees the hosts run, built from the model's own module tree.

LoRA files name their targets by kohya stems: ``lora_unet_`` + the *diffusers* UNet path with ``.`` -> ``_``
(``lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k``) and ``lora_te_`` + the HF CLIP path
(``lora_te_text_model_encoder_layers_0_self_attn_q_proj``).  The hosts run the *ldm* UNet (``input_blocks``...), so
`unet_stem_table` walks the ldm tree, works out which diffusers block each ldm block is (levels and resnet counts are
read from the tree, not assumed), and maps every ``Linear``/``Conv2d`` in it.  Because the table is built from the
real module names, stems with underscores inside names (``to_out_0``, ``transformer_blocks``) never need guessing.

ldm <-> diffusers, for ``L`` levels with ``n_l`` resnets on level ``l``:

===================================  ==================================================
diffusers                            ldm (``UNetModel``)
===================================  ==================================================
conv_in                              input_blocks.0.0
time_embedding.linear_1 / linear_2   time_embed.0 / time_embed.2
add_embedding.linear_1 / linear_2    label_emb.0.0 / label_emb.0.2 (SDXL)
down_blocks.l.resnets.j              input_blocks.k.0, k = 1 + Σ_{m<l}(n_m+1) + j
down_blocks.l.attentions.j           input_blocks.k.1
down_blocks.l.downsamplers.0.conv    input_blocks.(k of the level's end).0.op
mid_block.resnets.0 / .1             middle_block.0 / middle_block.2
mid_block.attentions.0               middle_block.1
up_blocks.i.resnets.j                output_blocks.k.0 (up level i mirrors down level L-1-i, n+1 blocks each)
up_blocks.i.attentions.j             output_blocks.k.1
up_blocks.i.upsamplers.0.conv        output_blocks.k.1.conv or .2.conv (2 when the level has attention)
conv_norm_out / conv_out             out.0 / out.2
resnet conv1 / conv2                 in_layers.2 / out_layers.3
resnet time_emb_proj / conv_shortcut emb_layers.1 / skip_connection
transformer internals                unchanged (proj_in, transformer_blocks.t.attn1.to_q, ..., ff.net.2, proj_out)
===================================  ==================================================

Every ldm path is also registered under its own ldm-style stem (``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``,
as kohya's SDXL trainer writes), so both spellings resolve.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ..errors import user_message
from .dense import shape_problem
from .functional import ParamTarget
from .types import LoraError, LoraFile, LoraModule, is_linear, is_target

__all__ = [
    "HOST_ROOTS", "SINGLE_CLIP_PREFIXES", "full_path", "unet_paths", "unet_stem_table", "text_paths", "text_stem_table",
    "is_open_clip_text", "open_clip_param_table", "ResolvedLora", "resolve", "dropped_summary", "stem",
]

logger = logging.getLogger("clora")

# Stem prefixes that name the text encoder of a model with one CLIP (SD 1.x): kohya's ``lora_te_``, and ``lora_te1_``
# as diffusers' ``convert_state_dict_to_kohya`` writes it.  A1111 (``networks.load_network``) and Forge (its LoRA key
# collection) both apply ``lora_te1_`` keys to SD1's CLIP.
SINGLE_CLIP_PREFIXES = ("lora_te_", "lora_te1_")

# Where each host keeps the two trees, relative to the object the host calls the model.
#   A1111: shared.sd_model (LatentDiffusion): UNet at model.diffusion_model, CLIPTextModel at cond_stage_model.transformer.
#   Forge: the UNet is p.sd_model.forge_objects.unet.model.diffusion_model (root: forge_objects.unet.model) and the CLIP-L
#          text model clip_l.transformer inside forge_objects.clip.cond_stage_model.
HOST_ROOTS: dict[str, dict[str, str]] = {
    "a1111": {"unet": "model.diffusion_model", "text": "cond_stage_model.transformer"},
    "forge": {"unet": "diffusion_model", "text": "clip_l.transformer"},
}


_RESNET_INTERNALS = {
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_FIXED = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.2": "conv_out",
}


def stem(prefix: str, path: str) -> str:
    """Kohya stem of a module path: ``prefix`` + path with dots replaced by underscores."""
    return prefix + path.replace(".", "_")


def full_path(host: str, component: str, relpath: str) -> str:
    """Path of a module from the host's model object, e.g. ``("a1111", "unet", "out.2")`` -> ``model.diffusion_model.out.2``."""
    try:
        root = HOST_ROOTS[host][component]
    except KeyError:
        raise LoraError(f"Unknown host/component {host!r}/{component!r}; known: {sorted(HOST_ROOTS)} / unet, text") from None
    return f"{root}.{relpath}" if relpath else root


# ----- UNet ---------------------------------------------------------------------------------------

def _block_kind(block: nn.Module) -> str:
    """Classify one child of an ldm TimestepEmbedSequential by its structure (ldm, sgm and Forge agree on these names)."""
    if hasattr(block, "in_layers") and hasattr(block, "out_layers"):
        return "resnet"
    if hasattr(block, "transformer_blocks"):
        return "attention"
    if hasattr(block, "op"):
        return "downsample"
    if hasattr(block, "conv"):
        return "upsample"
    return "other"


def _block_prefixes(unet: nn.Module) -> dict[str, tuple[str, str]]:
    """ldm block path -> (diffusers block path, kind) for every resnet/attention/sampler block of the UNet."""
    out: dict[str, tuple[str, str]] = {}
    inputs = list(getattr(unet, "input_blocks", []))
    if not inputs:
        raise LoraError("The UNet has no input_blocks; it is not an ldm UNetModel.")
    level, j = 0, 0
    per_level: list[int] = []
    for k, seq in enumerate(inputs[1:], start=1):
        kinds = [_block_kind(b) for b in seq]
        if kinds and kinds[0] == "downsample":
            out[f"input_blocks.{k}.0"] = (f"down_blocks.{level}.downsamplers.0", "downsample")
            per_level.append(j)
            level, j = level + 1, 0
            continue
        for idx, kind in enumerate(kinds):
            name = {"resnet": "resnets", "attention": "attentions"}.get(kind)
            if name is not None:
                out[f"input_blocks.{k}.{idx}"] = (f"down_blocks.{level}.{name}.{j}", kind)
        j += 1
    per_level.append(j)
    levels = len(per_level)

    if hasattr(unet, "middle_block"):
        n_res = 0
        for idx, b in enumerate(unet.middle_block):
            kind = _block_kind(b)
            if kind == "resnet":
                out[f"middle_block.{idx}"] = (f"mid_block.resnets.{n_res}", kind)
                n_res += 1
            elif kind == "attention":
                out[f"middle_block.{idx}"] = ("mid_block.attentions.0", kind)

    k = 0
    outputs = list(getattr(unet, "output_blocks", []))
    for up in range(levels):
        for j in range(per_level[levels - 1 - up] + 1):
            if k >= len(outputs):
                break
            for idx, b in enumerate(outputs[k]):
                kind = _block_kind(b)
                if kind == "resnet":
                    out[f"output_blocks.{k}.{idx}"] = (f"up_blocks.{up}.resnets.{j}", kind)
                elif kind == "attention":
                    out[f"output_blocks.{k}.{idx}"] = (f"up_blocks.{up}.attentions.{j}", kind)
                elif kind == "upsample":
                    out[f"output_blocks.{k}.{idx}"] = (f"up_blocks.{up}.upsamplers.0", kind)
            k += 1
    return out


def _convert_inner(kind: str, inner: str) -> Optional[str]:
    if kind == "attention":
        return inner
    if kind == "resnet":
        return _RESNET_INTERNALS.get(inner)
    if kind == "downsample":
        return "conv" if inner == "op" else None
    if kind == "upsample":
        return "conv" if inner == "conv" else None
    return None


def unet_paths(unet: nn.Module) -> dict[str, str]:
    """diffusers path -> ldm path (relative to ``unet``) for every ``Linear``/``Conv2d`` with a diffusers name."""
    blocks = _block_prefixes(unet)
    table: dict[str, str] = {}
    for path, module in unet.named_modules():
        if not is_target(module):
            continue
        if path in _FIXED:
            table[_FIXED[path]] = path
            continue
        parts = path.split(".")
        # input_blocks.k.i / output_blocks.k.i have three parts, middle_block.i two
        cut = 2 if parts[0] == "middle_block" else 3
        block, inner = ".".join(parts[:cut]), ".".join(parts[cut:])
        if block not in blocks or not inner:
            continue
        dprefix, kind = blocks[block]
        dinner = _convert_inner(kind, inner)
        if dinner is not None:
            table[f"{dprefix}.{dinner}"] = path
    return table


def unet_stem_table(unet: nn.Module) -> dict[str, str]:
    """Kohya stem -> ldm module path for the UNet: diffusers-named stems plus ldm-named aliases."""
    table: dict[str, str] = {}
    for dpath, lpath in unet_paths(unet).items():
        table[stem("lora_unet_", dpath)] = lpath
    for lpath, module in unet.named_modules():
        if is_target(module) and lpath:
            table.setdefault(stem("lora_unet_", lpath), lpath)
    return table


# ----- text encoder -------------------------------------------------------------------------------

def text_paths(text_model: nn.Module) -> dict[str, str]:
    """HF CLIP path (``text_model.encoder.layers.0.self_attn.q_proj``) -> path relative to ``text_model``, Linear only.

    Accepts a ``CLIPTextModel`` (paths start with ``text_model.``) or its inner ``CLIPTextTransformer``.
    """
    prefix = "" if hasattr(text_model, "text_model") else "text_model."
    return {prefix + path: path for path, m in text_model.named_modules() if is_linear(m)}


def text_stem_table(text_model: nn.Module, prefix: str = "lora_te_") -> dict[str, str]:
    """Kohya stem -> module path for a CLIP text model (``prefix`` ``lora_te1_``/``lora_te2_`` for SDXL's two)."""
    return {stem(prefix, hf): rel for hf, rel in text_paths(text_model).items()}


def is_open_clip_text(text_model: nn.Module) -> bool:
    """An open_clip text tower (``TextTransformer``, or the ``CLIP`` model holding it): ``transformer.resblocks``
    of blocks with a ``torch.nn.MultiheadAttention`` ``attn`` and an ``mlp`` of ``c_fc``/``c_proj``."""
    blocks = getattr(getattr(text_model, "transformer", None), "resblocks", None)
    return blocks is not None and len(blocks) > 0 and isinstance(getattr(blocks[0], "attn", None), nn.MultiheadAttention)


def open_clip_param_table(text_model: nn.Module, prefix: str = "lora_te2_") -> dict[str, tuple[str, Optional[tuple[int, int]]]]:
    """Kohya stem (HF CLIP names, as kohya writes SDXL's second encoder) -> (parameter name, row span) of an
    open_clip text tower.

    ``self_attn.q_proj`` / ``k_proj`` / ``v_proj`` are the row slices ``[0, D)``, ``[D, 2D)``, ``[2D, 3D)`` of the fused
    ``attn.in_proj_weight``; ``self_attn.out_proj`` is ``attn.out_proj.weight``; ``mlp.fc1`` / ``fc2`` are
    ``mlp.c_fc.weight`` / ``mlp.c_proj.weight`` (the correspondence A1111's Lora extension uses for SDXL's
    ``1_model_transformer_resblocks_*``).  These parameters are reached through `functional.call_with_loras`, never
    by hooks: ``nn.MultiheadAttention`` reads them directly.
    """
    if not is_open_clip_text(text_model):
        raise LoraError("The second text encoder is not an open_clip text tower (transformer.resblocks.*.attn).")
    table: dict[str, tuple[str, Optional[tuple[int, int]]]] = {}
    for i, block in enumerate(text_model.transformer.resblocks):
        hf = f"text_model_encoder_layers_{i}_"
        base = f"transformer.resblocks.{i}"
        d = block.attn.embed_dim
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            table[f"{prefix}{hf}self_attn_{proj}"] = (f"{base}.attn.in_proj_weight", (j * d, d))
        table[f"{prefix}{hf}self_attn_out_proj"] = (f"{base}.attn.out_proj.weight", None)
        table[f"{prefix}{hf}mlp_fc1"] = (f"{base}.mlp.c_fc.weight", None)
        table[f"{prefix}{hf}mlp_fc2"] = (f"{base}.mlp.c_proj.weight", None)
    return table


# ----- resolution ---------------------------------------------------------------------------------

@dataclass
class ResolvedLora:
    """A LoRA's modules bound to the modules of one model.

    targets: ``(component, path, module, lora_module)`` with component ``"unet"`` or ``"text"`` and ``path`` relative
             to the component's root (see `HOST_ROOTS` / `full_path`).
    matched / total: modules bound / modules of the components that were given.
    unmatched: keys of modules that found no target or whose shapes do not fit it; ``reasons`` says which.
    skipped: keys of modules for a component that was not given (not counted in ``total``).
    param_targets: modules bound to parameters hooks cannot reach (an open_clip second text encoder, component
             ``"text2"``): applied through `functional.call_with_loras`; ``lora_index`` is 0 here, to be set by the
             caller (``dataclasses.replace``).
    note: `dropped_summary` of what is not applied (``None`` when every module and tensor is); `resolve` also logs it
          as a warning on the ``clora`` logger.
    """

    targets: list[tuple[str, str, nn.Module, LoraModule]]
    matched: int
    total: int
    unmatched: list[str]
    reasons: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    note: Optional[str] = None
    param_targets: list[ParamTarget] = field(default_factory=list)


def _component(key: str, two_encoders: bool) -> Optional[str]:
    """``"unet"``, ``"text"`` (the first/only text encoder) or ``"text2"`` (SDXL's second).

    ``lora_te2_`` names the second encoder; with one encoder (no ``text_model_2``) it is still counted as ``"text"`` and
    then fits nothing there (the SD1 behaviour, where it is a foreign module)."""
    if key.startswith("lora_unet_"):
        return "unet"
    if key.startswith("lora_te2_") and two_encoders:
        return "text2"
    if key.startswith("lora_te"):
        return "text"
    return None


def resolve(lora: LoraFile, unet: Optional[nn.Module] = None, text_model: Optional[nn.Module] = None,
            min_match: float = 0.9, text_model_2: Optional[nn.Module] = None) -> ResolvedLora:
    """Bind every module of ``lora`` to a ``Linear``/``Conv2d`` of ``unet``/``text_model`` (either may be ``None``).

    Each binding is shape-checked against the target's weight; the text model answers to every prefix of
    `SINGLE_CLIP_PREFIXES`, and a second module for a layer already bound is unmatched (it would apply twice).
    Raises `LoraError` when fewer than ``min_match`` of the modules of the given components bind: the file is then
    most likely for another architecture.  Otherwise returns the counts and the unmatched keys, and when anything is
    left out (modules that do not fit, tensors of unsupported or incomplete modules counted by the reader) logs one
    warning naming the count and examples, kept as ``note`` for the caller's infotext: nothing is dropped silently.

    ``text_model_2`` is SDXL's second text encoder (``lora_te2_`` keys): a transformers CLIP (Forge's clip_g) binds
    like the first, as ``"text2"`` targets; an open_clip text tower (A1111's) binds as ``param_targets``.
    """
    tables: dict[str, tuple[nn.Module, dict[str, str]]] = {}
    if unet is not None:
        tables["unet"] = (unet, unet_stem_table(unet))
    if text_model is not None:
        text_table: dict[str, str] = {}
        for prefix in SINGLE_CLIP_PREFIXES:
            text_table.update(text_stem_table(text_model, prefix))
        tables["text"] = (text_model, text_table)
    params2: Optional[dict[str, tuple[str, Optional[tuple[int, int]]]]] = None
    if text_model_2 is not None:
        if is_open_clip_text(text_model_2):
            params2 = open_clip_param_table(text_model_2)
            tables["text2"] = (text_model_2, {})
        else:
            tables["text2"] = (text_model_2, text_stem_table(text_model_2, "lora_te2_"))
    param_targets: list[ParamTarget] = []
    targets: list[tuple[str, str, nn.Module, LoraModule]] = []
    unmatched: list[str] = []
    reasons: dict[str, str] = {}
    skipped: list[str] = []
    bound: dict[tuple[str, str], str] = {}
    for key, module in lora.modules.items():
        comp = _component(key, text_model_2 is not None)
        if comp is None or comp not in tables:
            skipped.append(key)
            continue
        root, table = tables[comp]
        if comp == "text2" and params2 is not None:
            hit = params2.get(key)
            if hit is None:
                unmatched.append(key)
                reasons[key] = "no such module in this model"
                continue
            pname, span = hit
            weight = root.get_parameter(pname)
            shape = tuple(weight.shape) if span is None else (span[1], *weight.shape[1:])
            problem = shape_problem(module, shape)
            if problem is not None:
                unmatched.append(key)
                reasons[key] = problem
                continue
            param_targets.append(ParamTarget(pname, span, 0, module))
            continue
        path = table.get(key)
        if path is None:
            unmatched.append(key)
            reasons[key] = "no such module in this model"
            continue
        if (comp, path) in bound:
            unmatched.append(key)
            reasons[key] = f"its layer is already taken by {bound[(comp, path)]}"
            continue
        target = root.get_submodule(path)
        problem = shape_problem(module, tuple(target.weight.shape))
        if problem is not None:
            unmatched.append(key)
            reasons[key] = problem
            continue
        bound[(comp, path)] = key
        targets.append((comp, path, target, module))
    n_bound = len(targets) + len(param_targets)
    total = n_bound + len(unmatched)
    if total and n_bound / total < min_match:
        examples = "; ".join(f"{k}: {reasons[k]}" for k in unmatched[:3])
        hint = "Is it made for another model?"
        if lora.family != "unknown":
            from .files import FAMILY_NAMES

            hint = f"It looks like a LoRA for {FAMILY_NAMES.get(lora.family, lora.family)}: is it made for another model?"
        raise LoraError(f"LoRA '{lora.name}': only {n_bound} of {total} modules match this model "
                        f"(e.g. {examples}). {hint}")
    res = ResolvedLora(targets, n_bound, total, unmatched, reasons, skipped, param_targets=param_targets)
    res.note = dropped_summary(lora, res)
    if res.note is not None:
        logger.warning(user_message(res.note))
    return res


def dropped_summary(lora: LoraFile, res: ResolvedLora, examples: int = 2) -> Optional[str]:
    """One line saying what of ``lora`` is not applied to the model, or ``None`` when everything is.

    Counts the modules that found no layer or do not fit it, the modules of a component that was not given, and the
    file's tensors the reader could not use (``LoraFile.skipped_keys``: unsupported module types such as IA3/OFT,
    incomplete modules); with up to ``examples`` examples of each (none when 0, for the infotext).
    """
    def shown(keys: list[str], fmt=str) -> str:
        if not examples:
            return ""
        listed = "; ".join(fmt(k) for k in keys[:examples]) + ("; ..." if len(keys) > examples else "")
        return f" (e.g. {listed})"

    parts = []
    if res.unmatched:
        parts.append(f"{len(res.unmatched)} of {res.total} modules do not fit this model and are not applied"
                     + shown(res.unmatched, lambda k: f"{k}: {res.reasons.get(k, '?')}"))
    if res.skipped:
        parts.append(f"{len(res.skipped)} modules are for a part of the model that was not given" + shown(res.skipped))
    if lora.skipped_keys:
        parts.append(f"{len(lora.skipped_keys)} tensors of unsupported or incomplete modules are ignored"
                     + shown(lora.skipped_keys))
    if not parts:
        return None
    return f"LoRA '{lora.name}': " + "; ".join(parts) + "."
