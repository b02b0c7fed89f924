"""AUTOMATIC1111 WebUI glue (v1.8.0, and the 1.9/1.10 APIs it shares).  The only module that imports ``modules.*``,
always lazily inside functions, so importing it outside a WebUI is harmless.

How CLoRA rides on A1111's sampling (everything per generation; nothing outlives it):

* ``before_process_batch``: ``<lora:…>`` tags of bound LoRAs are removed from the batch's prompts, so the host's
  LoRA code never merges them (the infotext says so).  Unbound tags keep working on every row.
* ``process_batch``: the LoRA files, prompt variants and plan are prepared; then ``p.sample`` (an attribute of this
  generation's ``p`` only) is replaced by a wrapper.  A problem found here (word not in prompt, LoRA missing…) makes
  that wrapper raise `CloraError`, so the UI and the API show the message instead of a silently ignored binding.
* The wrapper encodes every variant's prompt with only its LoRA's text-encoder part (forward hooks entered and
  removed around the encode), then runs the host's own ``sample`` while ``CFGDenoiser.forward`` is wrapped — a
  class attribute replaced in a ``try/finally`` that spans exactly this call, so it is restored on success, error
  and interrupt.  The wrapped forward (a) performs the contrastive latent update in place on the sampler's own
  ``x`` and (b) calls the host's forward with the denoiser's ``model_wrap`` swapped (for that call only) for an
  interceptor that replaces the base cond/uncond predictions with CLoRA's fused ones; the host then does CFG.
* LoRA row hooks and attention capture are entered by the Composer around each of its UNet calls and removed at
  once; weights are never written.
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..attention import AttentionCapture, map_size
from ..compose import Composer, Conditioning, build_compose_plan
from ..lora.files import check_family, load_lora
from ..lora.functional import ParamTarget, run_with_loras
from ..lora.keymap import dropped_summary, resolve
from ..lora.rows import LoraRows, RowPlan
from ..lora.types import LoraError, LoraFile
from ..prompts import PromptError, build_variants
from ..settings import CloraSettings, SettingsError
from .common import CloraError, RunReport, is_finite_conditioning, pad_tokens, step_from_calls, strip_lora_tags

__all__ = ["is_available", "A1111Tokenizer", "A1111Host", "A1111Run"]

_RUN_ATTR = "_clora_run"
#: infotext key naming, per LoRA, the modules and tensors that are not applied (the console warning has examples)
DROPPED_KEY = "CLoRA dropped modules"


def is_available() -> bool:
    """True inside an A1111-style WebUI (CFGDenoiser with the 1.6+ forward signature) that is not Forge."""
    try:
        m = importlib.import_module("modules.sd_samplers_cfg_denoiser")
    except Exception:
        return False
    if importlib.util.find_spec("backend") is not None and importlib.util.find_spec("backend.patcher") is not None:
        return False  # Forge keeps its own sampling function; see hosts/forge.py
    return hasattr(m, "CFGDenoiser") and hasattr(m.CFGDenoiser, "forward")


class A1111Tokenizer:
    """`clora.prompts.PromptTokenizer` over A1111's ``FrozenCLIPEmbedderWithCustomWords``: the host's own emphasis
    parsing, BREAK, comma back-tracking and 75-token chunking decide the token positions."""

    def __init__(self, clip):
        self.clip = clip

    def chunks(self, prompt: str) -> list[list[int]]:
        chunks, _count = self.clip.tokenize_line(prompt)
        out = []
        end = getattr(self.clip, "id_end", None)
        pad = getattr(self.clip, "id_pad", end)
        for ch in chunks:
            toks = list(ch.tokens[1:-1])  # BOS ... EOS
            while toks and toks[-1] in (end, pad):
                toks.pop()
            out.append(toks)
        return out

    def word_ids(self, text: str) -> list[int]:
        return list(self.clip.tokenize([text])[0])


def _lora_index():
    """The built-in Lora extension's ``networks`` module (it lives on sys.path as a top-level module)."""
    mod = sys.modules.get("networks")
    if mod is None or not hasattr(mod, "available_network_aliases"):
        try:
            mod = importlib.import_module("networks")
        except Exception:
            return None
    return mod


def list_loras() -> list[str]:
    net = _lora_index()
    if net is None:
        return []
    return sorted(net.available_networks.keys(), key=str.lower)


def find_lora_file(name: str) -> Path:
    net = _lora_index()
    if net is None:
        raise LoraError("The WebUI's built-in Lora extension is not loaded, so LoRA names cannot be looked up.")
    entry = net.available_network_aliases.get(name) or net.available_networks.get(name)
    if entry is None:
        net.list_available_networks()
        entry = net.available_network_aliases.get(name) or net.available_networks.get(name)
    if entry is None:
        raise LoraError(f"LoRA '{name}' not found in the LoRA folder (refresh the list, or check the name).")
    return Path(entry.filename)


def _model_family(sd_model) -> str:
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    if getattr(sd_model, "is_sd1", True):
        return "sd1"
    return "unknown"


def _sdxl_embedders(sd_model) -> Optional[list]:
    """SDXL's text embedders (sgm ``GeneralConditioner.embedders``: CLIP-L, OpenCLIP bigG), or None."""
    if not getattr(sd_model, "is_sdxl", False):
        return None
    embedders = getattr(getattr(sd_model, "conditioner", None), "embedders", None)
    if embedders is None or len(embedders) < 2:
        raise CloraError("Could not find the two text encoders of this SDXL model (an SDXL refiner is not supported).")
    return list(embedders)


def _tokenizer_clip(sd_model):
    """What tokenizes a prompt: SD1's hijacked CLIP, or SDXL's first embedder (the conditioner has no tokenize_line)."""
    embedders = _sdxl_embedders(sd_model)
    return sd_model.cond_stage_model if embedders is None else embedders[0]


def _text_model(sd_model) -> torch.nn.Module:
    """The HF CLIPTextModel inside A1111's hijacked embedder (``cond_stage_model.wrapped.transformer``; SDXL: the
    first embedder's)."""
    embedders = _sdxl_embedders(sd_model)
    cs = sd_model.cond_stage_model if embedders is None else embedders[0]
    for obj in (getattr(cs, "wrapped", None), cs):
        tr = getattr(obj, "transformer", None) if obj is not None else None
        if tr is not None and hasattr(tr, "text_model"):
            return tr
    raise CloraError("Could not find the text encoder of this model (only SD 1.x and SDXL CLIP models are supported).")


def _text_model_2(sd_model) -> Optional[torch.nn.Module]:
    """SDXL's second text encoder as A1111 holds it: the open_clip model inside sgm's ``FrozenOpenCLIPEmbedder2``
    (``conditioner.embedders[1].wrapped.model``, whose ``transformer.resblocks`` use ``nn.MultiheadAttention``);
    None for SD 1.x."""
    embedders = _sdxl_embedders(sd_model)
    if embedders is None:
        return None
    emb = embedders[1]
    for obj in (getattr(emb, "wrapped", None), emb):
        model = getattr(obj, "model", None) if obj is not None else None
        if model is not None and hasattr(model, "transformer"):
            return model
    raise CloraError("Could not find the second (OpenCLIP) text encoder of this SDXL model.")


def check_gradients_possible(sd_model) -> None:
    """Modes that cannot take a backward pass through the UNet get a clear message."""
    from modules import shared

    opts = shared.cmd_opts
    if getattr(opts, "lowvram", False) or getattr(opts, "medvram", False):
        raise CloraError(
            "A gradient pass through the UNet is needed, which --lowvram/--medvram (modules moved during the "
            "forward pass) cannot do. Start the WebUI without them to use CLoRA."
        )
    if getattr(sd_model, "is_sdxl", False) and (getattr(opts, "medvram_sdxl", False) or getattr(sd_model, "lowvram", False)):
        raise CloraError(
            "A gradient pass through the UNet is needed, which --medvram-sdxl (modules moved during the forward "
            "pass of SDXL models) cannot do. Start the WebUI without it to use CLoRA on SDXL."
        )
    try:
        from modules import sd_unet

        if getattr(sd_unet, "current_unet", None) is not None:
            raise CloraError(
                f"Cannot run with a custom UNet ({type(sd_unet.current_unet).__name__}, e.g. TensorRT): CLoRA needs "
                "the PyTorch UNet for gradients. Set 'SD Unet' to None to use CLoRA."
            )
    except ImportError:
        pass
    if getattr(getattr(sd_model, "model", None), "conditioning_key", "crossattn") not in ("crossattn", "hybrid"):
        raise CloraError("Only text-to-image SD 1.x and SDXL models are supported; this model's conditioning is not.")


@dataclass
class A1111Run:
    """Everything CLoRA holds for one batch of one generation."""

    p: Any
    settings: CloraSettings
    error: Optional[Exception] = None
    report: RunReport = field(default_factory=RunReport)
    composer: Optional[Composer] = None

    # ---------------------------------------------------------------------------------------------- prepare
    def prepare(self) -> None:
        """Load and check everything; any problem is kept in ``self.error`` and raised when sampling starts."""
        try:
            self._prepare()
        except (CloraError, LoraError, PromptError, SettingsError, ValueError) as exc:
            self.error = exc

    #: what `release` drops: everything that holds tensors, modules or the LoRA files
    _HEAVY = ("composer", "capture", "unet_rows", "text_targets", "text2_params", "variant_schedules",
              "negative_schedules", "loras", "text2",
              "unet", "text")

    def release(self) -> None:
        """Drop what this run holds (the Composer with its maps, the hooks' prepared LoRA factors, the encodings,
        the LoRA files); its error and report stay.  Called once the batch's sampling and previews are done (or
        failed), so that nothing of a generation outlives it, whoever keeps ``p`` (the run and ``p`` refer to each
        other: without this, their memory waits for Python's cyclic garbage collector)."""
        for name in self._HEAVY:
            if name in self.__dict__:
                setattr(self, name, None)

    # Host specifics (Forge's run overrides these) ----------------------------------------------------------
    def model_family(self) -> str:
        return _model_family(self.p.sd_model)

    def check_gradients(self) -> None:
        check_gradients_possible(self.p.sd_model)

    def check_model(self, family: str) -> None:
        """Host-specific refusals of a model of a supported family (Forge: its SDXL refiner)."""

    def host_tokenizer(self) -> A1111Tokenizer:
        return A1111Tokenizer(_tokenizer_clip(self.p.sd_model))

    def unet_module(self) -> torch.nn.Module:
        return self.p.sd_model.model.diffusion_model

    def text_module(self) -> torch.nn.Module:
        return _text_model(self.p.sd_model)

    def text_module_2(self) -> Optional[torch.nn.Module]:
        """SDXL's second text encoder (None for SD 1.x)."""
        return _text_model_2(self.p.sd_model)

    def lora_file(self, name: str) -> Path:
        return find_lora_file(name)

    def _prepare(self) -> None:
        p, s = self.p, self.settings
        s.validate()
        family = self.model_family()
        if family not in ("sd1", "sdxl"):
            raise CloraError(f"Only SD 1.x and SDXL models are supported; the loaded model is {family.upper()}.")
        self.family = family
        if getattr(p, "refiner_checkpoint_info", None) is not None:
            raise CloraError("The refiner is not supported (it swaps the model during sampling): set Refiner to "
                             "none to use CLoRA.")
        self.check_model(family)
        self.check_gradients()
        prompts = list(p.prompts)
        if len(set(prompts)) > 1:
            raise CloraError("Every image of a batch needs the same prompt; use Batch count instead of Batch size.")
        from modules import prompt_parser

        # Token positions are taken on the prompt as it reads at the last step (prompt editing resolved).
        schedule = prompt_parser.get_learned_conditioning_prompt_schedules([prompts[0]], p.steps)[0]
        self.prompt = schedule[-1][1]
        self.tokenizer = self.host_tokenizer()
        try:
            self.variants = build_variants(self.prompt, s.bindings, self.tokenizer)
        except PromptError as exc:
            if self.prompt != prompts[0] and "not in the prompt" in str(exc):
                raise PromptError(f"{exc} (CLoRA reads the prompt as it is at the last step, after prompt editing: "
                                  f"'{self.prompt}')") from exc
            raise
        self.plan = build_compose_plan(self.variants.groups, self.variants.mask_tokens, s)

        names = [b.lora for b in s.bindings] + [st.lora for st in s.styles]
        self.loras: list[LoraFile] = []
        for n in names:
            lora = load_lora(self.lora_file(n))
            check_family(lora, family)
            self.loras.append(lora)
        self.unet = self.unet_module()
        self.text = self.text_module()
        self.text2 = self.text_module_2() if family == "sdxl" else None
        unet_t, text_t = [], []
        #: LoRA modules of an open_clip second text encoder (A1111's SDXL): applied as W + ΔW through functional_call
        self.text2_params: list[ParamTarget] = []
        dropped: list[str] = []
        for idx, lora in enumerate(self.loras):
            # logs a warning when something is left out
            res = resolve(lora, unet=self.unet, text_model=self.text, text_model_2=self.text2)
            for component, _path, module, lmod in res.targets:
                (unet_t if component == "unet" else text_t).append((module, idx, lmod))
            self.text2_params.extend(dataclasses.replace(t, lora_index=idx) for t in res.param_targets)
            self.report.notes.append(f"{lora.name}: {res.matched}/{res.total} modules")
            if res.note is not None:
                dropped.append(dropped_summary(lora, res, examples=0))
        if dropped:
            p.extra_generation_params[DROPPED_KEY] = " ".join(dropped)
        self.unet_rows = LoraRows(unet_t)
        self.text_targets = text_t
        self.capture = AttentionCapture(self.unet)

    # ---------------------------------------------------------------------------------------------- encode
    def encode_variants(self, steps: int) -> None:
        """Each variant's prompt through the text encoder with only its own LoRAs' text-encoder parts; with
        ``negative_te_lora``, each variant's negative prompt too, with the LoRAs of its uncond rows (variants without
        any use the host's own negative conditioning, which is the same computation)."""
        from modules import prompt_parser

        B = len(self.p.prompts)
        cond_te, uncond_te = self.plan.text_encoder_loras(self.settings)
        self.variant_schedules = [self._encode(prompt, cond_te[v], steps) * B for v, prompt in enumerate(self.variants.prompts)]
        negatives = list(getattr(self.p, "negative_prompts", None) or [self.p.negative_prompt] * B)
        self.negative_schedules: list[Optional[list]] = []
        for loras in uncond_te:
            if not loras:
                self.negative_schedules.append(None)
                continue
            by_text = {text: self._encode(text, loras, steps, negative=True)[0] for text in dict.fromkeys(negatives)}
            self.negative_schedules.append([by_text[t] for t in negatives])
        self._check_finite()

    def _check_finite(self) -> None:
        """A variant conditioning with NaN or inf would sample to a black image: stop with a message instead."""
        bad = [
            (v, kind)
            for kind, schedules in (("prompt", self.variant_schedules), ("negative prompt", self.negative_schedules))
            for v, sched in enumerate(schedules)
            if sched is not None and not is_finite_conditioning(sched)
        ]
        if not bad:
            return
        names = "; ".join(f"the {kind} of {self._variant_name(v)}" for v, kind in bad)
        hint = "Try a lower text-encoder weight for that LoRA"
        try:
            from modules import shared

            if getattr(shared.opts, "emphasis", None) == "Original":
                hint = ("The 'Original' emphasis mode divides by the conditioning's mean, which fails when that mean is "
                        "0: try Settings > Stable Diffusion > Emphasis mode 'No norm', or a lower text-encoder weight "
                        "for that LoRA")
        except Exception:  # outside a WebUI (tests)
            pass
        raise CloraError(f"The text encoder gave non-finite values (NaN or inf) for {names}. {hint}.")

    def _variant_name(self, v: int) -> str:
        if v == 0:
            return "the base variant (no subject LoRA)"
        bindings = self.settings.bindings
        return f"LoRA '{bindings[v - 1].lora}'" if v - 1 < len(bindings) else f"variant {v}"

    def _encode(self, prompt: str, te_loras: list, steps: int, negative: bool = False) -> list:
        """The host's conditioning schedule of ``prompt`` with ``te_loras`` on every text-encoder row.

        SDXL: the prompt goes in as the host's ``SdConditioning`` with this pass's image size (the size part of the
        pooled vector) and whether it is a negative prompt (an empty one is zeroed, as the host does); the first
        encoder (and Forge's clip_g) gets the LoRAs through per-row hooks, A1111's open_clip second encoder through
        `run_with_loras` (its fused attention weights read as W + ΔW during the call, never written)."""
        from modules import prompt_parser

        # One call encodes the prompt's schedule (prompt editing gives several texts): one row per text.
        n_texts = len(prompt_parser.get_learned_conditioning_prompt_schedules([prompt], steps)[0])
        texts: Any = [prompt]
        if getattr(self, "family", "sd1") == "sdxl":
            width, height = self.image_size()
            texts = prompt_parser.SdConditioning([prompt], is_negative_prompt=negative, width=width, height=height)
        params = getattr(self, "text2_params", None) or []
        with LoraRows(self.text_targets) as te:
            te.plan = RowPlan.from_lists([te_loras] * n_texts)
            encode = lambda: prompt_parser.get_learned_conditioning(self.p.sd_model, texts, steps)  # noqa: E731
            if params and self.text2 is not None:
                return run_with_loras(self.text2, params, te_loras, encode)
            return encode()

    def image_size(self) -> tuple[int, int]:
        """(width, height) of the pass being sampled, as the host gives it to SDXL's size conditioning."""
        p = self.p
        if getattr(p, "is_hr_pass", False) and getattr(p, "hr_upscale_to_x", 0):
            return int(p.hr_upscale_to_x), int(p.hr_upscale_to_y)
        return int(p.width), int(p.height)

    def variant_conds(self, step: int, uncond: Optional[torch.Tensor], own_negatives: bool = True):
        """(V, B, T, D) variant conditionings at ``step`` and the (V, B, T, D) negative ones, padded to one T.

        ``uncond`` is the host's negative conditioning (None when the host runs no uncond rows, CFG scale 1); it
        stands for every variant whose negative prompt is not encoded with LoRAs (or all, ``own_negatives=False``)."""
        from modules import prompt_parser

        V = len(self.variant_schedules)
        conds = [prompt_parser.reconstruct_cond_batch(c, step) for c in self.variant_schedules]
        unconds = []
        if uncond is not None:
            for sched in self.negative_schedules if own_negatives else [None] * V:
                unconds.append(uncond if sched is None else prompt_parser.reconstruct_cond_batch(sched, step))
        allc = [_as_pair(c) for c in conds + unconds]
        device = allc[0][0].device if uncond is None else allc[-1][0].device
        empty = getattr(self.p.sd_model, "cond_stage_model_empty_prompt", None)
        if torch.is_tensor(empty) and empty.dim() == 2:
            empty = empty[None]
        padded = pad_tokens([c.to(device) for c, _v in allc], empty)
        vectors = [v.to(device) if v is not None else None for _c, v in allc]
        if any(v is None for v in vectors) != all(v is None for v in vectors):
            raise CloraError("The prompt and negative prompt conditionings are of different kinds (with and without "
                             "a pooled vector).")

        def pack(lo: int, hi: int):
            cross = torch.stack(padded[lo:hi])
            if vectors[0] is None:
                return cross
            return Conditioning(cross, torch.stack(vectors[lo:hi]))

        return pack(0, V), (pack(V, len(allc)) if unconds else None)

    # ---------------------------------------------------------------------------------------------- sampling
    def sample(self, original_sample: Callable, *args, **kwargs):
        """Replacement for this generation's ``p.sample``."""
        if self.error is not None:
            raise CloraError(self.error) from self.error
        from modules import sd_samplers_cfg_denoiser as cfgmod

        with torch.no_grad():
            self.encode_variants(self.p.steps)
        cls = cfgmod.CFGDenoiser
        original_forward = cls.__dict__["forward"]
        run = self

        def forward(denoiser, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
            return run.forward(denoiser, original_forward, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)

        cls.forward = forward
        try:
            return original_sample(*args, **kwargs)
        finally:
            cls.forward = original_forward

    def _should_stop(self) -> bool:
        from modules import shared

        return bool(shared.state.interrupted or shared.state.skipped)

    def forward(self, denoiser, original_forward, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        from modules import prompt_parser

        p = self.p
        if self._should_stop():
            return original_forward(denoiser, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)
        hires = bool(getattr(p, "is_hr_pass", False))
        if hires and self.composer is None:
            return original_forward(denoiser, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)
        if hires and getattr(p, "hr_prompt", "") not in ("", p.prompt):
            self.report.notes.append("hires pass ran without CLoRA (its prompt differs)")
            return original_forward(denoiser, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)

        steps = denoiser.steps or p.steps
        step = step_from_calls(denoiser.step, steps, denoiser.total_steps)
        uncond_t = prompt_parser.reconstruct_cond_batch(uncond, denoiser.step)
        if hires and getattr(self, "family", "sd1") == "sdxl" and not getattr(self, "_hires_encoded", False):
            # SDXL's pooled vector carries the image size: the second pass gets its own encodings, as the host's do
            with torch.no_grad():
                self.encode_variants(p.steps)
            self._hires_encoded = True
        # a hires pass with its own negative prompt: that one (the host's) for every variant
        own = not hires or getattr(p, "hr_negative_prompt", "") in ("", p.negative_prompt)
        conds, uncond_t = self.variant_conds(denoiser.step, uncond_t, own_negatives=own)
        conds, uncond_t = conds.to(x.device), uncond_t.to(x.device)
        real = denoiser.inner_model
        B = x.shape[0]

        def model_fn(x_rows, sigma_rows, cond_rows):
            idx = torch.arange(x_rows.shape[0], device=x_rows.device) % B
            concat = [image_cond.index_select(0, idx.to(image_cond.device))]
            if isinstance(cond_rows, Conditioning):  # SDXL: sgm's DiffusionEngine reads crossattn and vector
                c = {"crossattn": cond_rows.crossattn, "vector": cond_rows.vector, "c_concat": concat}
            else:
                c = {"c_crossattn": [cond_rows], "c_concat": concat}
            return real(x_rows, sigma_rows, cond=c)

        if self.composer is None or (hires and self.composer.map_size != self._map_size(x)):
            self.composer = self._make_composer(x, steps, denoiser, hires)
        composer = self.composer
        if not hires:
            composer.update(x, sigma, uncond_t, conds, model_fn, step)

        interceptor = _Interceptor(real, composer, x, sigma, uncond_t, conds, model_fn, step, B)
        # model_wrap is a registered child module of the denoiser: swap the entry itself (nn.Module.__setattr__
        # would refuse a non-module), for exactly this call.
        slots = denoiser._modules if "model_wrap" in denoiser._modules else denoiser.__dict__
        saved = slots["model_wrap"]
        slots["model_wrap"] = interceptor
        try:
            return original_forward(denoiser, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)
        finally:
            slots["model_wrap"] = saved

    def _map_size(self, x: torch.Tensor) -> tuple[int, int]:
        return map_size(x.shape[-2:], 4)

    def _make_composer(self, x, steps, denoiser, hires: bool) -> Composer:
        from modules import sd_samplers_cfg_denoiser as cfgmod

        eps_space = type(denoiser).get_pred_x0 is not cfgmod.CFGDenoiser.get_pred_x0
        settings = self.settings
        composer = Composer(
            settings=settings, plan=self.plan, rows=self.unet_rows, capture=self.capture, unet=self.unet, map_size=self._map_size(x),
            total_steps=steps, space="eps" if eps_space else "k", should_stop=self._should_stop,
        )
        if hires and self.composer is not None and self.composer.last_masks is not None:
            composer.fixed_masks = self.composer.last_masks  # upsampled first-pass masks; no optimisation
        return composer


def _as_pair(c) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(context, pooled vector or None) of a host conditioning: a tensor (SD 1.x), A1111's SDXL dict
    (``crossattn``/``vector``) or a `Conditioning`."""
    if isinstance(c, Conditioning):
        return c.crossattn, c.vector
    if isinstance(c, dict):
        return c["crossattn"], c["vector"]
    return c, None


class _Interceptor:
    """Stands in for the denoiser's ``model_wrap`` during one host forward: base rows in, fused rows out."""

    def __init__(self, real, composer, x, sigma, uncond, conds, model_fn, step, batch):
        self.real, self.composer, self.x, self.sigma = real, composer, x, sigma
        self.uncond, self.conds, self.model_fn, self.step, self.B = uncond, conds, model_fn, step, batch
        self.cached_uncond: Optional[torch.Tensor] = None

    def __getattr__(self, name):  # anything else (sigma tables, ...) comes from the real model wrapper
        if name == "real":
            raise AttributeError(name)
        return getattr(self.real, name)

    def __call__(self, x_in, sigma_in, cond=None, **kwargs):
        B = self.B
        n = x_in.shape[0]
        if self.cached_uncond is not None and n == B:
            out, self.cached_uncond = self.cached_uncond, None
            return out
        u, c = self.composer.predict(self.x, self.sigma, self.uncond, self.conds, self.model_fn, self.step)
        if n == 2 * B:
            return torch.cat([c, u]).to(x_in.dtype)
        if n == B:
            self.cached_uncond = u.to(x_in.dtype)
            return c.to(x_in.dtype)
        raise CloraError("AND-composed prompts are not supported.")


class A1111Host:
    """What the AlwaysOn script calls; one instance per script object, holding no generation state."""

    name = "a1111"

    def lora_names(self) -> list[str]:
        return list_loras()

    def trigger_words(self, name: str) -> list[str]:
        try:
            return load_lora(find_lora_file(name)).trigger_words
        except LoraError:
            return []

    def before_process_batch(self, p, settings: CloraSettings) -> None:
        if not settings.enabled or not settings.bindings:
            return
        names = [b.lora for b in settings.bindings] + [s.lora for s in settings.styles]
        removed_all: list[str] = []
        new_prompts = []
        for prompt in p.prompts:
            new, removed = strip_lora_tags(prompt, names)
            new_prompts.append(new)
            removed_all.extend(removed)
        p.prompts = new_prompts
        if removed_all:
            p.extra_generation_params["CLoRA note"] = "bound LoRA tags applied by CLoRA only: " + " ".join(
                sorted(set(removed_all))
            )

    def process_batch(self, p, settings: CloraSettings) -> None:
        if not settings.enabled or not settings.bindings:
            return
        run = A1111Run(p=p, settings=settings)
        run.prepare()
        setattr(p, _RUN_ATTR, run)
        original = p.sample  # bound method of this p

        def sample(*a, **kw):
            try:
                return run.sample(original, *a, **kw)
            except BaseException:
                run.release()  # no previews after an error or interrupt: nothing of this run is needed any more
                raise

        p.sample = sample

    def postprocess_batch(self, p) -> None:
        """After the batch (and its previews): undo what `process_batch` put on ``p`` and release the run."""
        if "sample" in getattr(p, "__dict__", {}):
            del p.sample
        run = self.run_of(p)
        if run is not None:
            run.release()
            delattr(p, _RUN_ATTR)

    def run_of(self, p) -> Optional[A1111Run]:
        return getattr(p, _RUN_ATTR, None)
