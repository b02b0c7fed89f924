"""Training for the shapes benchmark: kohya-format concept LoRAs on the base model, and the base model itself.

Concept LoRAs (CPU, minutes)::

    OMP_NUM_THREADS=1 python -m bench.shapes.train loras [--out bench/shapes/loras] [--steps 500]

writes ``<concept>.safetensors`` for every concept of `world.CONCEPTS` (48 base-world images, one object or two,
one of them patterned, the trigger before it in the caption: ``"a blue square and a zyk red circle"``; LoCon rank 4,
lr 1.5e-3, 500 steps of 8, about 190 CPU s each) and ``oracle.safetensors`` (trained on two-concept images
captioned with both triggers: the ceiling composition can reach when a LoRA has *seen* the pair).  Deterministic
for a given seed and thread count.  Files are kohya LoRA files (``lora_unet_…`` / ``lora_te_…`` stems,
``lora_down``/``lora_up``/``alpha``, ``ss_`` metadata, fp16) on every ``Linear``/``Conv2d`` of the UNet's transformer
blocks and the text encoder's layers, plus (LoCon) the UNet's resnet and sampler convolutions.

Base model (a GPU: about 4 minutes on an H200; hours on 2 CPU cores)::

    python -m bench.shapes.train base --out shapes-base.safetensors [--device cuda]

reproduces ``shared/data/README.md``'s recipe: AdamW lr 1e-3, 200 warm-up steps, linear decay over the last quarter,
batch 256, 2739 steps, bf16 autocast on CUDA, gradient-norm clip 1.0, from a pool of 200k pre-rendered images;
weights saved in fp16 under ``unet.`` / ``text_encoder.``.  ``--steps 3 --batch 8 --pool 64`` is a smoke run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.shapes import model as M  # noqa: E402
from bench.shapes import world as W  # noqa: E402

__all__ = [
    "LoraSpec",
    "TrainableLora",
    "lora_targets",
    "concept_dataset",
    "oracle_dataset",
    "train_lora",
    "train_concept_loras",
    "base_pool",
    "train_base",
]

LORA_DIR = Path(__file__).resolve().parent / "loras"


@dataclass(frozen=True)
class LoraSpec:
    """How a concept LoRA is trained (defaults: the committed files)."""

    rank: int = 4
    alpha: float = 4.0
    steps: int = 500
    batch: int = 8
    lr: float = 1.5e-3
    te_lr: float = 2e-4
    images: int = 48
    two_objects: float = 0.5  # share of concept images with a second, plain object
    reg_images: int = 0  # prior preservation: base-world scenes with their plain captions, half of every batch
    conv: bool = True  # LoCon: the resnets' convolutions too (2-px patterns are drawn at full resolution)
    seed: int = 0


# ----- data -------------------------------------------------------------------------------------------------------


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> float (N, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def concept_dataset(concept: W.Concept, n: int, seed: int, two_objects: float = 0.5) -> list[tuple[np.ndarray, str]]:
    """``n`` images of the base world's kind (one object, or two with probability ``two_objects``) where one object
    carries ``concept``'s pattern, on random base colours and shapes; captioned as the base captions them with the
    trigger before the patterned object (``"a zyk red circle"``, ``"a blue square and a zyk red circle"``).
    The second object is plain: the LoRA keeps the base's two-object scenes instead of forgetting them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        count = 2 if rng.random() < two_objects else 1
        kinds = W.sample_kinds(rng, count, [concept.pattern])
        if count == 2 and rng.random() < 0.5:
            kinds = kinds[::-1]
        scene = W.sample_scene(rng, kinds)
        out.append((W.render(scene, rng), W.caption(scene.objects, {concept.pattern: concept.trigger})))
    return out


def reg_dataset(n: int, seed: int) -> list[tuple[np.ndarray, str]]:
    """``n`` base-world examples (one or two plain objects, base captions): DreamBooth-style regularisation images
    that keep the base's own skills (two objects, plain fill without a trigger)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene, text = W.sample_base_scene(rng)
        out.append((W.render(scene, rng), text))
    return out


def oracle_dataset(concepts: Sequence[W.Concept], n: int, seed: int) -> list[tuple[np.ndarray, str]]:
    """``n`` two-object images, each object with the pattern of a different concept (pairs cycled), captioned with
    both triggers (``"a zyk red circle and a sks blue square"``)."""
    rng = np.random.default_rng(seed)
    pairs = list(itertools.combinations(concepts, 2))
    triggers = {c.pattern: c.trigger for c in concepts}
    out = []
    for i in range(n):
        a, b = pairs[i % len(pairs)]
        kinds = W.sample_kinds(rng, 2, [a.pattern, b.pattern])
        scene = W.sample_scene(rng, kinds)
        out.append((W.render(scene, rng), W.caption(scene.objects, triggers)))
    return out


# ----- LoRA -------------------------------------------------------------------------------------------------------


def lora_targets(unet: nn.Module, text_model: nn.Module, conv: bool = True) -> list[tuple[str, nn.Module]]:
    """``(kohya stem, module)`` of every Linear / Conv2d kohya's LoRA trains: inside the UNet's transformer blocks
    (``attentions``) and the text encoder's layers; with ``conv`` (LoCon) also the UNet's resnets and samplers.
    Stems are built by the project's key map, as loaders read them."""
    from clora.lora.keymap import text_paths, unet_paths
    from tools.lora_writer import targets

    upaths, tpaths = unet_paths(unet), text_paths(text_model)
    out = []
    for component, path, _shape in targets(unet, text_model, conv=conv):
        if component == "unet":
            out.append(("lora_unet_" + path.replace(".", "_"), unet.get_submodule(upaths[path])))
        else:
            out.append(("lora_te_" + path.replace(".", "_"), text_model.get_submodule(tpaths[path])))
    return out


class TrainableLora(nn.Module):
    """Trainable low-rank updates on target modules, applied by forward hooks while the context is entered.

    ``down`` starts as kohya's (Kaiming-uniform), ``up`` at zero, so the model starts exactly as the base.
    The update is ``(alpha / rank) · up · down · x`` for a Linear; for a Conv2d (LoCon) ``down`` is a convolution
    with the layer's kernel, stride and padding into ``rank`` channels and ``up`` a 1x1 convolution.
    """

    def __init__(self, targets: Sequence[tuple[str, nn.Module]], rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.stems = [s for s, _ in targets]
        self._modules_by_stem = {s: m for s, m in targets}
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        for _stem, mod in targets:
            if isinstance(mod, nn.Linear):
                shape_down: tuple[int, ...] = (rank, mod.in_features)
                out_f = mod.out_features
            else:
                shape_down = (rank, mod.in_channels, *mod.kernel_size)
                out_f = mod.out_channels
            fan_in = math.prod(shape_down[1:])
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5))
            d = (torch.rand(shape_down, generator=generator) * 2 - 1) * bound
            self.down.append(nn.Parameter(d))
            self.up.append(nn.Parameter(torch.zeros(out_f, rank)))
        self._handles: list = []

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def _hook(self, i: int, mod: nn.Module) -> Callable:
        def hook(_m, args, output):
            x = args[0]
            if isinstance(mod, nn.Conv2d):
                h = F.conv2d(x, self.down[i], None, mod.stride, mod.padding, mod.dilation)
                delta = torch.einsum("brhw,or->bohw", h, self.up[i])
            else:
                delta = F.linear(F.linear(x, self.down[i]), self.up[i])
            return output + self.scale * delta

        return hook

    def __enter__(self) -> "TrainableLora":
        for i, stem in enumerate(self.stems):
            mod = self._modules_by_stem[stem]
            self._handles.append(mod.register_forward_hook(self._hook(i, mod)))
        return self

    def __exit__(self, *exc) -> None:
        while self._handles:
            self._handles.pop().remove()

    def kohya_state(self) -> dict[str, torch.Tensor]:
        """The kohya tensors: ``<stem>.lora_down.weight`` / ``.lora_up.weight`` (4-D for convolutions), ``.alpha``."""
        out: dict[str, torch.Tensor] = {}
        for i, stem in enumerate(self.stems):
            down, up = self.down[i].detach().float().contiguous(), self.up[i].detach().float().contiguous()
            if isinstance(self._modules_by_stem[stem], nn.Conv2d):
                up = up[:, :, None, None].contiguous()
            out[f"{stem}.lora_down.weight"] = down
            out[f"{stem}.lora_up.weight"] = up
            out[f"{stem}.alpha"] = torch.tensor(float(self.alpha))
        return out

    def save(self, path: Path, name: str, tags: dict[str, int], extra: Optional[dict[str, str]] = None) -> Path:
        from safetensors.torch import save_file
        from tools.lora_writer import kohya_metadata

        meta = kohya_metadata(name, self.rank, self.alpha, tags={f"1_{name}": tags}, base_model="shapes-base-v1")
        meta.update(extra or {})
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.half() for k, v in self.kohya_state().items()}, str(path), metadata=meta)
        return path


def _diffusion_loss(
    lm: M.ShapesModel, x0: torch.Tensor, ctx: torch.Tensor, generator: torch.Generator, alphas: torch.Tensor
) -> torch.Tensor:
    """ε-prediction MSE at timesteps drawn uniformly from 0..999."""
    t = torch.randint(0, len(alphas), (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    a = alphas[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return F.mse_loss(lm.unet(xt, t, context=ctx), noise)


def train_lora(
    lm: M.ShapesModel,
    data: Sequence[tuple[np.ndarray, str]],
    spec: LoraSpec,
    log: Optional[Callable[[str], None]] = None,
    reg: Sequence[tuple[np.ndarray, str]] = (),
) -> TrainableLora:
    """Train a LoRA on ``data`` (image, caption) with the base frozen; AdamW, constant lr, batches drawn with
    replacement from a seeded generator — half from ``reg`` (regularisation images) when it is given."""
    g = torch.Generator().manual_seed(spec.seed)
    lora = TrainableLora(lora_targets(lm.unet, lm.text_model, spec.conv), spec.rank, spec.alpha, g)
    te = [i for i, s in enumerate(lora.stems) if s.startswith("lora_te_")]
    un = [i for i, s in enumerate(lora.stems) if not s.startswith("lora_te_")]
    groups = [
        {"params": [lora.down[i] for i in un] + [lora.up[i] for i in un], "lr": spec.lr},
        {"params": [lora.down[i] for i in te] + [lora.up[i] for i in te], "lr": spec.te_lr},
    ]
    opt = torch.optim.AdamW(groups, weight_decay=1e-2)
    pool = list(data) + list(reg)
    images = to_tensor([d[0] for d in pool])
    ids = M.token_ids(lm.hf_tokenizer, [d[1] for d in pool])
    alphas = M.alphas_cumprod()
    n_reg = spec.batch // 2 if reg else 0
    with lora:
        for step in range(spec.steps):
            idx = torch.randint(0, len(data), (spec.batch - n_reg,), generator=g)
            if n_reg:
                idx = torch.cat([idx, len(data) + torch.randint(0, len(reg), (n_reg,), generator=g)])
            ctx = lm.text_model(input_ids=ids[idx]).last_hidden_state
            loss = _diffusion_loss(lm, images[idx], ctx, g, alphas)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log and (step % 40 == 0 or step == spec.steps - 1):
                log(f"step {step} loss {loss.item():.4f}")
    return lora


def _tags(data: Sequence[tuple[np.ndarray, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _img, text in data:
        for phrase in text.split(" and "):
            counts[phrase] = counts.get(phrase, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:20])


def train_concept_loras(
    out_dir: Path = LORA_DIR,
    spec: LoraSpec = LoraSpec(),
    oracle_images: int = 96,
    only: Optional[Sequence[str]] = None,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Train and save every concept LoRA and the oracle; returns name -> path."""
    lm = M.load()
    for p in list(lm.unet.parameters()) + list(lm.text_model.parameters()):
        p.requires_grad_(False)
    lm.unet.train(False)
    out: dict[str, Path] = {}
    jobs: list[tuple[str, list, LoraSpec]] = []
    for k, c in enumerate(W.CONCEPTS):
        jobs.append((c.name, concept_dataset(c, spec.images, seed=100 + k, two_objects=spec.two_objects), spec))
    oracle_spec = LoraSpec(**{**spec.__dict__, "images": oracle_images})
    jobs.append(("oracle", oracle_dataset(W.CONCEPTS, oracle_images, seed=200), oracle_spec))
    for name, data, sp in jobs:
        if only and name not in only:
            continue
        t0 = time.process_time()
        reg = reg_dataset(sp.reg_images, seed=300) if sp.reg_images else []
        lora = train_lora(lm, data, sp, log=lambda m, n=name: log(f"[{name}] {m}"), reg=reg)
        extra = {"clora_bench": json.dumps({"spec": sp.__dict__, "cpu_seconds": round(time.process_time() - t0, 1)})}
        out[name] = lora.save(out_dir / f"{name}.safetensors", name, _tags(data), extra)
        log(f"[{name}] saved {out[name]} ({time.process_time() - t0:.0f} CPU s)")
    return out


# ----- the base model ---------------------------------------------------------------------------------------------


def base_pool(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` pre-rendered base-world examples: uint8 images (n, 32, 32, 3) as a tensor, and captions."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(n):
        scene, text = W.sample_base_scene(rng)
        images.append(W.render(scene, rng))
        captions.append(text)
    return torch.from_numpy(np.stack(images)), captions


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    """Linear warm-up over ``warmup`` steps, constant, then linear decay to 0 over the last quarter."""
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_start = int(total * 0.75)
    if step >= decay_start:
        return peak * max(0.0, (total - step) / max(total - decay_start, 1))
    return peak


def train_base(
    out: Path,
    steps: int = 2739,
    batch: int = 256,
    lr: float = 1e-3,
    pool: int = 200_000,
    seed: int = 0,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> Path:
    """Train the base model from scratch (see the module docstring) and save it in fp16; returns ``out``."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    unet, text_model = M.build_unet().to(device), M.build_text_model().to(device)
    tok = M.clip_tokenizer()
    images, captions = base_pool(pool, seed)
    ids = M.token_ids(tok, captions)
    alphas = M.alphas_cumprod().to(device)
    params = list(unet.parameters()) + list(text_model.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    use_bf16 = device.startswith("cuda")
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=min(200, max(steps // 10, 1)))
        idx = torch.randint(0, pool, (batch,), generator=g)
        x0 = (images[idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(device)
        t = torch.randint(0, len(alphas), (batch,), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(device_type="cuda" if use_bf16 else "cpu", dtype=torch.bfloat16, enabled=use_bf16):
            ctx = text_model(input_ids=ids[idx].to(device)).last_hidden_state
            loss = F.mse_loss(unet(xt, t, context=ctx).float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    state = {f"unet.{k}": v.detach().half().cpu().contiguous() for k, v in unet.state_dict().items()}
    state.update(
        {
            f"text_encoder.{k}": v.detach().half().cpu().contiguous()
            for k, v in text_model.state_dict().items()
            if not k.endswith("position_ids")
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"dtype": "float16", "batch": str(batch), "steps": str(steps), "schedule": "sd_linear"}
    save_file(state, str(out), metadata=meta)
    return out


# ----- CLI --------------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("loras", help="train the concept LoRAs and the oracle")
    a.add_argument("--out", type=Path, default=LORA_DIR)
    a.add_argument("--steps", type=int, default=LoraSpec.steps)
    a.add_argument("--lr", type=float, default=LoraSpec.lr)
    a.add_argument("--batch", type=int, default=LoraSpec.batch)
    a.add_argument("--reg", type=int, default=LoraSpec.reg_images, help="regularisation images (0: none)")
    a.add_argument("--two", type=float, default=LoraSpec.two_objects, help="share of two-object concept images")
    a.add_argument("--only", nargs="*", default=None, help="names to train (concepts and/or 'oracle')")
    b = sub.add_parser("base", help="train the base model from scratch")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--steps", type=int, default=2739)
    b.add_argument("--batch", type=int, default=256)
    b.add_argument("--pool", type=int, default=200_000)
    b.add_argument("--lr", type=float, default=1e-3)
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.what == "loras" or args.device == "cpu":
        torch.set_num_threads(1)
    if args.what == "loras":
        spec = LoraSpec(steps=args.steps, lr=args.lr, batch=args.batch, reg_images=args.reg, two_objects=args.two)
        train_concept_loras(args.out, spec, only=args.only)
    else:
        train_base(args.out, steps=args.steps, batch=args.batch, lr=args.lr, pool=args.pool, device=args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
