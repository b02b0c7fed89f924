"""Model builders and fixture paths shared by the tests, the benchmarks and ``tools/make_fixtures.py``.

Plain functions, no pytest fixtures.  Everything uses real host architectures (ldm's ``UNetModel``, transformers'
``CLIPTextModel``) with small sizes and seeded random weights; no weights are ever downloaded.  Heavy libraries
(ldm, transformers) are imported inside the functions, so importing this module is cheap.

``fixtures_dir()`` returns the folder written by ``tools/make_fixtures.py`` (tokenizer, tiny CLIP, tiny SD1 checkpoint,
LoRA files), generating it on first use and whenever the generator sources change.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

__all__ = [
    "ROOT",
    "FIXTURES_ENV",
    "FIXTURES_FORMAT",
    "tiny_unet_config",
    "sd15_unet_config",
    "redraw_zero_layers",
    "sharpen_cross_attention",
    "make_unet",
    "TINY_ATTENTION_GAIN",
    "make_tiny_unet",
    "tiny_clip_config",
    "make_tiny_clip",
    "clip_tokenizer",
    "TINY_SDXL",
    "tiny_sdxl_unet_config",
    "make_tiny_sdxl_unet",
    "tiny_clip_g_config",
    "make_tiny_clip_g_hf",
    "make_tiny_clip_g_open_clip",
    "make_tiny_sdxl",
    "sdxl_context_arg",
    "tiny_sdxl_adm_channels",
    "fixtures_stamp",
    "fixtures_dir",
]

ROOT = Path(__file__).resolve().parent.parent
FIXTURES_ENV = "CLORA_FIXTURES"
# Bump to force regeneration when something outside the hashed sources changes the output.
FIXTURES_FORMAT = "1"
_STAMP_NAME = "STAMP"
_MARKER_NAME = ".clora-fixtures"
_LOCK_NAME = ".lock"
# Sources whose content decides the fixtures (hashed into the stamp); missing ones count as absent.
_GENERATOR_SOURCES = (
    "tools/make_fixtures.py",
    "tools/clip_vocab.py",
    "tools/lora_writer.py",
    "tests/models.py",
)


def _ensure_import_path() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def _ensure_torchvision() -> None:
    _ensure_import_path()
    from clora._compat import ensure_torchvision_importable

    ensure_torchvision_importable()


# ----- UNet -----------------------------------------------------------------------------------------------------------
def tiny_unet_config() -> dict[str, Any]:
    """``ldm.modules.diffusionmodules.openaimodel.UNetModel`` kwargs of a tiny SD1-shaped UNet (about 2 M parameters).

    Same layout as SD1.5 (attention at down-sampling factors 1, 2, 4; none at 8; spatial transformers with
    cross-attention), with 32 base channels, 2 heads and a 64-wide context.  A fresh dict on every call.
    """
    return {
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 2, 2],
        "num_heads": 2,
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "context_dim": 64,
        "use_checkpoint": False,
        "legacy": False,
    }


def sd15_unet_config() -> dict[str, Any]:
    """``UNetModel`` kwargs of Stable Diffusion 1.5 (the WebUI's v1-inference.yaml, but gradient checkpointing off).

    The yaml's ``use_checkpoint: True`` breaks gradient passes through frozen weights; set it back to test that case.
    """
    return {
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 320,
        "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 4, 4],
        "num_heads": 8,
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "context_dim": 768,
        "use_checkpoint": False,
        "legacy": False,
    }


def redraw_zero_layers(module: torch.nn.Module, generator: Optional[torch.Generator] = None) -> list[str]:
    """Re-initialise every Linear/Conv layer whose weight is all zeros; return their names.

    ldm zero-initialises the UNet's output conv, each ResBlock's last conv and each transformer's ``proj_out``
    (so a fresh model is an identity map there and its output does not depend on the prompt).  Redrawn weights
    and biases follow PyTorch's default layer init (Kaiming-uniform), drawn from ``generator``.
    """
    redrawn: list[str] = []
    for name, layer in module.named_modules():
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            continue
        if torch.count_nonzero(layer.weight) != 0:
            continue
        with torch.no_grad():
            fan_in = layer.weight[0].numel()
            bound = 1.0 / fan_in**0.5
            layer.weight.copy_(_uniform(layer.weight.shape, bound, generator))
            if layer.bias is not None:
                layer.bias.copy_(_uniform(layer.bias.shape, bound, generator))
        redrawn.append(name)
    return redrawn


def _uniform(shape: torch.Size, bound: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    return (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bound


def sharpen_cross_attention(unet: torch.nn.Module, gain: float) -> int:
    """Multiply the query and key projections of each cross-attention layer (``*.attn2``) by ``gain``; return the count.

    With PyTorch's default init the cross-attention logits have a standard deviation of about 0.3, so every pixel
    attends almost uniformly to all 77 tokens and the maps of two words are nearly identical (correlation ~0.9).
    A gain ``g`` scales the logits by ``g**2``; at 3 the maps are peaked and word-specific, as in trained models.
    """
    count = 0
    with torch.no_grad():
        for name, layer in unet.named_modules():
            if name.endswith("attn2") and hasattr(layer, "to_q") and hasattr(layer, "to_k"):
                layer.to_q.weight.mul_(gain)
                layer.to_k.weight.mul_(gain)
                count += 1
    return count


def make_unet(config: dict[str, Any], seed: int = 0, attention_gain: float = 1.0) -> torch.nn.Module:
    """An ldm ``UNetModel`` built from ``config`` with seeded random weights (zero layers redrawn), fp32, eval mode.

    ``attention_gain`` != 1 sharpens the cross-attention (see ``sharpen_cross_attention``).
    """
    _ensure_torchvision()
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    with _seeded(seed):
        unet = UNetModel(**config)
    redraw_zero_layers(unet, torch.Generator().manual_seed(seed + 1))
    if attention_gain != 1.0:
        sharpen_cross_attention(unet, attention_gain)
    return unet.eval().requires_grad_(False)


TINY_ATTENTION_GAIN = 3.0


def make_tiny_unet(seed: int = 0) -> torch.nn.Module:
    """The tiny UNet with seeded weights and sharpened cross-attention (gain ``TINY_ATTENTION_GAIN``).

    Equal to the UNet of the tiny SD1 fixture checkpoint for seed 0.
    """
    return make_unet(tiny_unet_config(), seed, attention_gain=TINY_ATTENTION_GAIN)


# ----- CLIP text model ------------------------------------------------------------------------------------------------
def tiny_clip_config() -> "CLIPTextConfig":
    """A ``transformers.CLIPTextConfig``: the real vocabulary (49408), 77 positions, 64 wide, 2 layers, 2 heads."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=64,
        pad_token_id=1,
        bos_token_id=49406,
        eos_token_id=49407,
    )


def make_tiny_clip(seed: int = 0) -> "CLIPTextModel":
    """A ``transformers.CLIPTextModel`` on ``tiny_clip_config()`` with seeded random weights, fp32, eval mode.

    Equal to the fixture folder ``fixtures_dir() / "tiny-clip"`` (and to the text encoder of the tiny SD1 checkpoint)
    for seed 0.
    """
    from transformers import CLIPTextModel

    config = tiny_clip_config()
    with _seeded(seed):
        model = CLIPTextModel(config)
    # A real CLIP's final layer norm has a non-trivial affine part.  With weight 1 / bias 0 every token's output has
    # mean exactly 0, and the WebUI's emphasis (which rescales by the output's mean) divides by ~0 and makes NaNs.
    g = torch.Generator().manual_seed(seed + 101)
    ln = model.text_model.final_layer_norm
    with torch.no_grad():
        ln.weight.copy_(1.0 + 0.1 * torch.randn(ln.weight.shape, generator=g))
        ln.bias.copy_(0.5 + 0.1 * torch.randn(ln.bias.shape, generator=g))
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=None)
def clip_tokenizer() -> "CLIPTokenizer":
    """transformers' ``CLIPTokenizer`` of openai/clip-vit-large-patch14, from the offline fixture files (cached)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(fixtures_dir() / "clip-tokenizer"))


# ----- tiny SDXL ------------------------------------------------------------------------------------------------------
#: Widths of the tiny SDXL: te1 = the tiny CLIP (64), te2 96 wide with a 64-wide projection, 8 Fourier features per
#: size scalar (SDXL: 768, 1280, 1280 and 256), so context_dim 64 + 96 = 160 and adm_in_channels 64 + 6·8 = 112
#: (SDXL: 2048 and 1280 + 6·256 = 2816).
TINY_SDXL = {"te1": 64, "te2": 96, "te2_heads": 2, "te2_layers": 2, "te2_proj": 64, "size_dim": 8}


def tiny_sdxl_unet_config() -> dict[str, Any]:
    """``UNetModel`` kwargs of a tiny SDXL-shaped UNet (the ldm package CI installs).

    SDXL's layout: three levels (channel_mult [1, 2, 4]), attention at down-sampling 2 and 4 only, linear
    proj_in/proj_out (``use_linear_in_transformer``), several transformer blocks per attention, context
    te1 ⊕ te2 (160 here).  This ldm (stablediffusion at SD 2.1) takes ``transformer_depth`` as one int only (SDXL uses
    [0, 2, 10] per level): 2 everywhere, with ``context_dim`` given
    per block.  It also has no ``num_classes="sequential"``: `make_tiny_sdxl_unet` adds
    sgm's ``label_emb`` (``Sequential(Sequential(Linear(adm, 4C), SiLU, Linear(4C, 4C)))``, keys
    ``label_emb.0.0``/``label_emb.0.2`` as in SDXL checkpoints) after construction; ldm's forward then adds
    ``label_emb(y)`` to the time embedding exactly as sgm's does.
    """
    return {
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [4, 2],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 4],
        "num_heads": 2,
        "use_spatial_transformer": True,
        "use_linear_in_transformer": True,
        "transformer_depth": 2,
        # one entry per transformer block: this ldm's SpatialTransformer indexes a list by block (an int is
        # wrapped into a one-element list, which fails for depth > 1); at forward time it indexes ``context`` the
        # same way, so callers pass ``[context] * 2`` (`sdxl_context_arg`)
        "context_dim": [TINY_SDXL["te1"] + TINY_SDXL["te2"]] * 2,
        "use_checkpoint": False,
        "legacy": False,
    }


def sdxl_context_arg(unet: torch.nn.Module, context: torch.Tensor):
    """``context`` as this ldm's ``SpatialTransformer`` needs it: a list with one entry per transformer block when a
    block has depth > 1 (it indexes ``context[i]``), else the tensor itself."""
    depth = max((len(m.transformer_blocks) for m in unet.modules() if hasattr(m, "transformer_blocks")), default=1)
    return [context] * depth if depth > 1 else context


def tiny_sdxl_adm_channels() -> int:
    return TINY_SDXL["te2_proj"] + 6 * TINY_SDXL["size_dim"]


def make_tiny_sdxl_unet(seed: int = 0, attention_gain: float = TINY_ATTENTION_GAIN) -> torch.nn.Module:
    """The tiny SDXL UNet with seeded weights (zero layers redrawn, cross-attention sharpened) and sgm's
    ``label_emb`` for the ``y`` vector (``tiny_sdxl_adm_channels()`` wide)."""
    unet = make_unet(tiny_sdxl_unet_config(), seed, attention_gain=attention_gain)
    ch = unet.model_channels * 4
    with _seeded(seed + 7):
        unet.label_emb = torch.nn.Sequential(torch.nn.Sequential(
            torch.nn.Linear(tiny_sdxl_adm_channels(), ch), torch.nn.SiLU(), torch.nn.Linear(ch, ch)))
    unet.num_classes = "sequential"
    unet.adm_in_channels = tiny_sdxl_adm_channels()
    return unet.eval().requires_grad_(False)


def tiny_clip_g_config() -> "CLIPTextConfig":
    """Forge-style te2 (``CLIPTextModelWithProjection``): 96 wide, 2 layers, 2 heads, gelu, 64-wide projection."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=TINY_SDXL["te2"], intermediate_size=4 * TINY_SDXL["te2"],
        num_hidden_layers=TINY_SDXL["te2_layers"], num_attention_heads=TINY_SDXL["te2_heads"],
        max_position_embeddings=77, hidden_act="gelu", projection_dim=TINY_SDXL["te2_proj"],
        pad_token_id=1, bos_token_id=49406, eos_token_id=49407,
    )


def make_tiny_clip_g_hf(seed: int = 1):
    """A transformers ``CLIPTextModelWithProjection`` (SDXL's clip_g as Forge holds it), seeded, fp32, eval."""
    from transformers import CLIPTextModelWithProjection

    with _seeded(seed):
        model = CLIPTextModelWithProjection(tiny_clip_g_config())
    return model.eval().requires_grad_(False)


def make_tiny_clip_g_open_clip(seed: int = 1) -> torch.nn.Module:
    """An open_clip ``TextTransformer`` (SDXL's second encoder as A1111/sgm hold it: resblocks of
    ``nn.MultiheadAttention`` with a fused ``in_proj_weight``, not batch-first, gelu), 96 wide, 2 layers, 2 heads,
    64-wide ``text_projection``; seeded, fp32, eval.  Biases and layer norms are redrawn (open_clip starts them at
    0/1) so every parameter matters."""
    _ensure_torchvision()
    from open_clip.transformer import TextTransformer

    with _seeded(seed):
        model = TextTransformer(context_length=77, vocab_size=49408, width=TINY_SDXL["te2"],
                                heads=TINY_SDXL["te2_heads"], layers=TINY_SDXL["te2_layers"],
                                output_dim=TINY_SDXL["te2_proj"], act_layer=torch.nn.GELU)
        with torch.no_grad():
            torch.nn.init.normal_(model.text_projection, std=TINY_SDXL["te2"] ** -0.5)
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.05)
                elif "ln_" in name and name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.eval().requires_grad_(False)


def make_tiny_sdxl(te2: str = "open_clip", seed: int = 0):
    """``(unet, te1, te2)`` of the tiny SDXL; ``te2`` ``"open_clip"`` (A1111 layout) or ``"hf"`` (Forge layout)."""
    unet = make_tiny_sdxl_unet(seed)
    te1 = make_tiny_clip(seed)
    if te2 == "open_clip":
        t2 = make_tiny_clip_g_open_clip(seed + 1)
    elif te2 == "hf":
        t2 = make_tiny_clip_g_hf(seed + 1)
    else:
        raise ValueError(f"te2 must be 'open_clip' or 'hf', not {te2!r}")
    return unet, te1, t2


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run the body with torch's global RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ----- generated fixtures ---------------------------------------------------------------------------------------------
def fixtures_stamp() -> str:
    """Identity of the fixtures the current sources would generate (format, library versions, source hashes)."""
    import transformers

    digest = hashlib.sha256()
    versions = f"format={FIXTURES_FORMAT};torch={torch.__version__};transformers={transformers.__version__}"
    digest.update(versions.encode())
    for rel in _GENERATOR_SOURCES:
        path = ROOT / rel
        digest.update(f"\n{rel}:".encode())
        digest.update(path.read_bytes() if path.is_file() else b"<absent>")
    return digest.hexdigest()


def _default_fixtures_path() -> Path:
    override = os.environ.get(FIXTURES_ENV)
    return Path(override).resolve() if override else ROOT / ".fixtures"


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """An advisory inter-process lock on ``path`` (several pytest processes may share the fixtures folder)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no other process to guard against in CI
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@functools.lru_cache(maxsize=None)
def fixtures_dir() -> Path:
    """The generated fixtures folder, created or refreshed when its stamp does not match the current sources.

    Default ``<repo>/.fixtures``; the environment variable ``CLORA_FIXTURES`` overrides it.  Holds ``clip-tokenizer/``,
    ``tiny-clip/``, ``tiny-sd1.safetensors`` + ``tiny-sd1.yaml`` and ``loras/`` (see tools/make_fixtures.py).
    """
    out = _default_fixtures_path()
    stamp = fixtures_stamp()
    stamp_file = out / _STAMP_NAME
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(out / _LOCK_NAME):
        if stamp_file.is_file() and stamp_file.read_text(encoding="utf-8").strip() == stamp:
            return out
        _clear_fixtures(out)
        (out / _MARKER_NAME).write_text("generated by tools/make_fixtures.py; safe to delete\n", encoding="utf-8")
        _ensure_import_path()
        from tools.make_fixtures import main as make_fixtures

        make_fixtures(out)
        stamp_file.write_text(stamp + "\n", encoding="utf-8")
    return out


def _clear_fixtures(out: Path) -> None:
    """Empty an outdated fixtures folder (keeping its lock file); refuse a folder this module did not create."""
    entries = [entry for entry in out.iterdir() if entry.name != _LOCK_NAME]
    if entries and not (out / _MARKER_NAME).is_file():
        raise RuntimeError(
            f"The fixtures folder {out} is not empty and was not generated by tests/models.py; "
            f"point {FIXTURES_ENV} at an empty or new folder."
        )
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
