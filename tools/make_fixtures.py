"""Generate the random-weight test fixtures (deterministic, a few seconds on one CPU thread).

``python tools/make_fixtures.py OUT_DIR`` (or ``main(out_dir)``) writes:

* ``clip-tokenizer/``: openai/clip-vit-large-patch14's tokenizer files, derived offline (tools/clip_vocab.py);
* ``tiny-clip/``: a transformers folder (config.json, model.safetensors, tokenizer files) holding
  ``tests.models.make_tiny_clip(seed)``; usable as ``FrozenCLIPEmbedder(version=<folder>)`` offline;
* ``tiny-sd1.yaml`` + ``tiny-sd1.safetensors``: a tiny SD1-style single-file ldm ``LatentDiffusion`` checkpoint (fp32,
  every parameter and buffer stored: ``model.diffusion_model.*``, ``first_stage_model.*``,
  ``cond_stage_model.transformer.text_model.*`` and the noise-schedule buffers).  Its UNet is
  ``tests.models.make_tiny_unet(seed)``, its text encoder the tiny CLIP, its VAE an f=8 ``AutoencoderKL`` with 32 base
  channels.  The yaml points at the tiny-clip folder by absolute path;
* ``loras/``: LoRA files in every layout, shaped for the checkpoint's UNet and text encoder (tools/lora_writer.py),
  when that module exists.

Most tests do not call this directly: ``tests.models.fixtures_dir()`` generates the fixtures on demand.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tools.clip_vocab import write_tokenizer_files  # noqa: E402

__all__ = [
    "TOKENIZER_DIR",
    "TINY_CLIP_DIR",
    "TINY_SD1_CKPT",
    "TINY_SD1_YAML",
    "LORAS_DIR",
    "tiny_vae_ddconfig",
    "tiny_sd1_config",
    "write_tiny_clip",
    "write_tiny_sd1",
    "load_tiny_sd1",
    "main",
]

TOKENIZER_DIR = "clip-tokenizer"
TINY_CLIP_DIR = "tiny-clip"
TINY_SD1_CKPT = "tiny-sd1.safetensors"
TINY_SD1_YAML = "tiny-sd1.yaml"
LORAS_DIR = "loras"
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def tiny_vae_ddconfig() -> dict[str, Any]:
    """``ddconfig`` of a tiny SD1-shaped ``AutoencoderKL``: f=8 (three down-samplings), 4 latent channels."""
    return {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 2, 2, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    }


def tiny_sd1_config(clip_dir: Path | str) -> dict[str, Any]:
    """The tiny checkpoint's config as a plain dict, shaped like the WebUI's v1-inference.yaml."""
    from tests.models import tiny_unet_config

    return {
        "model": {
            "base_learning_rate": 1.0e-04,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": 0.00085,
                "linear_end": 0.0120,
                "num_timesteps_cond": 1,
                "log_every_t": 200,
                "timesteps": 1000,
                "first_stage_key": "jpg",
                "cond_stage_key": "txt",
                "image_size": 32,
                "channels": 4,
                "cond_stage_trainable": False,
                "conditioning_key": "crossattn",
                "monitor": "val/loss_simple_ema",
                "scale_factor": 0.18215,
                "use_ema": False,
                "unet_config": {
                    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": tiny_unet_config(),
                },
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {
                        "embed_dim": 4,
                        "monitor": "val/rec_loss",
                        "ddconfig": tiny_vae_ddconfig(),
                        "lossconfig": {"target": "torch.nn.Identity"},
                    },
                },
                "cond_stage_config": {
                    "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                    "params": {"version": str(Path(clip_dir).resolve()), "device": "cpu"},
                },
            },
        }
    }


def write_tiny_clip(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Save ``make_tiny_clip(seed)`` and the tokenizer files as a transformers folder; return it."""
    from tests.models import make_tiny_clip

    model = make_tiny_clip(seed)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    for name in _TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out_dir / name)
    return out_dir


def load_tiny_sd1(yaml_path: Path | str, ckpt_path: Optional[Path | str] = None) -> torch.nn.Module:
    """Instantiate the ``LatentDiffusion`` of ``yaml_path`` and, when given, load ``ckpt_path`` strictly; eval mode."""
    from omegaconf import OmegaConf

    from tests.models import _ensure_torchvision

    _ensure_torchvision()
    from ldm.util import instantiate_from_config

    config = OmegaConf.load(str(yaml_path))
    model = instantiate_from_config(config.model)
    if ckpt_path is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(ckpt_path)), strict=True)
    return model.eval().requires_grad_(False)


def write_tiny_sd1(out_dir: Path, clip_dir: Path, seed: int = 0) -> tuple[Path, Path, torch.nn.Module]:
    """Write tiny-sd1.yaml and tiny-sd1.safetensors; return their paths and the model that was saved."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from tests.models import make_tiny_unet, redraw_zero_layers

    yaml_path = out_dir / TINY_SD1_YAML
    yaml_path.write_text(OmegaConf.to_yaml(OmegaConf.create(tiny_sd1_config(clip_dir))), encoding="utf-8")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_tiny_sd1(yaml_path)
    redraw_zero_layers(model.first_stage_model, torch.Generator().manual_seed(seed + 2))
    model.model.diffusion_model.load_state_dict(make_tiny_unet(seed).state_dict(), strict=True)
    state = {name: tensor.detach().to("cpu").clone().contiguous() for name, tensor in model.state_dict().items()}
    ckpt_path = out_dir / TINY_SD1_CKPT
    save_file(state, str(ckpt_path), metadata={"format": "pt", "clora_fixture": f"tiny-sd1 seed={seed}"})
    return yaml_path, ckpt_path, model


def _write_loras(out_dir: Path, unet: torch.nn.Module, text_model: torch.nn.Module, seed: int) -> dict[str, Path]:
    """LoRA files in every layout (tools/lora_writer.py) shaped for the tiny checkpoint."""
    from tools.lora_writer import write_all

    return dict(write_all(out_dir, unet, text_model, seed=seed))


def main(out_dir: Path | str, seed: int = 0) -> dict[str, Path]:
    """Write every fixture into ``out_dir`` (created if needed); return name -> path of what was written."""
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = write_tokenizer_files(out / TOKENIZER_DIR)
    clip_dir = write_tiny_clip(out / TINY_CLIP_DIR, tokenizer_dir, seed)
    yaml_path, ckpt_path, model = write_tiny_sd1(out, clip_dir, seed)
    written = {TOKENIZER_DIR: tokenizer_dir, TINY_CLIP_DIR: clip_dir, "tiny-sd1.yaml": yaml_path, "tiny-sd1": ckpt_path}
    loras = _write_loras(out / LORAS_DIR, model.model.diffusion_model, model.cond_stage_model.transformer, seed)
    written.update({f"loras/{name}": path for name, path in loras.items()})
    return written


def _cli(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the fixtures into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in main(args.out_dir, seed=args.seed).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_cli())
