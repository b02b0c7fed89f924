"""Command line: ``python -m clora generate ...`` (see ``python -m clora generate --help``).

Every error is printed to stderr as one line ``CLoRA: <sentence>`` (`clora.errors.user_message`) and gives exit
status 2; argparse's usage errors take the same form.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _binding(text: str):
    """``LORA=SUBJECT[|SUBJECT...][:TRIGGER][:WEIGHT]`` -> Binding."""
    from .settings import Binding

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--bind {text!r}: expected LORA=SUBJECT[:TRIGGER][:WEIGHT].")
    lora, rest = text.split("=", 1)
    parts = rest.split(":")
    subjects = tuple(s.strip() for s in parts[0].split("|") if s.strip())
    triggers = parts[1] if len(parts) > 1 else ""
    try:
        weight = float(parts[2]) if len(parts) > 2 and parts[2] else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bind {text!r}: weight {parts[2]!r} is not a number.") from None
    return Binding(lora=lora.strip(), subjects=subjects, triggers=triggers.strip(), weight=weight)


def _style(text: str):
    """``LORA[:WEIGHT][:SUBJECT|SUBJECT]`` -> StyleLora (whole image unless subjects are given)."""
    from .settings import StyleLora

    parts = text.split(":")
    try:
        weight = float(parts[1]) if len(parts) > 1 and parts[1] else 0.8
    except ValueError:
        raise argparse.ArgumentTypeError(f"--style {text!r}: weight {parts[1]!r} is not a number.") from None
    subjects = tuple(s for s in parts[2].split("|") if s) if len(parts) > 2 else ()
    return StyleLora(lora=parts[0], weight=weight, mode="subjects" if subjects else "whole", subjects=subjects)


def _lora_tag(text: str) -> tuple[str, float]:
    """``NAME[:WEIGHT]`` -> (name, weight): a LoRA on the whole image with CLoRA off (like ``<lora:NAME:WEIGHT>``)."""
    name, sep, tail = text.rpartition(":")
    if not sep:
        name, tail = text, ""
    try:
        weight = float(tail) if tail.strip() else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora-tag {text!r}: weight {tail!r} is not a number.") from None
    if not name.strip():
        raise argparse.ArgumentTypeError(f"--lora-tag {text!r}: expected NAME[:WEIGHT].")
    return name.strip(), weight


def _floats(text: str) -> tuple:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers.") from None


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors printed as ``CLoRA: <sentence>`` like every other error of the command."""

    def error(self, message: str):
        from .errors import user_message

        self.print_usage(sys.stderr)
        self.exit(2, user_message(message) + "\n")


def build_parser() -> argparse.ArgumentParser:
    from .runner import SAMPLERS

    ap = _Parser(prog="python -m clora", description="CLoRA: compose several LoRAs in one image.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate an image with an SD1.x single-file checkpoint")
    g.add_argument("--ckpt", required=True, help="checkpoint .safetensors (a <name>.yaml beside it is used if present)")
    g.add_argument("--config", help="model yaml (default: beside the checkpoint, else SD1 v1-inference)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative", default="")
    g.add_argument("--lora", action="append", default=[], help="LoRA .safetensors file (repeat); bound by its file stem")
    g.add_argument("--bind", action="append", default=[], type=_binding,
                   help="LORA=SUBJECT[|SUBJECT][:TRIGGER][:WEIGHT], e.g. cat_lora=cat:sks:0.9 (repeat)")
    g.add_argument("--style", action="append", default=[], type=_style,
                   help="style LoRA: LORA[:WEIGHT][:SUBJECT|SUBJECT] (whole image unless subjects are given)")
    g.add_argument("--lora-tag", action="append", default=[], type=_lora_tag, metavar="NAME[:WEIGHT]",
                   help="with CLoRA off (no --bind, or --disable): apply this --lora to the whole image, as merging it "
                        "into the weights would (like <lora:NAME:WEIGHT>; weight 1 when left out; repeat)"),
    g.add_argument("--sampler", default="euler", choices=SAMPLERS)
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--cfg", type=float, default=7.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--width", type=int, default=512)
    g.add_argument("--height", type=int, default=512)
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--disable", action="store_true", help="plain generation (bindings ignored)")
    g.add_argument("--step-size", type=float, help="z-space step size α of the latent update")
    g.add_argument("--opt-end", type=float, help="fraction of steps that update the latent")
    g.add_argument("--refine-at", type=_floats, help="fractions of the steps with refinement, e.g. 0,0.1,0.2")
    g.add_argument("--refine-iters", type=int, help="extra iterations at each refinement step")
    g.add_argument("--temperature", type=float)
    g.add_argument("--mask-threshold", type=float, help="λ of the masks")
    g.add_argument("--mask-morphology", choices=("none", "open", "close", "dilate", "erode"))
    g.add_argument("--mask-start", type=float, help="fraction of steps before masks apply")
    g.add_argument("--no-uncond-lora", action="store_true", help="keep subject LoRAs off the uncond rows")
    g.add_argument("--settings", help="JSON file of settings (the API's named form); flags override it")
    g.add_argument("--out", default="clora.png", help="output image (previews and a .json report go beside it)")
    g.add_argument("--no-preview", action="store_true")
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return ap


def _read_settings(path: str) -> str:
    from .runner import RunnerError

    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RunnerError(f"The settings file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}.") from None


def settings_from_args(args):
    from dataclasses import replace

    from .settings import CloraSettings

    s = CloraSettings.from_json(_read_settings(args.settings)) if args.settings else CloraSettings()
    updates = {}
    if args.bind:
        updates["bindings"] = tuple(args.bind)
    if args.style:
        updates["styles"] = tuple(args.style)
    for field, flag in [("step_size", "step_size"), ("opt_end", "opt_end"), ("refine_at", "refine_at"),
                        ("refine_iters", "refine_iters"), ("temperature", "temperature"),
                        ("mask_threshold", "mask_threshold"), ("mask_morphology", "mask_morphology"),
                        ("mask_start", "mask_start")]:
        v = getattr(args, flag)
        if v is not None:
            updates[field] = v
    if args.no_uncond_lora:
        updates["lora_on_uncond"] = False
    s = replace(s, **updates)
    # plain generation when disabled or when nothing is bound
    s = replace(s, enabled=bool(s.bindings) and not args.disable)
    s.validate()
    return s


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from .compose import NonFiniteError
    from .errors import user_message
    from .preview import attention_grid, mask_overlay
    from .runner import generate, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        settings = settings_from_args(args)
        lm = load_model(args.ckpt, args.config, device=args.device)
        result = generate(
            lm, args.prompt, settings, loras=args.lora, negative=args.negative, sampler=args.sampler, steps=args.steps,
            cfg_scale=args.cfg, seed=args.seed, width=args.width, height=args.height, batch_size=args.batch_size,
            plain_loras=args.lora_tag,
        )
    except (ValueError, OSError, NonFiniteError) as exc:  # LoraError, RunnerError, ... are ValueErrors
        print(user_message(exc), file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(result.images):
        img.save(out if i == 0 else out.with_name(f"{out.stem}-{i}{out.suffix}"))
    if result.masks is not None and not args.no_preview:
        labels = ["base"] + [b.lora for b in settings.bindings]
        concepts = ["/".join(b.subjects) for b in settings.bindings]
        mask_overlay(result.images[0], result.masks[0], labels).save(out.with_name(out.stem + ".masks.png"))
        from .prompts import build_variants

        groups = build_variants(args.prompt, settings.bindings, lm.tokenizer()).groups
        attention_grid(result.maps[0], groups, concepts, labels, masks=result.masks[0]).save(
            out.with_name(out.stem + ".attention.png"))
    out.with_suffix(".json").write_text(json.dumps(result.report(), indent=2))
    print(f"wrote {out} ({result.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
