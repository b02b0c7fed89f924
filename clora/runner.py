"""Standalone CLoRA generation on an SD1.x single-file checkpoint through ``ldm`` + ``k-diffusion``.

This is how users script CLoRA without a WebUI and how the project benchmarks it::

    python -m clora generate --ckpt model.safetensors --prompt "a cat and a dog" \\
        --lora loras/cat.safetensors --lora loras/dog.safetensors \\
        --bind cat=cat:sks --bind dog=dog:sks --steps 30 --out out.png

With CLoRA off, ``plain_loras`` (``--lora-tag NAME:WEIGHT``) applies LoRAs to the whole image, as merging them into
the weights would (the "LoRAs merged, CLoRA off" baseline), through the same per-row hooks and without writing a
weight.

Errors are raised with plain-sentence messages (`RunnerError`, `LoraError`, `PromptError`, `SettingsError`); the
command line shows them through `clora.errors.user_message`.  ldm, k-diffusion and omegaconf are imported lazily here
(never by the rest of ``clora``).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .attention import AttentionCapture, map_size
from .compose import Composer, Conditioning, StepRecord, build_compose_plan
from .lora.files import check_family, load_lora
from .lora.keymap import resolve
from .lora.rows import LoraRows, RowPlan
from .lora.types import LoraError, LoraFile
from .prompts import HFPromptTokenizer, build_variants
from .settings import CloraSettings

__all__ = [
    "SAMPLERS", "LoadedModel", "SDXLModel", "load_model", "unet_family", "checkpoint_family", "generate", "GenerationResult", "RunnerError", "map_size", "ddim_timesteps",
    "sample_ddim",
]

SAMPLERS = ("euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_sde_karras", "ddim")


class RunnerError(ValueError):
    """Bad input to the standalone runner; the message is for the user."""


@dataclass
class LoadedModel:
    """An ldm ``LatentDiffusion`` (or any model with the same interface) plus what CLoRA needs to drive it.

    map_downscale: latent pixels per attention-map cell (4 for SD: H/32 maps over an H/8 latent).
    family: "sd1" for the models the runner loads.
    max_tokens: the text encoder's context length, BOS and EOS included (token positions 0 .. max_tokens - 1): 77 for
        SD's CLIP.  `generate` refuses a prompt longer than this instead of letting the encoder cut it.
    Objects that stand in for a ``LoadedModel`` (e.g. ``bench/shapes/model.py``) offer the same attributes.
    """

    model: torch.nn.Module
    family: str = "sd1"
    map_downscale: int = 4
    latent_channels: int = 4
    latent_factor: int = 8  # image pixels per latent pixel (1 for pixel-space models)
    max_tokens: int = 77

    @property
    def unet(self) -> torch.nn.Module:
        return self.model.model.diffusion_model

    @property
    def text_model(self) -> torch.nn.Module:
        return self.model.cond_stage_model.transformer

    def tokenizer(self):
        return HFPromptTokenizer(self.model.cond_stage_model.tokenizer)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.model.get_learned_conditioning(list(prompts))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.model.decode_first_stage(latent)

    def denoiser(self):
        import k_diffusion as K

        return K.external.CompVisDenoiser(self.model)

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's ε prediction at timesteps ``t`` (for DDIM)."""
        return self.model.apply_model(x, t, cond)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.model.alphas_cumprod


_CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def unet_family(unet: torch.nn.Module) -> str:
    """Model family from the UNet's cross-attention context width (768 SD1.x, 1024 SD2.x, 2048 SDXL); a UNet of
    another width that takes a pooled vector through a linear ``label_emb`` (SDXL's ``y``; the tiny test SDXL) is
    "sdxl" too, any other "unknown"."""
    for name, mod in unet.named_modules():
        if name.endswith("attn2.to_k") and isinstance(mod, torch.nn.Linear):
            family = _CONTEXT_WIDTHS.get(mod.in_features, "unknown")
            if family == "unknown" and _takes_vector(unet):
                return "sdxl"
            return family
    return "unknown"


def _takes_vector(unet: torch.nn.Module) -> bool:
    emb = getattr(unet, "label_emb", None)
    return emb is not None and any(isinstance(m, torch.nn.Linear) and m.in_features > 1 for m in emb.modules())


def checkpoint_family(state: dict) -> str:
    """Model family of a single-file checkpoint's state dict, from shapes: the width of the UNet's cross-attention
    context (``attn2.to_k.weight`` input: 768 SD1.x, 1024 SD2.x, 2048 SDXL); a checkpoint with a second text encoder
    (``conditioner.embedders.1.*``) and a ``label_emb`` is SDXL whatever its width (the tiny test SDXL)."""
    width = None
    for key, t in state.items():
        if key.startswith("model.diffusion_model.") and key.endswith("attn2.to_k.weight"):
            width = int(t.shape[1])
            break
    family = _CONTEXT_WIDTHS.get(width or -1, "unknown")
    if family == "unknown" and any(k.startswith("conditioner.embedders.1.") for k in state) and any(
            k.startswith("model.diffusion_model.label_emb.") for k in state):
        return "sdxl"
    return family


def _batch(c, n: int):
    """``(N, ...)`` encodings (a tensor or a `Conditioning`) -> ``(N, n, ...)``: each repeated for ``n`` images."""
    if isinstance(c, Conditioning):
        return Conditioning(_batch(c.crossattn, n), _batch(c.vector, n))
    return c.unsqueeze(1).expand(-1, n, *c.shape[1:]).contiguous()


def _cat(parts):
    return Conditioning.cat(parts) if isinstance(parts[0], Conditioning) else torch.cat(list(parts))


class _EpsModel(torch.nn.Module):
    """What k-diffusion's ``CompVisDenoiser`` needs of an SDXL model: ``alphas_cumprod`` and
    ``apply_model(x, t, cond)`` with ``cond`` a `Conditioning` (context + ``y``)."""

    def __init__(self, sdxl: "SDXLModel"):
        super().__init__()
        self.sdxl = sdxl
        self.register_buffer("alphas_cumprod", sdxl.alphas_cumprod, persistent=False)

    def apply_model(self, x, t, cond):
        return self.sdxl.eps(x, t, cond)


@dataclass
class SDXLModel:
    """An SDXL model from its parts, with what `generate` needs (the interface of `LoadedModel`).

    unet: an ldm-style ``UNetModel`` taking ``context`` and ``y`` (``label_emb``).
    text_model: the first text encoder, a transformers ``CLIPTextModel`` (SDXL's CLIP-L).
    text_model_2: the second, a transformers ``CLIPTextModelWithProjection`` (Forge's clip_g) or an open_clip
        ``TextTransformer`` (A1111/sgm).  LoRAs reach the first and an HF second encoder through per-row hooks, an
        open_clip one through ``functional_call`` (`clora.sdxl.open_clip_encode`).
    tokenizer_obj: transformers' CLIP tokenizer (both encoders take the same ids here; padded to ``max_tokens``).
    vae: decodes ``latent / scale_factor`` (an ldm ``AutoencoderKL``); None: images are the latent's first three
        channels (for tests that do not look at pixels).
    layer: hidden layer of both encoders used as context (-2: the penultimate, as SDXL).
    size_dim: Fourier features per size scalar in ``y`` (256 for SDXL).
    context_arg: turns the context tensor into what the UNet's ``context`` argument takes (the installed ldm's
        depth > 1 transformers want one entry per block; None: the tensor itself).

    ``y`` = te2 pooled ⊕ Fourier(original h, w) ⊕ Fourier(crop top, left) ⊕ Fourier(target h, w) with original =
    target = the image size and crop (0, 0), as the WebUIs call SDXL for txt2img.
    """

    unet: torch.nn.Module
    text_model: torch.nn.Module
    text_model_2: torch.nn.Module
    tokenizer_obj: object
    vae: Optional[torch.nn.Module] = None
    scale_factor: float = 0.13025
    layer: int = -2
    size_dim: int = 256
    context_arg: Optional[Callable[[torch.Tensor], object]] = None
    family: str = "sdxl"
    map_downscale: int = 4
    latent_channels: int = 4
    latent_factor: int = 8
    max_tokens: int = 77

    def __post_init__(self) -> None:
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SDXL's scaled-linear
        self._alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(torch.float32)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    def tokenizer(self):
        return HFPromptTokenizer(self.tokenizer_obj)

    def token_ids(self, texts: Sequence[str]) -> torch.Tensor:
        out = self.tokenizer_obj(list(texts), padding="max_length", max_length=self.max_tokens, truncation=True,
                                 return_tensors="pt")
        return out["input_ids"]

    def encode(self, texts: Sequence[str], size: Sequence[int] = (1024, 1024), row_loras=None,
               param_targets: Sequence = ()) -> Conditioning:
        """Context ``(N, T, D1 + D2)`` and ``y`` ``(N, P + 6·size_dim)`` for ``texts``; ``size`` = (height, width)
        of the image.  ``row_loras[r]`` / ``param_targets``: the LoRAs of row ``r`` on an open_clip second encoder
        (the hooked encoders get theirs from the caller's `LoraRows`)."""
        from .sdxl import hf_clip_encode, open_clip_encode, size_vector
        from .lora.keymap import is_open_clip_text

        dev = next(self.text_model.parameters()).device
        ids = self.token_ids(texts).to(dev)
        h1, _ = hf_clip_encode(self.text_model, ids, self.layer)
        if is_open_clip_text(self.text_model_2):
            if self.layer != -2:
                raise RunnerError("An open_clip second text encoder gives its penultimate layer only (layer -2).")
            h2, pooled = open_clip_encode(self.text_model_2, ids, param_targets, row_loras)
        else:
            h2, pooled = hf_clip_encode(self.text_model_2, ids, self.layer)
        h, w = int(size[0]), int(size[1])
        sizes = size_vector(ids.shape[0], (h, w), (0, 0), (h, w), self.size_dim, device=pooled.device,
                            dtype=pooled.dtype)
        return Conditioning(torch.cat([h1, h2.to(h1.dtype)], dim=-1), torch.cat([pooled, sizes], dim=-1))

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        ctx = cond.crossattn if self.context_arg is None else self.context_arg(cond.crossattn)
        return self.unet(x, t, context=ctx, y=cond.vector)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latent[:, :3].clamp(-1, 1)
        return self.vae.decode(latent / self.scale_factor)

    def denoiser(self):
        import k_diffusion as K

        return K.external.CompVisDenoiser(_EpsModel(self))


def load_model(checkpoint: str | Path, config: str | Path | None = None, device: str = "cpu") -> LoadedModel:
    """Load an SD1.x single-file checkpoint (``.safetensors``) with its yaml (``<stem>.yaml`` beside it by default)."""
    from ._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from ldm.util import instantiate_from_config

    checkpoint = Path(checkpoint)
    if checkpoint.suffix != ".safetensors":
        raise RunnerError(f"Checkpoint {checkpoint.name}: only .safetensors checkpoints are loaded (no pickle files).")
    if not checkpoint.is_file():
        raise RunnerError(f"Checkpoint {checkpoint} does not exist.")
    if config is None:
        config = checkpoint.with_suffix(".yaml")
        if not config.exists():
            config = Path(__file__).parent / "configs" / "v1-inference.yaml"
    state = load_file(str(checkpoint))
    if checkpoint_family(state) == "sdxl":
        raise RunnerError(
            f"Checkpoint {checkpoint.name} is an SDXL model; load_model reads SD 1.x single-file checkpoints. For SDXL, "
            "build a clora.runner.SDXLModel from its modules (UNet, both text encoders, VAE)."
        )
    cfg = OmegaConf.load(str(config))
    model = instantiate_from_config(cfg.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise RunnerError(
            f"Checkpoint {checkpoint.name}: {len(missing)} model weights are missing from it (e.g. {missing[:3]})."
        )
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    family = unet_family(model.model.diffusion_model)
    if family not in ("sd1", "unknown"):
        raise RunnerError(
            f"Checkpoint {checkpoint.name}: the standalone runner supports SD 1.x models; this one looks like {family}."
        )
    return LoadedModel(model=model, family=family)


@dataclass
class GenerationResult:
    images: list  # PIL images
    latent: torch.Tensor
    settings: CloraSettings
    history: list[StepRecord] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    masks: Optional[torch.Tensor] = None  # (B, V, 1, h, w) last step's masks
    step_ious: list = field(default_factory=list)  # (step, mean pairwise IoU of the concept masks) per model call
    maps: Optional[torch.Tensor] = None  # (B, V, h, w, T) mean cond-row maps over steps
    seconds: float = 0.0
    plain_loras: list = field(default_factory=list)  # (name, weight) of the LoRAs applied to every row (CLoRA off)
    trajectory: list = field(default_factory=list)  # the sampler's latent at each step (after CLoRA's update there)
    notes: list = field(default_factory=list)  # what of each LoRA is not applied (also logged as a warning)

    def report(self) -> dict:
        return {
            "prompts": self.prompts,
            "notes": self.notes,
            "settings": self.settings.to_json(),
            "plain_loras": [[name, weight] for name, weight in self.plain_loras],
            "seconds": round(self.seconds, 3),
            "steps": [
                {"step": r.step, "sigma": r.sigma, "loss_before": r.loss_before, "loss_after": r.loss_after,
                 "losses": list(r.losses),
                 "iterations": r.iterations}
                for r in self.history
            ],
        }


def ddim_timesteps(steps: int, train_steps: int = 1000, offset: int = 1) -> list[int]:
    """DDIM's timesteps, high to low: ``{0, r, 2r, ...} + offset`` with ``r = train_steps // steps`` (the "leading"
    spacing with ``steps_offset = 1`` of SD's scheduler configuration; A1111's DDIM uses the same grid)."""
    if not 1 <= steps <= train_steps:
        raise RunnerError(f"DDIM needs between 1 and {train_steps} steps, got {steps}.")
    r = train_steps // steps
    return [i * r + offset for i in range(steps)][::-1]


def sample_ddim(eps_fn: Callable, x: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int, disable: bool = True,
                callback: Optional[Callable[[dict], None]] = None) -> torch.Tensor:
    """Deterministic DDIM (η = 0) in the latent's own space (z_t, unit variance at the start).

    ``eps_fn(x, t)`` returns the guided ε at timestep ``t`` (a (B,) long tensor) and may update ``x`` in place before
    predicting (the latent update); the step is taken from that (updated) ``x``:
    ``x_prev = √ᾱ_prev · (x − √(1−ᾱ_t) ε) / √ᾱ_t + √(1−ᾱ_prev) · ε``, with ᾱ_prev = ᾱ_0 past the last step
    (SD's ``set_alpha_to_one = False``)."""
    ts = ddim_timesteps(steps, train_steps=len(alphas_cumprod))
    r = len(alphas_cumprod) // steps
    ac = alphas_cumprod.to(torch.float64)
    for i, t in enumerate(ts):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps = eps_fn(x, tt)
        a_t = float(ac[t])
        a_prev = float(ac[t - r]) if t - r >= 0 else float(ac[0])
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        if callback is not None:  # as k-diffusion's samplers: the latent of this step (after any update), and x0
            callback({"i": i, "x": x, "denoised": x0})
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        if not disable:
            print(f"ddim {i + 1}/{steps}", end="\r")
    return x


class _SkipCat:
    """Stands in for the ``torch`` module inside ldm's UNet: its ``cat`` of an up-path tensor with a skip connection
    resizes the up-path tensor (nearest) to the skip's size first.  For latents whose sides are not multiples of the
    UNet's total downscale (8 for SD: images in steps of 8 px but not of 64), the up-sampled tensor is one pixel
    larger than the skip it joins; the WebUI resizes it the same way."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def cat(self, tensors, *args, **kwargs):
        if len(tensors) == 2 and tensors[0].dim() == 4 and tensors[0].shape[-2:] != tensors[1].shape[-2:]:
            tensors = (torch.nn.functional.interpolate(tensors[0], tensors[1].shape[-2:], mode="nearest"), tensors[1])
        return self._module.cat(tensors, *args, **kwargs)


@contextlib.contextmanager
def _any_latent_size(unet: torch.nn.Module, latent_hw: Sequence[int]):
    """ldm's UNet module sees `_SkipCat` for ``torch`` inside the block when the latent needs it; restored on exit."""
    mod = sys.modules.get(type(unet).__module__)
    levels = sum(1 for m in unet.modules() if type(m).__name__ == "Downsample")
    need = any(int(n) % (2**levels) for n in latent_hw)
    if not need or mod is None or not hasattr(mod, "th"):
        yield
        return
    saved = mod.th
    mod.th = _SkipCat(saved)
    try:
        yield
    finally:
        mod.th = saved


def _sigmas(denoiser, sampler: str, steps: int) -> torch.Tensor:
    import k_diffusion as K

    if sampler.endswith("_karras"):
        return K.sampling.get_sigmas_karras(steps, float(denoiser.sigma_min), float(denoiser.sigma_max), device="cpu")
    return denoiser.get_sigmas(steps)


def _sample_fn(sampler: str) -> Callable:
    import k_diffusion as K

    table = {
        "euler": K.sampling.sample_euler,
        "euler_a": K.sampling.sample_euler_ancestral,
        "heun": K.sampling.sample_heun,
        "dpmpp_2m": K.sampling.sample_dpmpp_2m,
        "dpmpp_2m_karras": K.sampling.sample_dpmpp_2m,
        "dpmpp_sde_karras": K.sampling.sample_dpmpp_sde,
    }
    if sampler == "ddim":
        return sample_ddim
    if sampler not in table:
        raise RunnerError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    return table[sampler]


class _StepIndex:
    """Maps the sigma a sampler passes to its step index; intermediate (second-order) sigmas keep the last index."""

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = sigmas
        self.last = 0

    def __call__(self, sigma: torch.Tensor) -> int:
        s = float(sigma.flatten()[0])
        hits = torch.nonzero(torch.isclose(self.sigmas[:-1], torch.tensor(s, dtype=self.sigmas.dtype), rtol=1e-6, atol=0))
        if len(hits):
            self.last = int(hits[0])
        return self.last


def _resolve_loras(lm: LoadedModel, loras: Sequence[str | Path | LoraFile]) -> dict[str, LoraFile]:
    """LoRAs by name: files are loaded (named by their stem), `LoraFile` objects are taken as they are (by their
    ``name``); each is checked against the model's family."""
    by_name: dict[str, LoraFile] = {}
    for item in loras:
        if isinstance(item, LoraFile):
            lora = item
        else:
            path = Path(item)
            if not path.exists():
                raise LoraError(f"LoRA file {path} does not exist.")
            lora = load_lora(path)
        check_family(lora, lm.family)
        by_name[lora.name] = lora
    return by_name


def _pick(by_name: dict[str, LoraFile], names: Sequence[str]) -> list[LoraFile]:
    """The LoRAs of ``names`` in that order; an unknown name is a `LoraError` listing the names given."""
    for n in names:
        if n not in by_name:
            raise LoraError(f"LoRA '{n}' not found (given: {', '.join(sorted(by_name)) or 'none'}).")
    return [by_name[n] for n in names]


def _targets(lm: LoadedModel, ordered: Sequence[LoraFile], param_targets: Optional[list] = None):
    """LoRA targets split by component: (unet targets, text targets) as (module, lora_index, LoraModule), and the
    notes of what is not applied (`resolve` logs each as a warning too).  Text targets include an SDXL model's second
    encoder when it takes hooks; the `ParamTarget`s of an open_clip second encoder are appended to ``param_targets``
    (with their LoRA's index)."""
    import dataclasses

    unet_t, text_t, notes = [], [], []
    te2 = getattr(lm, "text_model_2", None)
    for idx, lora in enumerate(ordered):
        res = resolve(lora, unet=lm.unet, text_model=lm.text_model, text_model_2=te2)
        for component, _path, module, lmod in res.targets:
            (unet_t if component == "unet" else text_t).append((module, idx, lmod))
        if param_targets is not None:
            param_targets.extend(dataclasses.replace(t, lora_index=idx) for t in res.param_targets)
        elif res.param_targets:
            raise RunnerError("internal: open_clip LoRA targets without a place to go")
        if res.note is not None:
            notes.append(res.note)
    return unet_t, text_t, notes


def _encode(lm, texts: Sequence[str], size: Sequence[int], row_loras=None, param_targets: Sequence = ()):
    """``lm.encode(texts)``; an SDXL model also gets the image size (for ``y``) and the per-row LoRAs of an open_clip
    second encoder."""
    if isinstance(lm, SDXLModel):
        return lm.encode(texts, size=size, row_loras=row_loras, param_targets=param_targets)
    return lm.encode(texts)


def _check_length(lm: LoadedModel, what: str, chunks: Sequence[Sequence[int]]) -> None:
    """Refuse a prompt (given as the tokenizer's chunks) that the text encoder cannot read whole: the runner encodes
    one sequence of at most ``lm.max_tokens`` positions (BOS and EOS included) and would otherwise see it cut."""
    limit = int(lm.max_tokens)
    n = sum(len(c) for c in chunks) + 2
    if n > limit:
        raise RunnerError(
            f"{what} is {n} tokens; this model's text encoder takes at most {limit} (BOS and EOS included; the "
            "standalone runner encodes one chunk and does not cut prompts). Shorten it."
        )
    if len(chunks) > 1:
        raise RunnerError(
            f"{what} has a BREAK; the standalone runner encodes one chunk of at most {limit} tokens. Remove the BREAK."
        )


def _rows_on_every_row(targets, every: list[tuple[int, float]], n_rows: int):
    """A `LoraRows` context applying ``every`` to all ``n_rows`` rows; no hooks at all when there is nothing to apply."""
    if not targets or not every:
        return contextlib.nullcontext()
    rows = LoraRows(targets)
    rows.plan = RowPlan.from_lists([every] * n_rows)
    return rows


def _plain_weights(plain_loras: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    out = []
    for item in plain_loras:
        try:
            name, weight = item
            weight = float(weight)
        except (TypeError, ValueError):
            raise RunnerError(f"Each plain LoRA must be a (LoRA name, weight) pair; got {item!r}.") from None
        if not math.isfinite(weight):
            raise RunnerError(f"The weight of LoRA '{name}' must be a finite number, got {weight}.")
        out.append((str(name), weight))
    return out


def generate(
    lm: LoadedModel,
    prompt: str,
    settings: CloraSettings,
    loras: Sequence[str | Path | LoraFile] = (),
    negative: str = "",
    sampler: str = "euler",
    steps: int = 20,
    cfg_scale: float = 7.0,
    seed: int = 0,
    width: int = 512,
    height: int = 512,
    batch_size: int = 1,
    progress: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
    batched: Optional[bool] = None,
    plain_loras: Sequence[tuple[str, float]] = (),
) -> GenerationResult:
    """Generate with CLoRA, or plainly when ``settings.enabled`` is False (then exactly plain k-diffusion sampling).

    loras: the LoRAs that bindings, styles and ``plain_loras`` may name: ``.safetensors`` paths (named by their file
        stem) or loaded `LoraFile` objects (named by their ``name``).
    plain_loras: ``(LoRA name, weight)`` pairs applied, with CLoRA off, to every row of the UNet and of the text
        encoder (cond and uncond): what merging ``W + weight * ΔW`` into the weights computes, without writing them.
        Refused while CLoRA is active (use style LoRAs, ``settings.styles``, for whole-image LoRAs with CLoRA).
    """
    t0 = time.perf_counter()
    settings.validate()
    active = settings.enabled and len(settings.bindings) > 0
    plain = _plain_weights(plain_loras)
    if active and plain:
        raise RunnerError(
            "Plain LoRAs (--lora-tag) apply only with CLoRA off; with CLoRA, give whole-image LoRAs as style LoRAs "
            "(settings.styles, --style NAME:WEIGHT)."
        )
    sample = _sample_fn(sampler)
    ddim = sampler == "ddim"
    f = lm.latent_factor
    if width % f or height % f or width <= 0 or height <= 0:
        raise RunnerError(f"Width and height must be positive multiples of {f}; got {width}x{height}.")
    tokenizer = lm.tokenizer()
    _check_length(lm, "The negative prompt", tokenizer.chunks(negative))
    if not active:
        _check_length(lm, "The prompt", tokenizer.chunks(prompt))
    ordered = _pick(_resolve_loras(lm, loras), [n for n, _ in plain]) if plain else []

    shape = (batch_size, lm.latent_channels, height // f, width // f)
    gen = torch.Generator().manual_seed(seed)
    trajectory: list[torch.Tensor] = []

    def record(info: dict) -> None:
        trajectory.append(info["x"].detach().clone())

    dev = next(lm.unet.parameters()).device
    # latents in float32 (float64 for a float64 model), whatever precision the UNet computes in
    dtype = torch.float64 if next(lm.unet.parameters()).dtype == torch.float64 else torch.float32
    if ddim:
        # DDIM samples z_t itself: unit variance at the start, ε-space latent updates, timesteps as "sigma"
        x = torch.randn(shape, generator=gen).to(dev, dtype)
        timesteps = ddim_timesteps(steps, train_steps=len(lm.alphas_cumprod))
        step_of = {t: i for i, t in enumerate(timesteps)}
        index = lambda t_: step_of[int(t_.flatten()[0])]  # noqa: E731

        def raw_model(x_rows, t_rows, cond_rows):
            return lm.eps(x_rows, t_rows, cond_rows)

        def run_sampler(guided):
            return sample(guided, x, lm.alphas_cumprod, steps, disable=not progress, callback=record)
    else:
        denoiser = lm.denoiser()
        sigmas = _sigmas(denoiser, sampler, steps)
        x = (torch.randn(shape, generator=gen) * sigmas[0]).to(dev, dtype)
        index = _StepIndex(sigmas)

        def raw_model(x_rows, sigma_rows, cond_rows):
            return denoiser(x_rows, sigma_rows, cond=cond_rows)

        def run_sampler(guided):
            return sample(guided, x, sigmas, disable=not progress, callback=record)

    if not active:
        # Plain LoRAs act on every row: the text encoder's (cond and uncond prompts) and the UNet's.
        every = [(i, w) for i, (_n, w) in enumerate(plain)]
        ptargets: list = []
        unet_targets, text_targets, notes = _targets(lm, ordered, ptargets)
        with _rows_on_every_row(text_targets, every, batch_size), torch.no_grad():
            uncond = _encode(lm, [negative] * batch_size, (height, width), [every] * batch_size, ptargets)
            cond = _encode(lm, [prompt] * batch_size, (height, width), [every] * batch_size, ptargets)

        def cfg_denoise(x_, sigma_, **_):
            out = raw_model(torch.cat([x_] * 2), torch.cat([sigma_] * 2), _cat([uncond, cond]))
            u, c = out.chunk(2)
            return u + (c - u) * cfg_scale

        torch.manual_seed(seed)
        with _rows_on_every_row(unet_targets, every, 2 * batch_size), _any_latent_size(lm.unet, shape[-2:]), torch.no_grad():
            latent = run_sampler(cfg_denoise)
        images = _to_images(lm, latent)
        return GenerationResult(images=images, latent=latent, settings=settings, prompts=[prompt],
                                seconds=time.perf_counter() - t0, plain_loras=plain, trajectory=trajectory,
                                notes=notes)

    # --- CLoRA ---------------------------------------------------------------------------------------
    names = [b.lora for b in settings.bindings] + [s.lora for s in settings.styles]
    ordered = _pick(_resolve_loras(lm, loras), names)
    variants = build_variants(prompt, settings.bindings, tokenizer)
    for v, chunks in enumerate(variants.chunks):
        what = "The prompt" if v == 0 else f"The prompt with the trigger words of LoRA '{settings.bindings[v - 1].lora}'"
        _check_length(lm, what, chunks)
    plan = build_compose_plan(variants.groups, variants.mask_tokens, settings)
    ptargets: list = []
    unet_targets, text_targets, notes = _targets(lm, ordered, ptargets)

    # Each variant's prompt (and, with negative_te_lora, its negative prompt) is encoded with that variant's own
    # LoRAs' text-encoder parts, all in one call; without them the negative prompt is encoded once and shared.
    V = plan.n_variants
    cond_te, uncond_te = plan.text_encoder_loras(settings)
    per_variant_negative = any(uncond_te)
    texts = list(variants.prompts) + ([negative] * V if per_variant_negative else [])
    te_rows = cond_te + (uncond_te if per_variant_negative else [])
    with LoraRows(text_targets) as te, torch.no_grad():
        te.plan = RowPlan.from_lists(te_rows)
        enc = _encode(lm, texts, (height, width), te_rows, ptargets)  # (V or 2V, T, D) [+ vectors (V or 2V, Dy)]
    if per_variant_negative:
        unconds = _batch(enc[V:], batch_size)
    else:
        with torch.no_grad():
            unconds = _encode(lm, [negative] * batch_size, (height, width))
    conds = _batch(enc[:V], batch_size)

    # The Composer enters the LoRA row hooks and the attention capture around each of its own model calls.
    composer = Composer(
        settings=settings, plan=plan, rows=LoraRows(unet_targets), capture=AttentionCapture(lm.unet), unet=lm.unet,
        map_size=map_size(shape[-2:], lm.map_downscale), total_steps=steps, space="eps" if ddim else "k",
        should_stop=should_stop, batched=batched,
    )

    def clora_denoise(x_, sigma_, **_):
        u, c = composer(x_, sigma_, unconds, conds, raw_model, index(sigma_))
        return u + (c - u) * cfg_scale

    torch.manual_seed(seed)
    with _any_latent_size(lm.unet, shape[-2:]), torch.no_grad():
        latent = run_sampler(clora_denoise)
    images = _to_images(lm, latent)
    return GenerationResult(
        images=images, latent=latent, settings=settings, history=list(composer.history), prompts=variants.prompts,
        masks=composer.last_masks, maps=composer.mean_maps, step_ious=list(composer.step_ious), seconds=time.perf_counter() - t0,
        trajectory=trajectory, notes=notes,
    )


def _to_images(lm: LoadedModel, latent: torch.Tensor) -> list:
    from PIL import Image

    with torch.no_grad():
        img = lm.decode(latent)
    img = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in img]
