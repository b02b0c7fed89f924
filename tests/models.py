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
