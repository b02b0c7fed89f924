"""The shapes base model (pixel-space ldm UNet + a small CLIP text encoder) as an object `clora.runner.generate` drives.

`ShapesModel` offers what the runner reads of its ``LoadedModel``: ``unet``, ``text_model``, ``tokenizer()``,
``encode``, ``decode``, ``denoiser()``, ``latent_channels``, ``latent_factor``, ``map_downscale`` and ``family``.
The UNet sees the 32x32 RGB image itself (``latent_factor`` 1, 3 channels); its cross-attention runs at 16x16 and
8x8, so ``map_downscale`` 2 captures the 16x16 maps and 4 the 8x8 maps (`set_capture`).

The architecture and schedule are those of ``shared/data/README.md``; `build_unet` / `build_text_model` make them
with random weights (for training from scratch), `load` reads ``shapes-base-v1.safetensors`` (keys ``unet.`` and
``text_encoder.``; the ``position_ids`` buffer is not stored).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "BASE_PATH",
    "TOKENS",
    "UNET_CONFIG",
    "TEXT_CONFIG",
    "alphas_cumprod",
    "build_unet",
    "build_text_model",
    "clip_tokenizer",
    "ShapesModel",
    "load",
]

ROOT = Path(__file__).resolve().parents[2]
BASE_PATH = ROOT.parent / "shared" / "data" / "shapes-base-v1.safetensors"
TOKENS = 16  # the text encoder's context length (BOS + 14 + EOS/padding)
TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012

UNET_CONFIG: dict[str, Any] = dict(
    image_size=32, in_channels=3, out_channels=3, model_channels=32, num_res_blocks=1, attention_resolutions=[2, 4],
    channel_mult=[1, 2, 2], num_heads=4, use_spatial_transformer=True, transformer_depth=1, context_dim=64,
    use_checkpoint=False, legacy=False,
)
TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=TOKENS,
)


def base_path() -> Path:
    """The base model file: ``$CLORA_SHAPES_BASE`` or ``shared/data/shapes-base-v1.safetensors`` beside the repo."""
    return Path(os.environ.get("CLORA_SHAPES_BASE", str(BASE_PATH)))


def alphas_cumprod() -> torch.Tensor:
    """ᾱ_t of Stable Diffusion's "scaled linear" schedule: β_t = linspace(√0.00085, √0.012, 1000)²."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def _compat() -> None:
    import sys

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from clora._compat import ensure_torchvision_importable

    ensure_torchvision_importable()


def build_unet() -> nn.Module:
    """The base UNet with fresh random weights (ldm's own initialisation)."""
    _compat()
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**UNET_CONFIG)


def build_text_model() -> nn.Module:
    """The base text encoder with fresh random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


def _tokenizer_dir() -> Path:
    """A folder with the CLIP tokenizer files, written once (from the BPE list a PyPI package ships) and reused."""
    cache = Path(os.environ.get("CLORA_SHAPES_CACHE", Path(tempfile.gettempdir()) / "clora-shapes-cache"))
    folder = cache / "clip-tokenizer"
    if not (folder / "vocab.json").is_file():
        _compat()
        from tools.clip_vocab import write_tokenizer_files

        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=str(cache)))
        write_tokenizer_files(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process wrote it first
            pass
    return folder


def clip_tokenizer():
    """transformers' ``CLIPTokenizer`` of openai/clip-vit-large-patch14 (offline)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(_tokenizer_dir()))


class _EpsModel(nn.Module):
    """``model(x, t, cond=c)`` → the UNet's ε prediction: the interface k-diffusion's ``DiscreteEpsDDPMDenoiser``
    calls."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, context=cond)


def token_ids(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """(N, 16) ids: BOS, the prompt's ids, EOS, padded with EOS (truncated to 16)."""
    out = tokenizer(list(prompts), padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt")
    return out["input_ids"]


@dataclass
class ShapesModel:
    """The base model as the standalone runner's ``LoadedModel`` (see the module docstring)."""

    unet: nn.Module
    text_model: nn.Module
    hf_tokenizer: Any
    map_downscale: int = 4
    family: str = "unknown"
    latent_channels: int = 3
    latent_factor: int = 1
    _alphas: torch.Tensor = field(default_factory=alphas_cumprod)

    @property
    def max_tokens(self) -> int:
        """The text encoder's context length, BOS and EOS included (the runner's ``LoadedModel.max_tokens``)."""
        return TOKENS

    def set_capture(self, map_size: int) -> "ShapesModel":
        """Capture the 16x16 (``map_size=16``) or 8x8 (``8``) cross-attention maps; returns ``self``."""
        if map_size not in (8, 16):
            raise ValueError(f"The shapes model has cross-attention maps of 16x16 and 8x8, not {map_size}x{map_size}.")
        self.map_downscale = 32 // map_size
        return self

    def tokenizer(self):
        from clora.prompts import HFPromptTokenizer

        return HFPromptTokenizer(self.hf_tokenizer)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, 16, 64) conditioning; a prompt that does not fit the 16-token context is refused, not truncated
        (the runner's own length check assumes SD's 77 tokens)."""
        lengths = self.hf_tokenizer(list(prompts), add_special_tokens=True, truncation=False)["input_ids"]
        for p, ids in zip(prompts, lengths):
            if len(ids) > TOKENS:
                raise ValueError(f"The prompt {p!r} has {len(ids)} tokens with BOS/EOS; the shapes model reads {TOKENS} tokens.")
        ids = token_ids(self.hf_tokenizer, prompts).to(next(self.text_model.parameters()).device)
        return self.text_model(input_ids=ids).last_hidden_state

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return latent  # pixel space: the sample is the image in [-1, 1]

    def denoiser(self):
        import k_diffusion as K

        return K.external.DiscreteEpsDDPMDenoiser(_EpsModel(self.unet), self._alphas, quantize=True)


def load_state(unet: nn.Module, text_model: nn.Module, path: Path) -> None:
    """Load ``unet.`` / ``text_encoder.`` weights from a base-model file into the two modules (as float32)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    u = {k[len("unet.") :]: v.float() for k, v in state.items() if k.startswith("unet.")}
    t = {k[len("text_encoder.") :]: v.float() for k, v in state.items() if k.startswith("text_encoder.")}
    missing, unexpected = unet.load_state_dict(u, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path.name}: UNet weights do not match ({len(missing)} missing, {len(unexpected)} unexpected).")
    missing, unexpected = text_model.load_state_dict(t, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"{path.name}: text-encoder weights do not match ({len(missing)} missing, {len(unexpected)} unexpected)."
        )


def load(path: Optional[Path | str] = None, map_size: int = 8) -> ShapesModel:
    """The base model from ``path`` (default `base_path`), frozen, in eval mode, capturing ``map_size`` maps."""
    path = Path(path) if path is not None else base_path()
    if not path.is_file():
        raise FileNotFoundError(f"The shapes base model {path} does not exist (see bench/shapes/README.md).")
    unet, text_model = build_unet(), build_text_model()
    load_state(unet, text_model, path)
    for m in (unet, text_model):
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    return ShapesModel(unet=unet, text_model=text_model, hf_tokenizer=clip_tokenizer()).set_capture(map_size)


def to_uint8(images: torch.Tensor) -> "Any":
    """(B, 3, H, W) in [-1, 1] -> numpy uint8 (B, H, W, 3), rounded as the runner rounds."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
