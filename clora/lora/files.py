"""Read ``.safetensors`` LoRA files into `LoraFile`: layouts, model family, metadata and trigger words.

Layouts read (every module is converted to its canonical kohya stem, see ``docs/DESIGN.md``):

* kohya / LyCORIS: ``<stem>.lora_down.weight``, ``.lora_up.weight``, ``.lora_mid.weight`` (CP), ``.alpha``,
  ``.dora_scale``; LoHa ``.hada_w1_a`` ... ``.hada_t2``; LoKr ``.lokr_w1`` ... ``.lokr_t2``; stems ``lora_unet_*``,
  ``lora_te_*``, ``lora_te1_*``/``lora_te2_*`` (SDXL's two text encoders; ``lora_te1_*`` alone is also how diffusers'
  ``convert_state_dict_to_kohya`` names SD1's, see `detect_family`), and peft's ``.lora_magnitude_vector[.weight]``
  under a kohya stem as that converter leaves it (unrenamed, the module's last dot or two kept:
  ``lora_unet_..._attn1.to_q.lora_magnitude_vector``, ``lora_unet.conv_in.lora_magnitude_vector``).  ldm-style UNet
  stems (``lora_unet_input_blocks_*``) are kept as they are; `keymap` resolves both spellings.
* peft / diffusers: ``unet.<diffusers path>.lora_A.weight``/``lora_B.weight`` and ``text_encoder[_2].<HF path>...``,
  optional ``.alpha``, ``.lora_magnitude_vector[.weight]`` (DoRA, one value per output channel whatever its shape:
  the module gets ``dora_axis="out"``); a ``base_model.model.`` prefix; the older diffusers
  ``<path>.lora.down.weight``/``lora.up.weight``, ``<path>.lora_linear_layer.down/up.weight`` and
  ``<attn>.processor.to_q_lora.down.weight`` forms.

Pickle files (``.pt``, ``.ckpt``, ``.bin`` ...) are refused without being opened: unpickling runs code.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from safetensors import safe_open

from .types import LoraError, LoraFile, LoraModule

__all__ = ["load_lora", "check_family", "detect_family", "trigger_words", "parse_keys", "FAMILY_NAMES"]

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "unknown": "an unknown model"}
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")

# kohya / LyCORIS suffix -> (kind or None for shared entries, short tensor name)
_KOHYA_PARTS: dict[str, tuple[Optional[str], str]] = {
    "lora_down.weight": ("lora", "down"),
    "lora_up.weight": ("lora", "up"),
    "lora_mid.weight": ("lora", "mid"),
    "alpha": (None, "alpha"),
    "dora_scale": (None, "dora_scale"),
    **{f"hada_{n}": ("loha", f"hada_{n}") for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{n}": ("lokr", f"lokr_{n}") for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
}
# peft / diffusers suffix -> (layout, kind, short name); longest first so ".lora.down.weight" wins over shorter tails.
_PEFT_PARTS: list[tuple[str, str, Optional[str], str]] = sorted([
    ("lora_A.weight", "peft", "lora", "down"),
    ("lora_B.weight", "peft", "lora", "up"),
    ("lora_magnitude_vector.weight", "peft", None, "peft_magnitude"),
    ("lora_magnitude_vector", "peft", None, "peft_magnitude"),
    ("lora.down.weight", "diffusers", "lora", "down"),
    ("lora.up.weight", "diffusers", "lora", "up"),
    ("lora_linear_layer.down.weight", "diffusers", "lora", "down"),
    ("lora_linear_layer.up.weight", "diffusers", "lora", "up"),
    ("alpha", "peft", None, "alpha"),
], key=lambda p: -len(p[0]))
_KOHYA_MAGNITUDE = re.compile(r"^(?P<stem>lora_(?:unet|te[12]?)[._].+)\.lora_magnitude_vector(?:\.weight)?$")
_PROCESSOR = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$")
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "conv_norm_out", "time_embedding.",
               "add_embedding.")
_REQUIRED = {
    "lora": [("down",), ("up",)],
    "loha": [("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)],
    "lokr": [("lokr_w1", "lokr_w1_b"), ("lokr_w2", "lokr_w2_b")],
}
_PAIRS = {"lokr_w1_b": "lokr_w1_a", "lokr_w2_b": "lokr_w2_a", "hada_t1": "hada_t2", "hada_t2": "hada_t1"}


# ----- keys ---------------------------------------------------------------------------------------

def _peft_stem(path: str) -> Optional[str]:
    """Kohya stem for a peft/diffusers module path, or ``None`` if it names no known component."""
    if path.startswith("base_model.model."):
        path = path[len("base_model.model."):]
    for prefix, kohya in (("unet.", "lora_unet_"), ("text_encoder_2.", "lora_te2_"), ("text_encoder.", "lora_te_")):
        if path.startswith(prefix):
            return kohya + path[len(prefix):].replace(".", "_")
    if path.startswith("text_model."):
        return "lora_te_" + path.replace(".", "_")
    if path.startswith(_UNET_ROOTS):
        return "lora_unet_" + path.replace(".", "_")
    return None


def _classify(key: str) -> Optional[tuple[str, str, Optional[str], str]]:
    """``(stem, layout, kind, short name)`` for one tensor key, or ``None`` when it belongs to no known module type."""
    bare = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
    m = _KOHYA_MAGNITUDE.match(bare)
    if m is not None:
        # peft's magnitude as diffusers' convert_state_dict_to_kohya leaves it: it turns all but the last two dots
        # into "_" (counted for keys ending in ".weight"; peft 0.13 writes none), e.g.
        # "lora_unet_..._attn1.to_q.lora_magnitude_vector" or "lora_unet.conv_in.lora_magnitude_vector"
        return m["stem"].replace(".", "_"), "kohya", None, "peft_magnitude"
    if bare.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) and "." in bare:
        stem_, suffix = bare.split(".", 1)
        part = _KOHYA_PARTS.get(suffix)
        return None if part is None else (stem_, "kohya", part[0], part[1])
    m = _PROCESSOR.match(bare)
    if m is not None:
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        stem_ = _peft_stem(f"{m['attn']}.{proj}")
        return None if stem_ is None else (stem_, "diffusers", "lora", m["part"])
    for suffix, layout, kind, short in _PEFT_PARTS:
        if bare.endswith("." + suffix):
            stem_ = _peft_stem(bare[: -len(suffix) - 1])
            return None if stem_ is None else (stem_, layout, kind, short)
    return None


def parse_keys(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, LoraModule], str, list[str]]:
    """Group tensors into modules: ``(modules by canonical stem, layout, skipped keys)``.

    Skipped keys are those of no known module type and those of incomplete or mixed-kind modules.
    """
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    kinds: dict[str, set[str]] = {}
    layouts: Counter[str] = Counter()
    skipped: list[str] = []
    for key, tensor in tensors.items():
        c = _classify(key)
        if c is None:
            skipped.append(key)
            continue
        stem_, layout, kind, short = c
        groups.setdefault(stem_, {})[short] = (key, tensor)
        if kind is not None:
            kinds.setdefault(stem_, set()).add(kind)
        layouts[layout] += 1
    modules: dict[str, LoraModule] = {}
    for stem_, parts in groups.items():
        ks = kinds.get(stem_, set())
        kind = next(iter(ks)) if len(ks) == 1 else None
        names = set(parts)
        complete = kind is not None and all(any(n in names for n in alts) for alts in _REQUIRED[kind])
        complete = complete and all(_PAIRS[n] in names for n in names if n in _PAIRS)
        complete = complete and not {"dora_scale", "peft_magnitude"} <= names  # two magnitudes: ambiguous
        if not complete:
            skipped.extend(k for k, _ in parts.values())
            continue
        alpha_t = parts.get("alpha")
        # peft's magnitude is one value per output channel whatever its shape ((1, out, 1, 1) for a conv): say so
        if "peft_magnitude" in parts:
            dora_t, dora_axis = parts["peft_magnitude"], "out"
        else:
            dora_t, dora_axis = parts.get("dora_scale"), None
        tensors_ = {n: t for n, (_, t) in parts.items() if n not in ("alpha", "dora_scale", "peft_magnitude")}
        alpha = None if alpha_t is None else float(alpha_t[1].float().reshape(-1)[0])
        modules[stem_] = LoraModule(stem_, kind, tensors_, alpha, None if dora_t is None else dora_t[1], dora_axis)
    if any(k.startswith("lora_te2_") for k in modules):  # diffusers SDXL: text_encoder -> te1 beside text_encoder_2
        modules = {("lora_te1_" + k[len("lora_te_"):] if k.startswith("lora_te_") else k):
                   (_renamed(m, "lora_te1_" + m.key[len("lora_te_"):]) if m.key.startswith("lora_te_") else m)
                   for k, m in modules.items()}
    layout = layouts.most_common(1)[0][0] if layouts else "unknown"
    if layout == "kohya" and any(m.kind in ("loha", "lokr") for m in modules.values()):
        layout = "lycoris"
    return modules, layout, skipped


def _renamed(m: LoraModule, key: str) -> LoraModule:
    return dataclasses.replace(m, key=key)


# ----- family -------------------------------------------------------------------------------------

_CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TEXT_FAMILY = {768: "sd1", 1024: "sd2", 1280: "sdxl"}


def _input_width(m: LoraModule) -> Optional[int]:
    t = m.tensors
    if m.kind == "lora":
        return int(t["down"].shape[1])
    if m.kind == "loha":
        return int(t["hada_w1_b"].shape[1])
    if m.kind == "lokr":
        c = t["lokr_w1"].shape[1] if "lokr_w1" in t else t["lokr_w1_b"].shape[1]
        d = t["lokr_w2"].shape[1] if "lokr_w2" in t else t["lokr_w2_b"].shape[1]
        return int(c * d)
    return None


def _metadata_family(metadata: dict[str, str], sidecar: dict[str, Any]) -> str:
    """Family named by the header (kohya ``ss_base_model_version``, then ``modelspec.architecture``), else by the
    A1111 sidecar's ``sd version``; ``"unknown"`` when none names one."""
    hints = (
        (metadata.get("ss_base_model_version", "").lower(), (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"))),
        (metadata.get("modelspec.architecture", "").lower(),
         (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"))),
        (str(sidecar.get("sd version", "")).lower(), (("sdxl", "sdxl"), ("sd2", "sd2"), ("sd1", "sd1"))),
    )
    for value, table in hints:
        for prefix, family in table:
            if value.startswith(prefix):
                return family
    return "unknown"


def detect_family(modules: dict[str, LoraModule], metadata: Optional[dict[str, str]] = None,
                  sidecar: Optional[dict[str, Any]] = None) -> str:
    """``"sd1"``, ``"sd2"``, ``"sdxl"`` or ``"unknown"`` from keys and shapes, then metadata when shapes say nothing.

    Evidence, strongest first: ``lora_te2_`` keys (SDXL's second text encoder; SD 1.x/2.x have one); the context width
    read by cross-attention ``attn2.to_k``/``to_v`` (768 SD1, 1024 SD2, 2048 SDXL; this covers ldm-style
    ``input_blocks`` keys too); the text encoder's width (768 SD1, 1024 SD2, 1280 SDXL's second encoder); then
    ``ss_base_model_version`` / ``modelspec.architecture`` / the A1111 sidecar's ``sd version``.

    ``lora_te1_`` alone proves nothing: SDXL's first text encoder is a 768-wide CLIP-L like SD1's, and diffusers'
    ``convert_state_dict_to_kohya`` names SD1's text encoder ``lora_te1_`` (both hosts apply such keys to SD1's
    CLIP).  A ``lora_te1_`` file that neither shapes nor metadata place is ``"unknown"``.  Models of other sizes (e.g.
    tiny test models) are ``"unknown"`` too.
    """
    if any(k.startswith("lora_te2_") for k in modules):
        return "sdxl"
    votes: Counter[str] = Counter()
    for key, m in modules.items():
        width = _input_width(m)
        if key.startswith("lora_unet_") and key.endswith(("attn2_to_k", "attn2_to_v")):
            fam = _CONTEXT_FAMILY.get(width or -1)
        elif key.startswith("lora_te_") and key.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1")):
            fam = _TEXT_FAMILY.get(width or -1)
        elif key.startswith("lora_te1_") and key.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1")):
            fam = "sd2" if width == 1024 else None  # 768: SD1 or SDXL's CLIP-L, the UNet has to tell
        else:
            continue
        if fam is not None:
            votes[fam] += 1
    if votes:
        return votes.most_common(1)[0][0]
    return _metadata_family(metadata or {}, sidecar or {})


def check_family(lora: LoraFile, model_family: str) -> None:
    """Raise `LoraError` when ``lora`` was made for another model family than ``model_family`` (unknown passes)."""
    if lora.family == "unknown" or model_family == "unknown" or lora.family == model_family:
        return
    raise LoraError(f"LoRA '{lora.name}' is for {FAMILY_NAMES.get(lora.family, lora.family)}; the loaded model is "
                    f"{FAMILY_NAMES.get(model_family, model_family)}.")


# ----- metadata -----------------------------------------------------------------------------------

def _split_words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def trigger_words(metadata: dict[str, str], sidecar: Optional[dict[str, Any]] = None, max_tags: int = 20) -> list[str]:
    """Trigger-word suggestions, deduplicated (case-insensitive), in this order:

    the sidecar's ``activation text`` (the user's own, comma separated), ``modelspec.trigger_phrase``, the
    ``ss_tag_frequency`` tags merged over datasets and sorted by count (most frequent first, at most ``max_tags``),
    then ``ss_output_name``.
    """
    words: list[str] = []
    if sidecar and isinstance(sidecar.get("activation text"), str):
        words += _split_words(sidecar["activation text"])
    if metadata.get("modelspec.trigger_phrase"):
        words += _split_words(metadata["modelspec.trigger_phrase"])
    freq_raw = metadata.get("ss_tag_frequency")
    if freq_raw:
        try:
            freq = json.loads(freq_raw)
        except json.JSONDecodeError:
            freq = {}
        counts: Counter[str] = Counter()
        if isinstance(freq, dict):
            for tags in freq.values():
                if isinstance(tags, dict):
                    for tag, n in tags.items():
                        if str(tag).strip() and isinstance(n, (int, float)):
                            counts[str(tag).strip()] += int(n)
        # Counter.most_common keeps first-seen order among equal counts
        words += [tag for tag, _ in counts.most_common(max_tags)]
    if metadata.get("ss_output_name"):
        words.append(metadata["ss_output_name"].strip())
    seen: set[str] = set()
    out: list[str] = []
    for w in words:
        if w and w.lower() not in seen:
            seen.add(w.lower())
            out.append(w)
    return out


def _read_sidecar(path: Path) -> dict[str, Any]:
    side = path.with_suffix(".json")
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


# ----- loading ------------------------------------------------------------------------------------

def _examples(keys: Iterable[str], n: int = 3) -> str:
    ks = list(keys)
    return ", ".join(ks[:n]) + (", ..." if len(ks) > n else "")


def _read_safetensors(p: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a safetensors file, read whole into memory and deserialised from bytes.

    Not ``safe_open(...).get_tensor`` / ``load_file``: with the safetensors 0.4.x the WebUIs ship, every tensor read
    through a memory-mapped file leaves ~60 bytes behind for good (a LoRA of 900 tensors: ~53 KB per load, and the
    WebUI glue loads each bound LoRA for every generation: the server's memory grew with every request).  Reading
    from bytes leaves nothing.  Files that way cannot be read (e.g. an empty tensor) fall back to ``safe_open``."""
    import warnings

    from safetensors.torch import load as load_bytes

    with safe_open(str(p), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        keys = list(f.keys())
    try:
        with warnings.catch_warnings():  # torch.frombuffer on read-only bytes: the tensors are only ever read
            warnings.simplefilter("ignore", UserWarning)
            tensors = load_bytes(p.read_bytes())
    except Exception:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in keys}
    return metadata, {k: tensors[k] for k in keys}


def load_lora(path: Union[str, Path], max_tags: int = 20) -> LoraFile:
    """Read a ``.safetensors`` LoRA (tensors in their stored dtype, on the CPU) and its metadata.

    Raises `LoraError` for pickle files (never unpickled), other non-safetensors files, unreadable files and files with
    no recognisable LoRA module.
    """
    p = Path(path)
    name = p.stem
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise LoraError(f"LoRA '{name}' ({p.name}) is a pickle file; only .safetensors LoRAs are supported "
                        f"(loading a pickle can run arbitrary code). Convert it to .safetensors first.")
    if suffix != ".safetensors":
        raise LoraError(f"LoRA '{name}' ({p.name}) is not a .safetensors file; only .safetensors LoRAs are supported.")
    if not p.is_file():
        raise LoraError(f"LoRA '{name}': file {p} does not exist.")
    try:
        # normal tensors even when called under torch.inference_mode() (Forge): gradient passes may save them
        with torch.inference_mode(False):
            metadata, tensors = _read_safetensors(p)
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise LoraError(f"LoRA '{name}' ({p.name}) is not a readable safetensors file: {exc}") from None
    modules, layout, skipped = parse_keys(tensors)
    if not modules:
        raise LoraError(f"LoRA '{name}' has an unknown layout: none of its {len(tensors)} tensors is a LoRA module "
                        f"(e.g. {_examples(tensors) or 'no keys at all'}). Supported: kohya/LyCORIS "
                        f"(lora_unet_*/lora_te_* with lora_down/lora_up, hada_*, lokr_*) and peft/diffusers "
                        f"(unet.*/text_encoder.* with lora_A/lora_B).")
    sidecar = _read_sidecar(p)
    return LoraFile(
        name=name,
        path=str(p),
        family=detect_family(modules, metadata, sidecar),
        layout=layout,
        modules=modules,
        metadata=metadata,
        trigger_words=trigger_words(metadata, sidecar, max_tags),
        skipped_keys=skipped,
        user_metadata=sidecar,
    )
