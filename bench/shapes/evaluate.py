"""Does composition work?  LoRA merging against CLoRA and its ablations, scored by the detector in the shapes world.

For each *case* (two or three objects of distinct shapes and colours, each bound to one concept LoRA) and each
*method*, ``seeds`` images are sampled (one batch; image ``b`` starts from the noise of row ``b`` of ``seed``) and
scored:

* ``both_present``: every requested object is there with its own pattern (shape, colour and pattern right);
* ``omission``: some requested object (shape and colour, any pattern) is missing;
* ``blend``: some object is not a requested one but carries attributes (colour, shape, non-plain pattern) of two
  different requested objects — e.g. the red circle with the blue square's checker, or a red square;
* ``count_error``: the number of objects differs from the number requested;
* ``objects_present``: every requested shape and colour is there (patterns ignored: the base's own skill);
* ``pattern_rate``: the fraction of requested objects present with their own pattern (partial credit);
* CPU seconds per image (``time.process_time``, one thread).

Methods: ``base`` (no LoRA, plain prompt), ``single:<concept>`` (that LoRA alone, its trigger in the prompt),
``merged`` (all LoRAs on every row and on the text encoder — the same as merging them into the weights — with every
trigger in the prompt), ``clora`` (the standalone runner: bindings ``trigger`` + ``"colour shape"``),
``clora_no_update`` (``step_size = 0``), ``clora_no_mask`` (``mask_start = 1``: the variants' predictions are
averaged without masks), ``clora_lambda85`` (mask threshold λ = 0.85, the best of a small pilot search), ``oracle`` (the oracle LoRA trained on two-concept images, every trigger in the prompt).

Usage::

    OMP_NUM_THREADS=1 python -m bench.shapes.evaluate --jobs 2   # full run: results.json + results.md
    OMP_NUM_THREADS=1 python -m bench.shapes.evaluate --quick    # the reduced check (a few seeds, 3 pairs)
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.shapes import detector as D  # noqa: E402
from bench.shapes import model as M  # noqa: E402
from bench.shapes import world as W  # noqa: E402

__all__ = [
    "Case",
    "SampleConfig",
    "score_image",
    "summarise",
    "pair_cases",
    "triple_cases",
    "sample_with_loras",
    "run_method",
    "clora_settings",
    "evaluate",
    "markdown_table",
]

HERE = Path(__file__).resolve().parent
LORA_DIR = HERE / "loras"
METRICS = ("both_present", "omission", "blend", "count_error", "objects_present", "pattern_rate")
Kind = tuple[str, str, str]  # (shape, colour, pattern)


# ----- cases ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """Objects ``(shape, colour)`` and the concept bound to each."""

    objects: tuple[tuple[str, str], ...]
    concepts: tuple[W.Concept, ...]

    @property
    def name(self) -> str:
        return "+".join(c.name for c in self.concepts)

    @property
    def requested(self) -> list[Kind]:
        return [(s, col, c.pattern) for (s, col), c in zip(self.objects, self.concepts)]

    def prompt(self, triggers: Sequence[W.Concept] = ()) -> str:
        """The caption, with the triggers of the given concepts before their objects."""
        table = {c.pattern: c.trigger for c in triggers}
        return W.caption([(s, col, c.pattern) for (s, col), c in zip(self.objects, self.concepts)], table)

    def subject(self, i: int) -> str:
        shape, colour = self.objects[i]
        return f"{colour} {shape}"


def _objects(rng: np.random.Generator, n: int) -> tuple[tuple[str, str], ...]:
    """``n`` objects of distinct shapes and distinct colours."""
    shapes = rng.permutation(len(W.SHAPES))[:n]
    colours = rng.permutation(len(W.COLOURS))[:n]
    names = list(W.COLOURS)
    return tuple((W.SHAPES[s], names[c]) for s, c in zip(shapes, colours))


def pair_cases(seed: int = 7, concepts: Sequence[W.Concept] = W.CONCEPTS) -> list[Case]:
    """Every pair of concepts, each on its own randomly drawn pair of objects."""
    rng = np.random.default_rng(seed)
    return [Case(_objects(rng, 2), pair) for pair in itertools.combinations(concepts, 2)]


def triple_cases(n: int = 2, seed: int = 11, concepts: Sequence[W.Concept] = W.CONCEPTS) -> list[Case]:
    """``n`` triples of concepts (the first ``n`` combinations), each on three objects."""
    rng = np.random.default_rng(seed)
    return [Case(_objects(rng, 3), t) for t in list(itertools.combinations(concepts, 3))[:n]]


# ----- scoring ----------------------------------------------------------------------------------------------------


def _attributes(kind: Kind) -> set[tuple[str, str]]:
    shape, colour, pattern = kind
    out = {("shape", shape), ("colour", colour)}
    if pattern != "plain":
        out.add(("pattern", pattern))
    return out


def _contains(found: Sequence[Any], wanted: Sequence[Any]) -> bool:
    """Multiset containment."""
    have = Counter(found)
    need = Counter(wanted)
    return all(have[k] >= n for k, n in need.items())


def score_image(found: Sequence[Kind], requested: Sequence[Kind]) -> dict[str, float]:
    """The metrics of one image from its detected kinds and the requested kinds (see the module docstring)."""
    objects = [(s, c) for s, c, _ in found]
    wanted_objects = [(s, c) for s, c, _ in requested]
    blend = False
    req_attrs = [_attributes(r) for r in requested]
    for kind in found:
        if kind in requested:
            continue
        attrs = _attributes(kind)
        touched = [i for i, ra in enumerate(req_attrs) if attrs & (ra - set.intersection(*req_attrs))]
        if len(touched) >= 2:
            blend = True
    have = Counter(found)
    right = sum(min(have[k], n) for k, n in Counter(requested).items())
    return {
        "both_present": float(_contains(found, requested)),
        "omission": float(not _contains(objects, wanted_objects)),
        "blend": float(blend),
        "count_error": float(len(found) != len(requested)),
        "objects_present": float(_contains(objects, wanted_objects)),
        "pattern_rate": right / len(requested),
    }


def summarise(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over images."""
    return {m: float(np.mean([s[m] for s in scores])) if scores else float("nan") for m in METRICS}


# ----- sampling ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleConfig:
    """Sampler settings shared by every method."""

    sampler: str = "dpmpp_2m_karras"
    steps: int = 20
    cfg_scale: float = 5.0
    negative: str = ""


def sample_with_loras(
    lm: M.ShapesModel,
    prompt: str,
    loras: Sequence[tuple[Any, float]],
    cfg: SampleConfig,
    seed: int,
    batch: int,
) -> torch.Tensor:
    """Plain k-diffusion sampling with LoRAs on every row (UNet and text encoder, cond and uncond): merging without
    touching the weights.  This is `clora.runner.generate` with CLoRA off and ``plain_loras``, so images of the same
    seed and row start from the same noise in every method.  ``loras``: ``(LoraFile, weight)`` pairs.  Returns images
    (batch, 3, 32, 32) in [-1, 1]."""
    from clora.runner import generate
    from clora.settings import CloraSettings

    res = generate(
        lm, prompt, CloraSettings(enabled=False), loras=[lora for lora, _w in loras],
        plain_loras=[(lora.name, float(w)) for lora, w in loras], negative=cfg.negative, sampler=cfg.sampler,
        steps=cfg.steps, cfg_scale=cfg.cfg_scale, seed=seed, width=32, height=32, batch_size=batch, progress=False,
    )
    return res.latent


def clora_settings(case: Case, **overrides: Any):
    """CLoRA settings binding concept ``i``'s LoRA (file stem = concept name) to object ``i``."""
    from clora.settings import Binding, CloraSettings

    bindings = tuple(
        Binding(lora=c.name, subjects=(case.subject(i),), triggers=c.trigger) for i, c in enumerate(case.concepts)
    )
    return CloraSettings(enabled=True, bindings=bindings, **overrides).validate()


#: The CLoRA settings of the benchmark (everything else at the engine's defaults); see README for the search.
CLORA_DEFAULTS: dict[str, Any] = {"refine_at": ()}
ABLATIONS: dict[str, dict[str, Any]] = {
    "clora": {},
    "clora_no_update": {"step_size": 0.0},
    "clora_no_mask": {"mask_start": 1.0},
    "clora_lambda85": {"mask_threshold": 0.85},  # the best λ of the pilot search (README)
}


def run_method(
    lm: M.ShapesModel,
    case: Case,
    method: str,
    lora_dir: Path,
    cfg: SampleConfig,
    seed: int,
    batch: int,
    clora_overrides: Optional[dict[str, Any]] = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Images (batch, 32, 32, 3) uint8 of one method on one case, and run info (CPU seconds, CLoRA diagnostics)."""
    from clora.lora.files import load_lora
    from clora.runner import generate

    info: dict[str, Any] = {}
    t0 = time.process_time()
    if method.startswith("clora"):
        settings = clora_settings(case, **{**CLORA_DEFAULTS, **(clora_overrides or {}), **ABLATIONS[method]})
        res = generate(
            lm, case.prompt(), settings, loras=[lora_dir / f"{c.name}.safetensors" for c in case.concepts],
            negative=cfg.negative, sampler=cfg.sampler, steps=cfg.steps, cfg_scale=cfg.cfg_scale, seed=seed,
            width=32, height=32, batch_size=batch, progress=False,
        )
        images = M.to_uint8(res.latent)
        ious = [iou for _step, iou in res.step_ious]
        info["mask_iou"] = float(np.mean(ious)) if ious else float("nan")
        losses = [(r.loss_before, r.loss_after) for r in res.history if r.loss_after is not None]
        if losses:
            info["loss_drop"] = float(np.mean([b - a for b, a in losses]))
    else:
        if method == "base":
            loras, concepts = [], []
        elif method == "merged":
            concepts = list(case.concepts)
            loras = [(load_lora(lora_dir / f"{c.name}.safetensors"), 1.0) for c in concepts]
        elif method == "oracle":
            concepts = list(case.concepts)
            loras = [(load_lora(lora_dir / "oracle.safetensors"), 1.0)]
        elif method.startswith("single:"):
            name = method.split(":", 1)[1]
            concepts = [c for c in case.concepts if c.name == name]
            loras = [(load_lora(lora_dir / f"{name}.safetensors"), 1.0)]
        else:
            raise ValueError(f"Unknown method '{method}'.")
        out = sample_with_loras(lm, case.prompt(concepts), loras, cfg, seed, batch)
        images = M.to_uint8(out)
    info["cpu_seconds_per_image"] = (time.process_time() - t0) / batch
    return images, info


def score_batch(images: np.ndarray, case: Case) -> list[dict[str, float]]:
    return [score_image(D.kinds_of(D.detect(img)), case.requested) for img in images]


# ----- the whole evaluation ---------------------------------------------------------------------------------------


def solo_rates(lm: M.ShapesModel, lora_dir: Path, cfg: SampleConfig, n: int, seed: int = 500) -> dict[str, Any]:
    """Each concept LoRA alone on one-object prompts ``"a <trigger> <colour> <shape>"`` (4 images per prompt):
    ``success`` = exactly the requested object (one object; shape, colour and pattern right); ``pattern`` = one
    object carrying the concept's pattern (shape and colour not checked).  ``base``: the base model without LoRA on
    the same objects (plain captions, same noise) — exactly right (``success``, plain fill) and one object of the
    right shape and colour (``object``): the ceiling a concept LoRA's ``success`` can reach."""
    from clora.lora.files import load_lora

    out: dict[str, Any] = {}
    per_prompt = min(4, n)
    base_success, base_object = [], []
    for k, concept in enumerate(W.CONCEPTS):
        rng = np.random.default_rng(seed + k)
        lora = load_lora(lora_dir / f"{concept.name}.safetensors")
        success, pattern, t0 = [], [], time.process_time()
        for j in range(max(1, n // per_prompt)):
            kind = W.sample_kinds(rng, 1, [concept.pattern])
            prompt = W.caption(kind, {concept.pattern: concept.trigger})
            imgs = M.to_uint8(sample_with_loras(lm, prompt, [(lora, 1.0)], cfg, seed + 100 * k + j, per_prompt))
            for im in imgs:
                found = D.kinds_of(D.detect(im))
                success.append(float(found == kind))
                pattern.append(float(len(found) == 1 and found[0][2] == concept.pattern))
            # the ceiling: the base itself on the same object, same noise, plain caption
            plain = [(kind[0][0], kind[0][1], "plain")]
            for im in M.to_uint8(sample_with_loras(lm, W.caption(plain), [], cfg, seed + 100 * k + j, per_prompt)):
                found = D.kinds_of(D.detect(im))
                base_success.append(float(found == plain))
                base_object.append(float(len(found) == 1 and found[0][:2] == plain[0][:2]))
        out[concept.name] = {"success": float(np.mean(success)), "pattern": float(np.mean(pattern)),
                             "images": len(success), "cpu_seconds_per_image": (time.process_time() - t0) / len(success)}
    out["base"] = {"success": float(np.mean(base_success)), "object": float(np.mean(base_object)),
                   "images": len(base_success)}
    return out


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (results files stay machine-independent)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _noised_two_object_scenes(lm: M.ShapesModel, n: int, timesteps: Sequence[int], seed: int):
    """``n`` rendered two-object scenes, each noised to every timestep: yields ``(scene, context, t, x_t)``; the
    noise of scene ``i`` at ``t`` comes from seed ``1000 i + t``."""
    rng = np.random.default_rng(seed)
    alphas = M.alphas_cumprod()
    for i in range(n):
        scene = W.sample_scene(rng, W.sample_kinds(rng, 2))
        x0 = torch.from_numpy(W.render(scene, rng)).permute(2, 0, 1)[None].float() / 127.5 - 1
        ctx = lm.encode([W.caption(scene.objects)])  # BOS a c1 s1 and a c2 s2 EOS...
        for t in timesteps:
            g = torch.Generator().manual_seed(1000 * i + t)
            a = alphas[t]
            yield scene, ctx, t, a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g)


def _object_masks(scene: W.Scene, size: int) -> list[torch.Tensor]:
    import torch.nn.functional as F

    return [F.adaptive_avg_pool2d(torch.from_numpy(W.shape_mask(o)).float()[None, None], size)[0, 0]
            for o in scene.objects]


def _own_other(attn: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> tuple[float, float]:
    """Share of each object's attention mass on its own pixels and on the other object's, averaged over both."""
    own = sum(float((attn[k] * masks[k]).sum() / attn[k].sum()) for k in range(2)) / 2
    other = sum(float((attn[k] * masks[1 - k]).sum() / attn[k].sum()) for k in range(2)) / 2
    return own, other


def _layer_maps(lm: M.ShapesModel, xt: torch.Tensor, t: int, ctx: torch.Tensor, size: int):
    from clora.attention import AttentionCapture

    with AttentionCapture(lm.unet) as cap, torch.no_grad():
        cap.configure(size=(size, size))
        cap.reset()
        lm.unet(xt, torch.tensor([t]), context=ctx)
        return cap.maps()[0], [(name, m[0]) for name, m in cap.layer_maps()]


def attention_localisation(
    lm: M.ShapesModel, map_size: int, n: int = 24, timesteps: Sequence[int] = (100, 300, 500, 700, 900), seed: int = 0
) -> dict[str, dict[str, float]]:
    """How well the base's cross-attention maps find the objects their words name, on rendered two-object scenes
    noised to each timestep: per object, the share of its colour+shape tokens' attention mass on its own pixels
    (``own``) and on the other object's (``other``), and the IoU of the two objects' masks thresholded at
    0.4 × max as CLoRA thresholds them.  With maps that find their objects, ``own`` ≫ ``other`` and the IoU is low."""
    rows: dict[int, list[tuple[float, float, float]]] = {t: [] for t in timesteps}
    for scene, ctx, t, xt in _noised_two_object_scenes(lm, n, timesteps, seed):
        maps, _ = _layer_maps(lm, xt, t, ctx, map_size)
        attn = [maps[..., 2:4].sum(-1), maps[..., 6:8].sum(-1)]
        own, other = _own_other(attn, _object_masks(scene, map_size))
        th = [a_ >= 0.4 * a_.max() for a_ in attn]
        iou = float((th[0] & th[1]).sum()) / max(float((th[0] | th[1]).sum()), 1.0)
        rows[t].append((own, other, iou))
    return {str(t): {"own": float(np.mean([r[0] for r in v])), "other": float(np.mean([r[1] for r in v])),
                     "mask_iou": float(np.mean([r[2] for r in v]))} for t, v in rows.items()}


def attention_by_layer(
    lm: M.ShapesModel, n: int = 24, timesteps: Sequence[int] = (100, 500, 900), seed: int = 0
) -> dict[str, Any]:
    """`attention_localisation` per cross-attention layer and per word: for each layer at 16x16 and 8x8, the share
    of the attention mass of an object's colour word, shape word and both (``subject``) on its own pixels (``own``)
    and on the other object's (``other``), averaged over ``n`` rendered two-object scenes and both objects.  CLoRA
    (like the authors' code) averages every layer at the map size; this shows which of them carry the localisation."""
    acc: dict[tuple[int, str, int, str], list[tuple[float, float]]] = {}
    words = {"colour": (2,), "shape": (3,), "subject": (2, 3)}  # BOS a colour shape and a colour shape EOS
    for scene, ctx, t, xt in _noised_two_object_scenes(lm, n, timesteps, seed):
        for size in (16, 8):
            masks = _object_masks(scene, size)
            for name, maps in _layer_maps(lm, xt, t, ctx, size)[1]:
                for word, toks in words.items():
                    att = [maps[..., [tk + 4 * k for tk in toks]].sum(-1) for k in range(2)]
                    acc.setdefault((size, name, t, word), []).append(_own_other(att, masks))
    out: dict[str, Any] = {}
    for (size, name, t, word), v in sorted(acc.items()):
        arr = np.asarray(v)
        out.setdefault(f"{size}x{size}", {}).setdefault(name, {}).setdefault(word, {})[str(t)] = {
            "own": float(arr[:, 0].mean()), "other": float(arr[:, 1].mean())}
    return out


def evaluate(
    cases: Sequence[Case],
    methods: Sequence[str],
    seeds: int,
    lora_dir: Path = LORA_DIR,
    cfg: SampleConfig = SampleConfig(),
    seed: int = 1000,
    map_size: int = 8,
    clora_overrides: Optional[dict[str, Any]] = None,
    solo_images: int = 0,
    log=print,
    case_numbers: Optional[Sequence[int]] = None,
) -> dict[str, Any]:
    """Run every method on every case; per-case and pooled metrics (pairs and triples pooled separately).

    Case ``i`` samples from seed ``seed + 97 * case_numbers[i]`` (default: its position), so a subset of the cases
    run elsewhere (``--jobs``) draws exactly the images it draws in the whole run."""
    torch.set_num_threads(1)
    lm = M.load(map_size=map_size)
    results: dict[str, Any] = {
        "config": {"seeds": seeds, "seed": seed, "map_size": map_size, "sampler": cfg.__dict__,
                   "clora": {**CLORA_DEFAULTS, **(clora_overrides or {})}, "lora_dir": _shown(lora_dir)},
        "cases": [],
    }
    if solo_images:
        results["attention"] = {str(size): attention_localisation(lm, size) for size in (16, 8)}
        log(f"attention localisation: {json.dumps(results['attention'])}")
        results["solo"] = solo_rates(lm, lora_dir, cfg, solo_images)
        log(f"solo: {json.dumps(results['solo'])}")
    numbers = list(case_numbers) if case_numbers is not None else list(range(len(cases)))
    for ci, case in zip(numbers, cases):
        entry: dict[str, Any] = {"name": case.name, "prompt": case.prompt(), "requested": case.requested, "methods": {}}
        for method in methods:
            if method == "single":
                names = [f"single:{c.name}" for c in case.concepts]
            else:
                names = [method]
            for name in names:
                images, info = run_method(lm, case, name, lora_dir, cfg, seed + 97 * ci, seeds, clora_overrides)
                scores = score_batch(images, case)
                entry["methods"][name] = {**summarise(scores), **info, "per_image": scores}
                log(f"{case.name:24s} {name:18s} " + " ".join(f"{m}={entry['methods'][name][m]:.2f}" for m in METRICS)
                    + f" cpu/img={info['cpu_seconds_per_image']:.2f}")
        results["cases"].append(entry)
    results["pooled"] = pooled(results["cases"])
    return results


def _group(method: str) -> str:
    return "single" if method.startswith("single:") else method


def pooled(cases: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics pooled over images, per case size ("2" pairs, "3" triples) and method group."""
    bucket: dict[str, dict[str, list]] = {}
    cpu: dict[str, dict[str, list]] = {}
    for entry in cases:
        size = str(len(entry["requested"]))
        for name, m in entry["methods"].items():
            g = _group(name)
            bucket.setdefault(size, {}).setdefault(g, []).extend(m["per_image"])
            cpu.setdefault(size, {}).setdefault(g, []).append(m["cpu_seconds_per_image"])
    out: dict[str, dict[str, dict[str, float]]] = {}
    for size, groups in bucket.items():
        out[size] = {}
        for g, scores in groups.items():
            out[size][g] = {**summarise(scores), "images": len(scores),
                            "cpu_seconds_per_image": float(np.mean(cpu[size][g]))}
    return out


METHOD_LABELS = {
    "base": "no LoRA (plain prompt)",
    "single": "one concept LoRA alone",
    "merged": "merged LoRAs",
    "clora": "CLoRA",
    "clora_no_update": "CLoRA without latent update",
    "clora_no_mask": "CLoRA without masks",
    "clora_lambda85": "CLoRA, mask threshold λ = 0.85",
    "oracle": "oracle LoRA (trained on pairs)",
}


def markdown_table(results: dict[str, Any]) -> str:
    """The pooled table(s) and the solo rates as markdown."""
    lines = []
    for size, groups in sorted(results["pooled"].items()):
        what = {"2": "pairs", "3": "triples"}.get(size, f"{size} objects")
        lines.append(f"**{what}** ({len({c['name'] for c in results['cases'] if len(c['requested']) == int(size)})} "
                     f"cases × {results['config']['seeds']} seeds)\n")
        lines.append("| method | images | both present | omission | blend | count error | objects present "
                     "| pattern rate | CPU s / image |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for g in METHOD_LABELS:
            if g not in groups:
                continue
            m = groups[g]
            lines.append(
                f"| {METHOD_LABELS[g]} | {m['images']} | {m['both_present']:.2f} | {m['omission']:.2f} | "
                f"{m['blend']:.2f} | {m['count_error']:.2f} | {m['objects_present']:.2f} | {m['pattern_rate']:.2f} | "
                f"{m['cpu_seconds_per_image']:.2f} |"
            )
        lines.append("")
    if "solo" in results:
        lines.append("| concept LoRA alone (one-object prompts) | exactly right | its pattern on one object | images |")
        lines.append("|---|---|---|---|")
        for name, s in results["solo"].items():
            if name == "base":
                lines.append(f"| *base, no LoRA, plain caption (the ceiling)* | {s['success']:.2f} | "
                             f"(right object: {s['object']:.2f}) | {s['images']} |")
            else:
                lines.append(f"| {name} | {s['success']:.2f} | {s['pattern']:.2f} | {s['images']} |")
        lines.append("")
    return "\n".join(lines)


FULL_METHODS = ("base", "single", "merged", "clora", "clora_no_update", "clora_no_mask", "clora_lambda85", "oracle")
QUICK_METHODS = ("merged", "clora")


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    t0 = time.process_time()
    res = evaluate(**job)
    res["cpu_seconds_total"] = time.process_time() - t0
    return res


def _evaluate_in_workers(
    cases: Sequence[Case], methods: Sequence[str], seeds: int, lora_dir: Path, solo: int, jobs: int, kw: dict
) -> dict[str, Any]:
    """`evaluate` with the cases dealt round-robin to ``jobs`` processes (the last also measures the solo rates and
    the attention localisation); every case keeps its number, hence its seed.  Returns the merged results."""
    import concurrent.futures as cf
    import multiprocessing as mp

    deal = [list(range(j, len(cases), jobs)) for j in range(jobs)]
    deal = [idx for idx in deal if idx] or [[]]
    last = len(deal) - 1  # the fewest cases: it also measures the solo rates and the attention
    work = [dict(cases=[cases[i] for i in idx], methods=methods, seeds=seeds, lora_dir=lora_dir, case_numbers=idx,
                 solo_images=solo if j == last else 0, **kw) for j, idx in enumerate(deal)]
    with cf.ProcessPoolExecutor(len(work), mp_context=mp.get_context("spawn")) as pool:
        parts = list(pool.map(_worker, work))
    by_number = {n: c for part, job in zip(parts, work) for n, c in zip(job["case_numbers"], part["cases"])}
    results = dict(parts[last])
    results["cases"] = [by_number[i] for i in range(len(cases))]
    results["pooled"] = pooled(results["cases"])
    results["cpu_seconds_total"] = sum(p["cpu_seconds_total"] for p in parts)
    results["config"] = {**results["config"], "jobs": jobs}
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the reduced check: 3 pairs, merged vs CLoRA")
    ap.add_argument("--seeds", type=int, default=None, help="images per case and method (default 20; quick 8)")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--triples", type=int, default=1)
    ap.add_argument("--map-size", type=int, default=8, choices=(8, 16))
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--solo", type=int, default=40, help="images per concept for the solo rates (0: skip)")
    ap.add_argument("--lora-dir", type=Path, default=LORA_DIR)
    ap.add_argument("--clora", default="{}", help="JSON of CLoRA setting overrides")
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    ap.add_argument("--attention-layers", type=Path, default=None, metavar="JSON",
                    help="only measure the per-layer attention localisation (attention_by_layer) into this file")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each); same images as --jobs 1")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.attention_layers:
        layers = attention_by_layer(M.load())
        args.attention_layers.write_text(json.dumps(layers, indent=1) + "\n")
        for size, by_name in layers.items():
            for name, by_word in by_name.items():
                print(size, name, " ".join(f"{w}@{t}: {v['own']:.2f}/{v['other']:.2f}"
                                           for w, ts in by_word.items() for t, v in ts.items()))
        return 0
    cases = pair_cases()
    if args.quick:
        cases = cases[:3]
    else:
        cases += triple_cases(args.triples)
    methods = args.methods or (QUICK_METHODS if args.quick else FULL_METHODS)
    seeds = args.seeds or (8 if args.quick else 20)
    kw = dict(seed=args.seed, map_size=args.map_size, clora_overrides=json.loads(args.clora))
    solo = 0 if args.quick else args.solo
    wall = time.perf_counter()
    if args.jobs <= 1:
        t0 = time.process_time()
        results = evaluate(cases, methods, seeds, args.lora_dir, solo_images=solo, **kw)
        results["cpu_seconds_total"] = time.process_time() - t0
    else:
        results = _evaluate_in_workers(cases, methods, seeds, args.lora_dir, solo, args.jobs, kw)
    results["wall_seconds"] = time.perf_counter() - wall
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    table = markdown_table(results)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"total CPU {results['cpu_seconds_total']:.0f} s, wall {results['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
