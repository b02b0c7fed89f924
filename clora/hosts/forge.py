"""Stable Diffusion WebUI Forge glue.  The only module that imports Forge's ``backend.*`` (lazily, inside functions).

Forge shares A1111's script API, prompt parser and LoRA folder, so the per-generation preparation is A1111's
(`A1111Run`, subclassed here for where Forge keeps the UNet, the text encoder and the tokenizer).  Sampling differs:

* ``process_before_every_sampling`` (called before the first pass and again before a hires pass) patches a *clone*
  of ``p.sd_model.forge_objects.unet`` — Forge rebuilds ``forge_objects`` for every batch and pass, so nothing
  outlives the pass — with
  - a conditioning modifier, which receives the model's input ``x`` and performs the contrastive latent update in
    place (Forge samples under ``torch.inference_mode()``: the gradient pass runs inside
    `clora.gradmode.inference_safe_gradients`, which leaves inference mode, gives autograd normal copies of the
    weights and shields LayerNorm inputs from Forge's in-place residual adds, and restores everything);
  - a UNet function wrapper, which answers the base cond/uncond rows with CLoRA's fused predictions from one batched
    call over every variant's rows; Forge then applies CFG.
* The model's input is the sampler's own latent only in the plain case: ``CFGDenoiser.forward`` rebinds ``x`` for an
  inpainting mask (``x * nmask + noisy_init * mask``) and for the timestep samplers' classic DDIM eps estimation
  (``x * sqrt(sigma² + 1)``), so an update of the input alone would never reach the sampler.  ``p.sample`` therefore
  runs with ``CFGDenoiser.forward`` wrapped (a class attribute replaced in a ``try/finally`` spanning exactly that
  call, as in A1111's glue) to record the latent the sampler passed, and the modifier carries the update over to it
  through the same transform.
* bound ``<lora:>`` tags are removed before Forge merges networks, as in A1111.
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..attention import map_size
from ..compose import Composer, Conditioning, NonFiniteError
from ..lora.types import LoraError
from ..prompts import PromptError
from ..gradmode import inference_safe_gradients
from ..settings import CloraSettings, SettingsError
from .a1111 import A1111Host, A1111Run, A1111Tokenizer
from .common import CloraError, pad_tokens, rows_cond, step_from_calls

__all__ = ["is_available", "ForgeHost", "ForgeRun"]

_RUN_ATTR = "_clora_run"
#: what `ForgeHost.process_before_every_sampling` reports without a traceback (messages for the user)
_USER_ERRORS = (CloraError, LoraError, PromptError, SettingsError, NonFiniteError)
_COND, _UNCOND = 0, 1


def is_available() -> bool:
    """Forge: its ``backend`` package with the UNet patcher, and A1111's script modules."""
    try:
        return (
            importlib.util.find_spec("backend.patcher.unet") is not None
            and importlib.util.find_spec("modules.sd_samplers_cfg_denoiser") is not None
        )
    except (ImportError, ValueError):
        return False


def _transformer_options(base: dict, chunks: list[int], sigma: torch.Tensor) -> dict:
    """Forge's per-call transformer options for our row layout (chunks of B rows, COND=0/UNCOND=1)."""
    opts = dict(base or {})
    opts["cond_or_uncond"] = list(chunks)
    opts["sigmas"] = sigma
    try:
        from backend.sampling.sampling_function import compute_cond_indices, compute_cond_mark

        opts["cond_mark"] = compute_cond_mark(cond_or_uncond=chunks, sigmas=sigma)
        opts["cond_indices"], opts["uncond_indices"] = compute_cond_indices(cond_or_uncond=chunks, sigmas=sigma)
    except ImportError:
        pass
    return opts


def _host_cond(entry: dict):
    """Forge's compiled condition (backend/sampling/condition.py:compile_conditions) as CLoRA's: the context tensor,
    or for SDXL a `Conditioning` of the context and the pooled vector (``pooled_output``, the UNet's ``y``)."""
    pooled = entry.get("pooled_output")
    if pooled is None:
        y = entry.get("model_conds", {}).get("y")
        pooled = getattr(y, "cond", None)
    if pooled is None:
        return entry["cross_attn"]
    return Conditioning(entry["cross_attn"], pooled)


class _Shared:
    """A callback stored in Forge's ``model_options``, which Forge deep-copies on every ``clone()`` (a hires pass
    clones the patched UNet again): copies share this run's callback instead of trying to copy the run."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        return self


@dataclass
class ForgeRun(A1111Run):
    """One batch of one generation in Forge."""

    pass_state: dict = field(default_factory=dict)
    #: (denoiser, the latent the sampler passed it) during one ``CFGDenoiser.forward`` of this run's sampler
    host_call: Optional[tuple[Any, torch.Tensor]] = None
    #: (forge_objects, the UNet patcher it had) for every patch this run made, undone by `unpatch_unet`
    patched: list = field(default_factory=list)

    # host specifics ---------------------------------------------------------------------------------------
    def model_family(self) -> str:
        m = self.p.sd_model
        for flag, name in (("is_sdxl", "sdxl"), ("is_sd3", "sd3"), ("is_flux", "flux"), ("is_sd2", "sd2")):
            if getattr(m, flag, False):
                return name
        return "sd1" if getattr(m, "is_sd1", False) else "unknown"

    def check_gradients(self) -> None:
        unet = self.p.sd_model.forge_objects.unet
        if getattr(unet, "has_online_lora", lambda: False)():
            raise CloraError(
                "Cannot run with Forge's online LoRA mode (fp8/nf4/gguf weights cannot take gradients); "
                "use an fp16/fp32 model."
            )
        dm = unet.model.diffusion_model
        if any(not p.is_floating_point() for p in dm.parameters()):
            raise CloraError("A floating-point UNet is needed (quantised fp8/nf4/gguf models cannot take gradients).")

    def check_model(self, family: str) -> None:
        m = self.p.sd_model
        if family == "sdxl" and getattr(m, "text_processing_engine_l", None) is None:
            raise CloraError("SDXL refiner models are not supported (CLoRA needs SDXL's CLIP-L text encoder); "
                             "load an SDXL base model.")

    def host_tokenizer(self) -> A1111Tokenizer:
        m = self.p.sd_model
        engine = getattr(m, "text_processing_engine_l", None) if getattr(self, "family", "sd1") == "sdxl" else None
        return A1111Tokenizer(engine if engine is not None else m.text_processing_engine)

    def unet_module(self) -> torch.nn.Module:
        return self.p.sd_model.forge_objects.unet.model.diffusion_model

    def text_module(self) -> torch.nn.Module:
        clip = self.p.sd_model.forge_objects.clip.cond_stage_model
        tr = getattr(getattr(clip, "clip_l", None), "transformer", None)
        if tr is None or not hasattr(tr, "text_model"):
            raise CloraError("Could not find the CLIP-L text encoder of this model.")
        return tr

    def text_module_2(self) -> Optional[torch.nn.Module]:
        """SDXL's clip_g (a transformers CLIP in Forge: per-row hooks, like clip_l)."""
        clip = self.p.sd_model.forge_objects.clip.cond_stage_model
        tr = getattr(getattr(clip, "clip_g", None), "transformer", None)
        if tr is None or not hasattr(tr, "text_model"):
            raise CloraError("Could not find the CLIP-G text encoder of this SDXL model.")
        return tr

    # sampling ---------------------------------------------------------------------------------------------
    def unpatch_unet(self) -> None:
        """Put back, in every ``forge_objects`` this run patched (Forge makes a new one per pass), the UNet patcher
        it replaced: the model object is shared by every generation, so no patched clone (which refers to this
        run) stays on it."""
        while self.patched:
            forge_objects, original = self.patched.pop()
            forge_objects.unet = original

    def release(self) -> None:
        super().release()
        self.pass_state = {"applied": self.pass_state.get("applied", 0)}
        self.host_call = None

    def _patch(self, unet) -> None:
        """Install ``unet`` (a patched clone) on the model's current ``forge_objects``, remembering what it replaces."""
        forge_objects = self.p.sd_model.forge_objects
        self.patched.append((forge_objects, forge_objects.unet))
        forge_objects.unet = unet

    def refuse_sampling(self) -> None:
        """Patch a clone of Forge's UNet patcher whose every model call raises this run's error (set, not None)."""
        p, error = self.p, self.error

        def refuse(apply_model, args):
            raise CloraError(error) from error

        unet = p.sd_model.forge_objects.unet.clone()
        unet.set_model_unet_function_wrapper(_Shared(refuse))
        self._patch(unet)

    def patch_unet(self) -> None:
        """Before every sampling pass: encode the variants and patch a clone of Forge's UNet patcher."""
        p = self.p
        if self.error is not None:
            return
        hires = bool(getattr(p, "is_hr_pass", False))
        if hires and self.composer is None:
            return
        if hires and getattr(p, "hr_prompt", "") not in ("", p.prompt):
            self.report.notes.append("hires pass ran without CLoRA (its prompt differs)")
            return
        steps = (getattr(p, "hr_second_pass_steps", 0) or p.steps) if hires else p.steps
        self.encode_variants(steps)
        own_uncond = not hires or getattr(p, "hr_negative_prompt", "") in ("", p.negative_prompt)
        self.pass_state = {"hires": hires, "steps": steps, "step_key": None, "fused": None, "own_uncond": own_uncond}
        unet = p.sd_model.forge_objects.unet.clone()
        unet.add_conditioning_modifier(_Shared(self._conditioning_modifier))
        unet.set_model_unet_function_wrapper(_Shared(self._unet_wrapper))
        self._patch(unet)

    def _denoiser(self):
        sampler = getattr(self.p, "sampler", None)
        return getattr(sampler, "model_wrap_cfg", None)

    def _step(self) -> tuple[int, int]:
        """(call index of the current denoiser evaluation, sampler step)."""
        d = self._denoiser()
        calls = int(getattr(d, "step", 0) or 0)
        steps = int(getattr(d, "steps", None) or self.pass_state["steps"])
        return calls, step_from_calls(calls, steps, getattr(d, "total_steps", None))

    def _composer_for(self, x: torch.Tensor) -> Composer:
        hires = self.pass_state["hires"]
        size = map_size(x.shape[-2:], 4)
        if self.composer is not None and (not hires or self.composer.map_size == size):
            return self.composer
        unet = self.unet
        composer = Composer(
            settings=self.settings, plan=self.plan, rows=self.unet_rows, capture=self.capture, unet=unet,
            map_size=size, total_steps=self.pass_state["steps"], space="k", should_stop=self._should_stop,
            grad_context=lambda: inference_safe_gradients(unet),
        )
        if hires and self.composer is not None and self.composer.last_masks is not None:
            composer.fixed_masks = self.composer.last_masks
        self.composer = composer
        return composer

    def _conditioning_modifier(self, model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        """Forge calls this once per denoiser evaluation with the sampler's own ``x``: the latent update."""
        if self._should_stop():
            return model, x, timestep, uncond, cond, cond_scale, model_options, seed
        calls, step = self._step()
        self.pass_state["applied"] = self.pass_state.get("applied", 0) + 1
        uncond_t = _host_cond(uncond[0]) if uncond else None
        conds, uncond_t = self._conds(calls, uncond_t, x)
        c_concat = None
        if cond and "c_concat" in cond[0].get("model_conds", {}):
            c_concat = cond[0]["model_conds"]["c_concat"].cond
        self.pass_state.update(step_key=calls, fused=None, uncond=uncond_t, conds=conds, c_concat=c_concat,
                               sigma=timestep, x=x, model=model, options=model_options.get("transformer_options", {}))
        composer = self._composer_for(x)
        if not self.pass_state["hires"]:
            latent = self._sampler_latent(x)
            before = x.clone() if latent is not None else None
            fn = self._model_fn(model, c_concat, timestep, x.shape[0], composer)
            if composer.update(x, timestep, uncond_t, conds, fn, step) and latent is not None:
                self._carry_update(latent, x, before, timestep)
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    # the sampler's latent -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def tracking_sampler_latent(self):
        """``CFGDenoiser.forward`` wrapped for exactly the ``with`` body (restored on success, error and interrupt):
        the wrapper only records the latent this run's sampler passes to its denoiser, then calls Forge's forward."""
        from modules import sd_samplers_cfg_denoiser as cfgmod

        cls = cfgmod.CFGDenoiser
        original_forward = cls.__dict__.get("forward")
        if original_forward is None:  # no forward of its own to wrap: the modifier updates its input only
            yield
            return
        run = self

        def forward(denoiser, x, *args, **kwargs):
            if denoiser is not run._denoiser():
                return original_forward(denoiser, x, *args, **kwargs)
            saved, run.host_call = run.host_call, (denoiser, x)
            try:
                return original_forward(denoiser, x, *args, **kwargs)
            finally:
                run.host_call = saved

        cls.forward = forward
        try:
            yield
        finally:
            cls.forward = original_forward
            self.host_call = None

    def _sampler_latent(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The sampler's own latent when Forge gave the modifier another tensor (rebound ``x``), else None."""
        call = self.host_call
        if call is None:
            return None
        denoiser, latent = call
        if latent is x or denoiser is not self._denoiser() or latent.shape != x.shape:
            return None
        return latent

    def _carry_update(self, latent: torch.Tensor, x: torch.Tensor, before: torch.Tensor, sigma: torch.Tensor) -> None:
        """Give the sampler's ``latent`` the update just made to the model input ``x`` (``before`` it), through
        Forge's transform  input = scale * latent * nmask + noisy_init * mask  (``mask``: inpainting, kept region
        = 1; ``scale`` = sqrt(sigma² + 1) under classic DDIM eps estimation).  Where the mask keeps the image the
        latent is left alone and the input is put back as Forge builds it, so this step sees what the next one will."""
        denoiser = self._denoiser()
        delta = x - before
        scale = None
        if getattr(denoiser, "classic_ddim_eps_estimation", False):
            scale = ((sigma.to(delta) ** 2.0 + 1.0) ** 0.5).reshape(-1, *([1] * (delta.ndim - 1)))
        nmask = getattr(denoiser, "nmask", None) if getattr(denoiser, "mask", None) is not None else None
        if nmask is None:
            latent.add_((delta if scale is None else delta / scale).to(latent))
            return
        nmask = nmask.to(delta)
        delta = delta * nmask
        inside = nmask == 1
        x.copy_(torch.where(inside, x, before + delta * nmask))
        new = latent + (delta if scale is None else delta / scale).to(latent)
        if scale is None:  # fully inpainted positions: the input *is* the latent there, take it without rounding
            new = torch.where(inside, x.to(latent), new)
        latent.copy_(new)

    def _conds(self, calls: int, uncond: Optional[torch.Tensor], x: torch.Tensor):
        """(V, B, T, D) variant conditionings and negative ones (None at CFG scale 1, where Forge runs no uncond
        rows: then neither does CLoRA)."""
        conds, unconds = self.variant_conds(calls, uncond, own_negatives=self.pass_state.get("own_uncond", True))
        return conds.to(x.device), (unconds.to(x.device) if unconds is not None else None)

    def _model_fn(self, model, c_concat, sigma, batch: int, composer: Composer):
        base = self.pass_state.get("options", {})

        def fn(x_rows, sigma_rows, cond_rows):
            n = x_rows.shape[0]
            # the Composer's calls put the negative-prompt rows first (it says how many)
            n_uncond = composer.call_uncond_rows
            chunks = [_UNCOND] * (n_uncond // batch) + [_COND] * ((n - n_uncond) // batch)
            kw = {"transformer_options": _transformer_options(base, chunks, sigma)}
            if isinstance(cond_rows, Conditioning):  # SDXL: the pooled vector reaches the UNet as y (label_emb)
                kw["c_crossattn"], kw["y"] = cond_rows.crossattn, cond_rows.vector
            else:
                kw["c_crossattn"] = cond_rows
            if c_concat is not None:
                idx = torch.arange(n, device=c_concat.device) % batch
                kw["c_concat"] = rows_cond({"c_concat": c_concat}, kw["c_crossattn"], idx, key="c_crossattn")["c_concat"]
            return model.apply_model(x_rows, sigma_rows, **kw)

        return fn

    def _unet_wrapper(self, apply_model, args: dict) -> torch.Tensor:
        """Forge's model call for a batch of (cond/uncond) chunks: answered with the fused predictions."""
        st = self.pass_state
        x_in, chunks = args["input"], list(args["cond_or_uncond"])
        if st.get("x") is None or self._should_stop():
            return apply_model(x_in, args["timestep"], **args["c"])
        B = st["x"].shape[0]
        if st["fused"] is None:
            _, step = self._step()
            composer = self._composer_for(st["x"])
            fn = self._model_fn(st["model"], st["c_concat"], st["sigma"], B, composer)
            u, c = composer.predict(st["x"], st["sigma"], st["uncond"], st["conds"], fn, step)
            st["fused"] = {_COND: c, _UNCOND: u}
        out = torch.cat([st["fused"][k] for k in chunks]).to(x_in.dtype)
        if out.shape != x_in.shape:
            raise CloraError("AND-composed prompts and regional conditioning are not supported in Forge.")
        return out


class ForgeHost(A1111Host):
    """The script's host object in Forge (same hooks as A1111, plus ``process_before_every_sampling``)."""

    name = "forge"

    def process_batch(self, p, settings: CloraSettings) -> None:
        if not settings.enabled or not settings.bindings:
            return
        run = ForgeRun(p=p, settings=settings)
        run.prepare()
        setattr(p, _RUN_ATTR, run)
        original = p.sample  # bound method of this p; the wrapper is an attribute of this p only

        def sample(*a, **kw):
            try:
                if run.error is not None:
                    raise CloraError(run.error) from run.error
                with run.tracking_sampler_latent():
                    out = original(*a, **kw)
                # Forge only logs exceptions of process_before_every_sampling: report them here, and never let a
                # binding be ignored silently (e.g. another extension replaced the UNet patch).
                if run.error is not None:
                    raise CloraError(run.error) from run.error
                if not run.pass_state.get("applied") and not run._should_stop():
                    raise CloraError("Not applied: Forge's UNet patch did not run (another extension may have "
                                     "replaced it).")
                return out
            except BaseException:
                run.release()  # no previews after an error or interrupt
                raise
            finally:
                run.unpatch_unet()

        p.sample = sample

    def process_before_every_sampling(self, p, settings: CloraSettings) -> None:
        run = self.run_of(p)
        if run is None or not settings.enabled:
            return
        try:
            run.patch_unet()
        except Exception as exc:
            # Forge only logs what this hook raises and samples on: keep the error for this generation's sampling,
            # which reports it (`sample` above), and make its first model call raise it, so no step is wasted.
            run.error = exc
            run.refuse_sampling()
            if isinstance(exc, _USER_ERRORS):
                return  # a message for the user: reported once by sampling (one console line), no traceback here
            raise CloraError(exc) from exc
