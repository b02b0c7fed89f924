"""The per-generation CLoRA engine: one `Composer` per generation, called once per model evaluation.

Data flow of one call (the host glue supplies tensors and a model callable; nothing here knows the host)::

    sampler x ──► [scheduled step?] one forward over every variant's rows [uncond × V, cond × V] with per-row
                   LoRAs, capturing the H/32 attention maps with gradient (autograd off after the last H/32
                   layer) → maps = mean over each variant's uncond and cond rows → contrastive loss → backward to x
                   → x updated in place; at refinement steps the same again (passes whose prediction is not needed
                   stop after the last H/32 layer)
              ──► the prediction of the last pass *before* the last update is the one fused and handed back
                   (for k-diffusion's x0 output, moved with the update so that its ε is kept, as the authors apply
                   the pre-update ε to the updated latent); at other steps one batched no-grad call over all rows
              ──► masks from those maps → masked average of the variants' predictions (uncond and cond alike)
              ──► (fused uncond, fused cond) back to the host, which applies CFG.

How a gradient pass keeps its activations is ``settings.grad_memory`` (`resolve_grad_memory`): one pass over all
rows (above), or a no-grad pass over all rows for the maps and the loss followed by one gradient pass per variant
(``per_variant``), each with or without recomputing the UNet's blocks in the backward pass (``checkpoint``); the
update is the same up to float rounding (tests/test_grad_memory.py; memory and FLOPs: bench/sdxl_memory.py).

This is the authors' computation.  ``settings.maps_from = "cond"`` takes the maps from the cond rows only, and
``settings.predict_after_update`` recomputes the prediction on the updated latent (one more forward per optimised
step); both were this engine's behaviour before it matched the authors.

Row layout everywhere: variant-major, ``row = v * B + b`` for variant ``v`` (0 = base prompt) and image ``b``;
uncond rows first, then cond rows.  The negative-prompt conditioning is one per variant (``(V, B, T, D)``; each
variant's negative prompt may be encoded with that variant's text-encoder LoRA), or one shared ``(B, T, D)``, or
``None`` when the host runs no uncond rows (CFG scale 1).
"""
from __future__ import annotations

import contextlib
import math

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from .attention import AttentionCapture, NoMapsError, no_checkpointing, recomputing
from .loss import concept_loss
from .lora.rows import LoraRows, RowPlan
from .masks import fuse, fusion_masks
from .settings import GRAD_MEMORY_AUTO_LARGE, CloraSettings, SettingsError
from .update import latent_step

__all__ = [
    "ComposePlan", "Composer", "StepRecord", "ModelFn", "Conditioning", "CondLike", "NonFiniteError", "mask_iou",
    "concept_iou", "build_compose_plan", "resolve_grad_memory",
]


@dataclass(frozen=True)
class Conditioning:
    """Conditioning with a pooled vector beside the cross-attention context (SDXL: ``context`` and ``y``).

    crossattn: ``(..., T, D)`` token embeddings; vector: ``(..., Dy)`` one pooled vector per row.  Both have the same
    leading dimensions: ``(V, B)`` for the Composer's per-variant inputs, ``(B,)`` for a shared negative prompt,
    ``(rows,)`` for what the model function receives (row ``r`` gets ``crossattn[r]`` and ``vector[r]``: each
    variant's rows carry that variant's own vector, gathered exactly like its context).

    It offers the few tensor operations the engine applies to a conditioning (``shape``/``dim`` of the context,
    ``detach``, ``clone``, ``to``, row indexing, `rows`, `cat`, `expand_variants`), so the engine treats a plain SD1
    context tensor and this pair alike.  A plain tensor is never wrapped: the SD1 path is unchanged.
    """

    crossattn: torch.Tensor
    vector: torch.Tensor

    def __post_init__(self) -> None:
        lead = self.crossattn.shape[:-2]
        if self.crossattn.dim() < 3 or self.vector.shape[:-1] != lead:
            raise ValueError(
                f"Conditioning: the vector's leading shape {tuple(self.vector.shape[:-1])} must match the context's "
                f"{tuple(lead)} (context {tuple(self.crossattn.shape)}: (..., T, D); vector: (..., Dy))"
            )

    # the tensor-like part the engine uses ---------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        """The context's shape (the engine reads V, B and T from it)."""
        return self.crossattn.shape

    def dim(self) -> int:
        return self.crossattn.dim()

    def detach(self) -> "Conditioning":
        return Conditioning(self.crossattn.detach(), self.vector.detach())

    def clone(self) -> "Conditioning":
        return Conditioning(self.crossattn.clone(), self.vector.clone())

    def to(self, *args, **kwargs) -> "Conditioning":
        return Conditioning(self.crossattn.to(*args, **kwargs), self.vector.to(*args, **kwargs))

    def __getitem__(self, index) -> "Conditioning":
        """Rows (leading dimension) of both parts."""
        return Conditioning(self.crossattn[index], self.vector[index])

    def rows(self) -> "Conditioning":
        """``(V, B, ...)`` -> ``(V*B, ...)``, variant-major (row ``v*B + b``)."""
        return Conditioning(self.crossattn.flatten(0, 1), self.vector.flatten(0, 1))

    def expand_variants(self, n: int) -> "Conditioning":
        """A shared ``(B, ...)`` conditioning as ``(n, B, ...)``."""
        return Conditioning(self.crossattn.unsqueeze(0).expand(n, *self.crossattn.shape),
                            self.vector.unsqueeze(0).expand(n, *self.vector.shape))

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        return Conditioning(torch.cat([p.crossattn for p in parts]), torch.cat([p.vector for p in parts]))


#: A conditioning: the context tensor alone (SD 1.x/2.x) or a `Conditioning` (context + pooled vector, SDXL).
CondLike = Union[torch.Tensor, Conditioning]

#: ``model(x_rows, sigma_rows, cond_rows) -> prediction_rows`` (x0 for k-diffusion, eps for eps-space samplers);
#: ``cond_rows`` is a tensor when the Composer was given tensors, a `Conditioning` of rows when it was given those.
ModelFn = Callable[[torch.Tensor, torch.Tensor, CondLike], torch.Tensor]


def _flat_rows(c: CondLike) -> CondLike:
    """``(V, B, ...)`` -> ``(V*B, ...)`` for either kind of conditioning."""
    return c.rows() if isinstance(c, Conditioning) else c.reshape(-1, *c.shape[2:])


def _cat_rows(parts: Sequence[CondLike]) -> CondLike:
    return Conditioning.cat(parts) if isinstance(parts[0], Conditioning) else torch.cat(list(parts))


def _expand_variants(c: CondLike, n: int) -> CondLike:
    return c.expand_variants(n) if isinstance(c, Conditioning) else c.unsqueeze(0).expand(n, *c.shape)


class NonFiniteError(RuntimeError):
    """A prediction, gradient or latent of a CLoRA step is NaN or infinite: the generation stops with this message
    instead of sampling on to a black (or noise) image."""


def _finite(t: Optional[torch.Tensor]) -> bool:
    return t is None or bool(torch.isfinite(t).all())


@dataclass(frozen=True)
class ComposePlan:
    """What the engine needs to know about the variants, independent of the host.

    groups: concept k -> variant v -> token positions (the loss's positive sets).
    mask_tokens: variant v -> token positions whose maps make that variant's mask (``[]`` for the base).
    cond_loras: variant v -> ``[(lora_index, weight)]`` applied on that variant's cond rows.
    uncond_loras: the same for the uncond rows.
    """

    groups: list[list[list[int]]]
    mask_tokens: list[list[int]]
    cond_loras: list[list[tuple[int, float]]]
    uncond_loras: list[list[tuple[int, float]]]

    @property
    def n_variants(self) -> int:
        return len(self.mask_tokens)

    def __post_init__(self) -> None:
        v = self.n_variants
        if len(self.cond_loras) != v or len(self.uncond_loras) != v:
            raise ValueError("ComposePlan: one LoRA list per variant is needed for cond and uncond rows")
        for k, g in enumerate(self.groups):
            if len(g) != v:
                raise ValueError(f"ComposePlan: concept {k} lists {len(g)} variants, expected {v}")

    def text_encoder_loras(self, settings: CloraSettings) -> tuple[list[list[tuple[int, float]]], list[list[tuple[int, float]]]]:
        """Per-variant text-encoder LoRAs ``(for the prompt, for the negative prompt)``: the same LoRAs as the
        variant's cond / uncond UNet rows, with each binding's ``te_weight`` (when set) instead of its weight.  The
        negative prompt gets none when ``settings.negative_te_lora`` is off (one shared encoding without LoRAs)."""
        K = len(settings.bindings)

        def te(rows: list[list[tuple[int, float]]]) -> list[list[tuple[int, float]]]:
            out = []
            for loras in rows:
                row = []
                for idx, w in loras:
                    b = settings.bindings[idx] if idx < K else None
                    row.append((idx, float(b.te_weight) if b is not None and b.te_weight is not None else w))
                out.append(row)
            return out

        uncond = te(self.uncond_loras) if settings.negative_te_lora else [[] for _ in range(self.n_variants)]
        return te(self.cond_loras), uncond

    def row_plan(self, batch: int, *, uncond: bool, cond: bool) -> RowPlan:
        """The per-row LoRA plan for ``[uncond rows][cond rows]`` (either part optional), variant-major."""
        rows: list[list[tuple[int, float]]] = []
        for part, wanted in ((self.uncond_loras, uncond), (self.cond_loras, cond)):
            if wanted:
                for loras in part:
                    rows.extend([list(loras)] * batch)
        return RowPlan.from_lists(rows)


@dataclass
class StepRecord:
    """What happened at one optimised step (for previews, tests and the runner's report)."""

    step: int
    sigma: float
    loss_before: float
    #: the loss on the finally updated latent; measured only when a pass runs there at this step
    #: (``predict_after_update``), else None
    loss_after: Optional[float] = None
    iterations: int = 1
    #: the loss of every iteration, each before its update (``losses[0] == loss_before``)
    losses: list[float] = field(default_factory=list)


def mask_iou(masks: torch.Tensor, a: int, b: int) -> float:
    """IoU of variant masks ``a`` and ``b`` in a ``(V, 1, H, W)`` or ``(B, V, 1, H, W)`` stack (mean over images)."""
    if masks.dim() == 4:
        masks = masks.unsqueeze(0)
    ma, mb = masks[:, a] > 0.5, masks[:, b] > 0.5
    inter = (ma & mb).flatten(1).sum(1).float()
    union = (ma | mb).flatten(1).sum(1).float().clamp_min(1)
    return float((inter / union).mean())


def concept_iou(masks: torch.Tensor) -> float:
    """Mean IoU over all pairs of concept masks (variants 1..V-1) of a (B, V, 1, H, W) stack; 0 for one concept."""
    V = masks.shape[1]
    pairs = [(a, b) for a in range(1, V) for b in range(a + 1, V)]
    if not pairs:
        return 0.0
    return sum(mask_iou(masks, a, b) for a, b in pairs) / len(pairs)


@dataclass
class Composer:
    """The CLoRA engine for one generation.  Create a new one per generation; it keeps no global state.

    settings: validated `CloraSettings`.
    plan: the `ComposePlan` built from the prompt variants and bindings.
    rows: a `LoraRows` over the UNet's LoRA targets, *not entered*: the Composer enters it around each of its own
          model calls and sets the row plan, so no hook outlives a call (success, error or interrupt).
    capture: an `AttentionCapture` over the UNet, not entered either (same reason).
    map_size: (h, w) of the attention maps used (H/32 × W/32 of the image for SD; settable for other models).
    total_steps: the sampler's number of steps (fractions in the settings are taken of it).
    space: ``"k"`` when ``x`` is k-diffusion's sampler-space tensor (x = z·sqrt(1+σ²)), ``"eps"`` when it is the
           latent itself (DDIM/PLMS/UniPC in A1111).
    should_stop: polled between refinement iterations; True stops the refinement (the host handles the interrupt).
    """

    settings: CloraSettings
    plan: ComposePlan
    rows: LoraRows
    capture: AttentionCapture
    map_size: tuple[int, int]
    total_steps: int
    space: str = "k"
    should_stop: Callable[[], bool] = lambda: False
    unet: Optional[torch.nn.Module] = None  # frozen and un-checkpointed during gradient passes (see `_grad_pass`)
    #: extra host context for gradient passes (Forge: leave inference mode, normal copies of the weights)
    grad_context: Optional[Callable[[], contextlib.AbstractContextManager]] = None
    #: one model call over every variant's rows (True) or one call per variant (False); None: batched on GPUs
    #: (launch-bound: more rows cost little) and per variant on the CPU (measured faster there: bench/cpu_engine.py).
    #: The results are the same up to float rounding.
    batched: Optional[bool] = None
    history: list[StepRecord] = field(default_factory=list)
    last_maps: Optional[torch.Tensor] = None  # (B, V, h, w, T) maps of the last call (rows as ``maps_from``)
    last_masks: Optional[torch.Tensor] = None  # (B, V, 1, H, W) masks of the last call
    mean_maps: Optional[torch.Tensor] = None  # running mean of those maps over calls
    step_ious: list[tuple[int, float]] = field(default_factory=list)  # (step, mean pairwise IoU of concept masks)
    fixed_masks: Optional[torch.Tensor] = None  # (B, V, 1, h, w): use these (resized) instead of new masks (hires pass)
    _maps_seen: int = 0
    _updated_steps: set = field(default_factory=set)
    #: how many of the rows of the model call in progress are negative-prompt rows (they come first), for host
    #: glue that labels rows as cond/uncond
    call_uncond_rows: int = 0
    #: the fused prediction of the last pass before an update, for the `predict` call of the same step
    _pending: Optional[dict] = None

    def __post_init__(self) -> None:
        n = self.total_steps
        self._optimise = set(self.settings.optimise_steps(n)) if self.settings.step_size > 0 else set()
        self._refine = set(self.settings.refine_steps(n)) & self._optimise
        self._mask_start = self.settings.mask_start_step(n)
        if self.space not in ("k", "eps"):
            raise ValueError(f"unknown sampler space {self.space!r}; expected 'k' or 'eps'")
        try:
            self.capture.configure(parts=self.settings.map_layers)
        except ValueError as exc:
            raise SettingsError(f"Setting map_layers {self.settings.map_layers!r}: {exc}") from None

    def _maps(self) -> torch.Tensor:
        """The capture's maps of the last pass; a layer choice that captured nothing is the user's to change."""
        try:
            return self.capture.maps()
        except NoMapsError as exc:
            if self.capture.parts is not None:
                raise SettingsError(f"Setting map_layers {self.settings.map_layers!r}: {exc}") from None
            raise

    # ------------------------------------------------------------------------------------------------
    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        uncond: Optional[CondLike],
        conds: CondLike,
        model: ModelFn,
        step: int,
    ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """Run one model evaluation with CLoRA: `update` (when scheduled), then `predict`.

        x: (B, C, H, W), the sampler's own tensor; updated *in place* on scheduled steps (once per step, also for
           second-order samplers that evaluate the model twice per step).
        sigma: (B,) noise level (k-diffusion) or timestep (eps-space samplers).
        uncond: (V, B, T, D) one negative-prompt conditioning per variant, or (B, T, D) shared by all, or None
           (no uncond rows: CFG scale 1).  conds: (V, B, T, D) one conditioning per variant.
           Either may instead be a `Conditioning` (context + pooled vector, SDXL; both or neither): the vector is
           ``(V, B, Dy)`` (``(B, Dy)`` shared), and the model function then receives a `Conditioning` of rows.
        Returns the fused (uncond, cond) predictions, each (B, C, H, W) (uncond None when ``uncond`` is None).
        """
        self.update(x, sigma, uncond, conds, model, step)
        return self.predict(x, sigma, uncond, conds, model, step)

    def _unconds(self, x: torch.Tensor, uncond: Optional[CondLike], conds: CondLike) -> Optional[CondLike]:
        """Check the shapes; the negative conditioning as (V, B, T, D) (a shared (B, T, D) one is expanded)."""
        V = self.plan.n_variants
        if uncond is not None and isinstance(conds, Conditioning) != isinstance(uncond, Conditioning):
            raise ValueError("uncond and conds must both be tensors or both be Conditioning (context + vector)")
        if isinstance(conds, Conditioning) and uncond is not None and uncond.vector.shape[-1] != conds.vector.shape[-1]:
            raise ValueError(f"uncond and cond vectors differ in width ({uncond.vector.shape[-1]} vs "
                             f"{conds.vector.shape[-1]})")
        if conds.dim() < 3 or conds.shape[0] != V:
            raise ValueError(f"expected {V} variant conditionings, got {tuple(conds.shape)}")
        B = x.shape[0]
        if conds.shape[1] != B:
            raise ValueError("conditioning batch does not match the latent batch")
        if uncond is None:
            return None
        if uncond.dim() == conds.dim() - 1:
            uncond = _expand_variants(uncond, V)
        if uncond.shape[:2] != (V, B):
            raise ValueError(f"expected (V={V}, B={B}, ...) negative conditionings, got {tuple(uncond.shape)}")
        if uncond.shape[2:] != conds.shape[2:]:
            raise ValueError(
                f"uncond and cond token counts differ ({uncond.shape[2]} vs {conds.shape[2]}); pad them to the same length"
            )
        return uncond

    def update(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        uncond: Optional[CondLike],
        conds: CondLike,
        model: ModelFn,
        step: int,
    ) -> bool:
        """The contrastive latent update of ``x`` in place, if ``step`` is scheduled and not done yet. Returns whether it ran.

        Unless ``settings.predict_after_update``, the last pass before the (last) update also yields the fused
        prediction, which the next `predict` at this step returns instead of running the model again."""
        unconds = self._unconds(x, uncond, conds)
        if step in self._optimise and step not in self._updated_steps:
            self._updated_steps.add(step)
            self._optimise_latent(x, sigma, unconds, conds, model, step)
            return True
        return False

    def predict(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        uncond: Optional[CondLike],
        conds: CondLike,
        model: ModelFn,
        step: int,
    ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """The fused (uncond, cond) predictions at ``step``: those kept by `update` at this step (moved with the
        update in k-diffusion's x0 space), else one no-grad call over every variant's rows, fused under the masks."""
        unconds = self._unconds(x, uncond, conds)
        pending, self._pending = self._pending, None
        if pending is not None and pending["step"] == step and pending["x"].shape == x.shape:
            u, c = pending["u"], pending["c"]
            if self.space == "k":
                # x0 = x - sigma * eps: the same eps on the updated latent is the same x0 moved by the update
                shift = (x.detach() - pending["x"]).to(c.dtype)
                c = c + shift
                u = u + shift if u is not None else None
            return u, c
        return self._fused_pass(x, sigma, unconds, conds, model, step)

    def _per_variant_calls(self, x_in, sigma_in, cond_in, model, B, parts):
        """The fused pass as one model call per variant (that variant's uncond and cond rows), for comparison."""
        V = self.plan.n_variants
        full = self.rows.plan
        out = torch.empty_like(x_in)
        maps = None
        for v in range(V):
            idx = [r for part in range(parts) for r in range((part * V + v) * B, (part * V + v + 1) * B)]
            self.rows.plan = RowPlan.from_lists([full.rows[i] for i in idx])
            self.call_uncond_rows = B if parts == 2 else 0
            self.capture.reset()
            ix = torch.tensor(idx, device=x_in.device)
            out[ix] = model(x_in[ix], sigma_in[ix], cond_in[ix])
            m = self._maps()
            if maps is None:
                maps = m.new_zeros((parts * V * B, *m.shape[1:]))
            maps[ix] = m
        self.rows.plan = full
        return out, maps

    @contextlib.contextmanager
    def _gradient_mode(self):
        """For a gradient pass: ldm checkpointing off (else the maps carry no gradient) and every UNet parameter's
        ``requires_grad`` off (only the latent needs a gradient; it also lets a host merge LoRA weights in place
        during the pass).  Both are restored exactly on exit."""
        if self.unet is None:
            yield
            return
        # inference tensors (Forge's weights) are left as they are: requires_grad cannot be set back on them outside
        # inference mode, and a gradient pass never sees them (clora.gradmode hands autograd normal copies)
        params = [p for p in self.unet.parameters() if p.requires_grad and not p.is_inference()]
        try:
            for p in params:
                p.requires_grad_(False)
            with no_checkpointing(self.unet):
                yield
        finally:
            for p in params:
                p.requires_grad_(True)

    @contextlib.contextmanager
    def _hooks(self):
        """LoRA row hooks and attention capture for the duration of one model call, removed whatever happens."""
        with self.rows, self.capture:
            try:
                yield
            finally:
                self.rows.plan = None

    # ------------------------------------------------------------------------------------------------
    def _loss_from_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """maps (B, V, h, w, T) -> summed per-image contrastive loss."""
        losses = [
            concept_loss(maps[b], self.plan.groups, temperature=self.settings.temperature) for b in range(maps.shape[0])
        ]
        return torch.stack(losses).sum()

    def _variant_maps(self, flat: torch.Tensor, batch: int, with_uncond: bool) -> torch.Tensor:
        """Captured maps of the rows ``[uncond × V] [cond × V]`` (or ``[cond × V]``), variant-major, -> (B, V, h, w, T):
        each variant's maps averaged over its uncond and cond rows (``maps_from = "both"``, the authors' maps) or
        its cond rows alone (``"cond"``; also whenever there are no uncond rows)."""
        V = self.plan.n_variants
        n = V * batch
        if with_uncond:
            u, c = flat[:n], flat[n:]
            flat = c if self.settings.maps_from == "cond" else (u + c) / 2
        return flat.reshape(V, batch, *flat.shape[1:]).transpose(0, 1)

    def _rows(self, x, sigma, unconds, conds, *, with_uncond: bool):
        """Inputs of one call over ``[uncond × V] [cond × V]`` (or the cond rows only), and its row plan."""
        V, B = conds.shape[:2]
        parts = 2 if with_uncond else 1
        reps = [1] * (x.dim() - 1)
        x_in = x.repeat(parts * V, *reps)
        sigma_in = sigma.repeat(parts * V)
        cond_rows = _flat_rows(conds)
        if with_uncond:
            cond_rows = _cat_rows([_flat_rows(unconds), cond_rows])
        self.call_uncond_rows = V * B if with_uncond else 0
        return x_in, sigma_in, cond_rows, self.plan.row_plan(B, uncond=with_uncond, cond=True)

    def grad_memory_mode(self) -> tuple[bool, bool]:
        """``(per_variant, checkpoint)`` of ``settings.grad_memory`` (see `resolve_grad_memory`)."""
        return resolve_grad_memory(self.settings.grad_memory, self.unet)

    def _grad_pass(self, x, sigma, unconds, conds, model, *, full: bool):
        """One forward with gradient to the latent; the loss on its maps and its gradient.

        The rows are the ones the maps need: uncond and cond rows (``maps_from = "both"``, with uncond rows) or cond
        rows only; all rows when ``full`` (the prediction is wanted).  ``full`` passes run to the end with autograd
        switched off after the last H/32 layer; the others stop there.  ``settings.grad_memory`` chooses how the
        gradient is computed (one pass over all rows, or a no-grad pass then one gradient pass per variant, each
        with or without recomputation; the same gradient up to float rounding).  Returns (loss, grad, out, flat
        maps), the loss a detached 0-d tensor, the last two None unless ``full``."""
        V, B = conds.shape[:2]
        has_uncond = unconds is not None
        with_uncond = has_uncond and (full or self.settings.maps_from == "both")
        per_variant, checkpoint = self.grad_memory_mode()
        host = self.grad_context() if self.grad_context is not None else contextlib.nullcontext()
        with host, self._hooks(), self._gradient_mode(), recomputing(self.unet, checkpoint), torch.enable_grad():
            # clones: the host's tensors may be inference tensors, which autograd cannot save
            xg = x.detach().clone().requires_grad_(True)
            x_in, sigma_in, cond_in, plan = self._rows(
                xg, sigma.detach().clone(), unconds.detach().clone() if with_uncond else None, conds.detach().clone(),
                with_uncond=with_uncond,
            )
            if checkpoint and not per_variant:
                self._learn_layer_order(x_in, sigma_in, cond_in, plan, model, B, with_uncond)
            if per_variant:
                loss, grad, out, flat = self._per_variant_grad(xg, x_in, sigma_in, cond_in, plan, model, B,
                                                               with_uncond, full)
            else:
                self.rows.plan = plan
                self.capture.reset()
                self.capture.configure(size=self.map_size, grad=True, stop_after_last=not full, grad_until_last=full)
                out = self.capture.run(model, x_in, sigma_in, cond_in)
                flat = self._maps()
                loss = self._loss_from_maps(self._variant_maps(flat, B, with_uncond))
                (grad,) = torch.autograd.grad(loss, xg)
        self.capture.reset()
        self.capture.configure(grad_until_last=False)
        if not full:
            return loss.detach(), grad, None, None
        if out is None:
            raise RuntimeError("The UNet pass stopped before its output")
        return loss.detach(), grad, out.detach(), flat.detach()

    def _learn_layer_order(self, x_in, sigma_in, cond_in, plan, model, B, with_uncond):
        """Before the first recomputed gradient pass (while the H/32 layers' order is unknown, that pass could
        neither stop nor drop autograd after the last of them): one no-grad pass over the first variant's first
        ``B`` rows records it (a whole chunk of the host's batch: hosts such as Forge label model calls in chunks of
        the batch size, cond or uncond)."""
        self.capture.configure(size=self.map_size)
        if self.capture.known_order is not None:
            return
        uncond_rows = self.call_uncond_rows
        with torch.no_grad():
            self.rows.plan = RowPlan.from_lists(plan.rows[:B])
            self.call_uncond_rows = B if with_uncond else 0
            self.capture.reset()
            self.capture.configure(grad=False, stop_after_last=False, grad_until_last=False)
            self.capture.run(model, x_in[:B].detach(), sigma_in[:B], cond_in[:B])
        self.capture.reset()
        self.call_uncond_rows = uncond_rows

    def _per_variant_grad(self, xg, x_in, sigma_in, cond_in, plan, model, B, with_uncond, full):
        """``grad_memory = "per_variant"``: the batched pass's gradient with one variant's rows alive at a time.

        Phase 1: one no-grad pass over all rows (to the end when ``full``, for the prediction; else stopped after the
        last H/32 layer) gives every variant's maps; the loss on them and dL/dmaps.  Phase 2: for each variant, a
        gradient pass over its rows stopped after the last H/32 layer, and ``backward(maps_v, dL/dmaps_v)``, which
        accumulates into the latent's gradient (the chain rule split over the rows: the maps of a row depend on the
        latent through that row alone)."""
        V = self.plan.n_variants
        parts = 2 if with_uncond else 1
        with torch.no_grad():
            self.rows.plan = plan
            self.capture.reset()
            self.capture.configure(size=self.map_size, grad=False, stop_after_last=not full, grad_until_last=False)
            out = self.capture.run(model, x_in.detach(), sigma_in, cond_in)
            flat = self._maps()
        maps = flat.detach().requires_grad_(True)
        loss = self._loss_from_maps(self._variant_maps(maps, B, with_uncond))
        (grad_maps,) = torch.autograd.grad(loss, maps)
        self.capture.configure(grad=True, stop_after_last=True, grad_until_last=False)
        for v in range(V):
            idx = [r for part in range(parts) for r in range((part * V + v) * B, (part * V + v + 1) * B)]
            ix = torch.tensor(idx, device=x_in.device)
            self.rows.plan = RowPlan.from_lists([plan.rows[i] for i in idx])
            self.call_uncond_rows = B if parts == 2 else 0
            self.capture.reset()
            self.capture.run(model, x_in[ix], sigma_in[ix], cond_in[ix])
            torch.autograd.backward(self._maps(), grad_maps[ix].to(flat.dtype))
        self.rows.plan = plan
        self.call_uncond_rows = (V * B) if with_uncond else 0
        grad = xg.grad if xg.grad is not None else torch.zeros_like(xg)
        return loss, grad, out, flat

    def _optimise_latent(self, x, sigma, unconds, conds, model, step: int) -> None:
        iters = 1 + (self.settings.refine_iters if step in self._refine else 0)
        keep_prediction = not self.settings.predict_after_update
        record = StepRecord(step=step, sigma=float(sigma.flatten()[0]), loss_before=float("nan"), iterations=0)
        self._pending = None
        self.history.append(record)
        for i in range(iters):
            if i > 0 and self.should_stop():
                break
            # The prediction handed on is the last pass's, so only the last pass needs to run the whole UNet.
            full = keep_prediction and i == iters - 1
            loss_t, grad, out, flat = self._grad_pass(x, sigma, unconds, conds, model, full=full)
            loss = float(loss_t)
            if i == 0:
                record.loss_before = loss
            record.losses.append(loss)
            if not (math.isfinite(loss) and _finite(grad)):
                raise NonFiniteError(
                    f"The contrastive loss or its gradient at step {step + 1} is not finite (NaN or inf), so the "
                    "latent cannot be updated. Check the image without CLoRA; if that is fine, lower the step size "
                    "or the LoRA weights."
                )
            before = x.detach().clone() if full else None
            x.copy_(latent_step(x, grad, self.settings.step_size, sigma=sigma, space=self.space))
            if not _finite(x):
                raise NonFiniteError(
                    f"The latent after the contrastive update at step {step + 1} is not finite (NaN or inf). "
                    "Lower the step size."
                )
            record.iterations += 1
            if full:
                u, c = self._fuse(out, flat, x, step, conds.shape[1], unconds is not None)
                self._pending = {"step": step, "x": before, "u": u, "c": c}

    def _fused_pass(self, x, sigma, unconds, conds, model, step):
        B = conds.shape[1]
        has_uncond = unconds is not None
        x_in, sigma_in, cond_in, plan = self._rows(x.detach(), sigma, unconds, conds, with_uncond=has_uncond)
        with self._hooks(), torch.no_grad():
            self.rows.plan = plan
            self.capture.reset()
            self.capture.configure(size=self.map_size, grad=False, stop_after_last=False, grad_until_last=False)
            batched = self.batched if self.batched is not None else x.device.type != "cpu"
            if batched:
                out = self.capture.run(model, x_in, sigma_in, cond_in)
                flat_maps = self._maps()
            else:
                out, flat_maps = self._per_variant_calls(x_in, sigma_in, cond_in, model, B, 2 if has_uncond else 1)
            self.capture.reset()
        if self.history and self.history[-1].step == step and self.history[-1].loss_after is None:
            # this pass runs on the updated latent with the gradient passes' LoRAs: the loss after the update
            maps = self._variant_maps(flat_maps, B, has_uncond)
            self.history[-1].loss_after = float(self._loss_from_maps(maps))
        return self._fuse(out, flat_maps, x, step, B, has_uncond)

    def _fuse(self, out, flat_maps, x, step, B, has_uncond):
        """Masks from the maps of one pass over all rows, and the masked average of its predictions."""
        V = self.plan.n_variants
        maps = self._variant_maps(flat_maps, B, has_uncond)
        if self.fixed_masks is not None:
            fm = self.fixed_masks.flatten(0, 1).float()
            masks = torch.nn.functional.interpolate(fm, size=tuple(x.shape[-2:]), mode="nearest")
            masks = masks.reshape(*self.fixed_masks.shape[:3], *x.shape[-2:]).to(x.device)
        else:
            masks = fusion_masks(
                maps,
                self.plan.mask_tokens,
                threshold=self.settings.mask_threshold,
                morphology=self.settings.mask_morphology,
                size=tuple(x.shape[-2:]),
            )  # (B, V, 1, H, W)
        if step < self._mask_start:
            masks = torch.ones_like(masks)
        self.last_maps = maps.detach()
        self.last_masks = masks.detach()
        self.step_ious.append((step, concept_iou(masks)))
        self._maps_seen += 1
        if self.mean_maps is None or self.mean_maps.shape != maps.shape:
            self.mean_maps = maps.detach().clone()
            self._maps_seen = 1
        else:
            self.mean_maps += (maps.detach() - self.mean_maps) / self._maps_seen

        self._check_predictions(out, V, B, has_uncond, step)
        m = masks.transpose(0, 1).to(out.dtype)  # (V, B, 1, H, W)
        n = V * B
        preds_c = out[n:] if has_uncond else out
        fused_c = fuse(preds_c.reshape(V, B, *out.shape[1:]), m)
        fused_u = fuse(out[:n].reshape(V, B, *out.shape[1:]), m) if has_uncond else None
        return fused_u, fused_c


    def variant_name(self, v: int) -> str:
        """How messages name variant ``v``: the base prompt, or the prompt of binding ``v``'s LoRA."""
        if v == 0:
            return "the base prompt (no subject LoRA)"
        bindings = self.settings.bindings
        if v - 1 < len(bindings):
            return f"the prompt of LoRA '{bindings[v - 1].lora}'"
        return f"variant {v}"

    def _check_predictions(self, out: torch.Tensor, V: int, B: int, has_uncond: bool, step: int) -> None:
        """Raise `NonFiniteError` naming the variants whose predictions (rows ``[uncond × V] [cond × V]``) are NaN
        or infinite: a black image is never the answer."""
        if _finite(out):
            return
        parts = (("negative prompt", out[: V * B]), ("prompt", out[V * B:])) if has_uncond else (("prompt", out),)
        bad = []
        for kind, rows in parts:
            for v in range(V):
                if not _finite(rows[v * B:(v + 1) * B]):
                    name = self.variant_name(v)
                    bad.append(name if kind == "prompt" else f"{name}, negative prompt")
        raise NonFiniteError(
            f"The UNet's prediction at step {step + 1} is not finite (NaN or inf) for {'; '.join(bad)}. "
            "CLoRA stopped instead of returning a black image. Check the image without CLoRA (a half-precision "
            "model may need --no-half or upcast attention); otherwise lower that LoRA's weight."
        )


def resolve_grad_memory(setting: str, unet: Optional[torch.nn.Module]) -> tuple[bool, bool]:
    """``(per_variant, checkpoint)`` for a ``grad_memory`` setting.

    ``"auto"`` is ``"batched"`` for UNets without a vector conditioning (SD1, SD2) and `GRAD_MEMORY_AUTO_LARGE` for
    those with one (a ``label_emb``: SDXL), whose 1024² gradient pass over all rows does not fit a consumer card
    (bench/sdxl_memory.py).  Recomputation needs the UNet (``unet=None``: no recomputation)."""
    if setting == "auto":
        setting = GRAD_MEMORY_AUTO_LARGE if getattr(unet, "label_emb", None) is not None else "batched"
    per_variant = setting in ("per_variant", "per_variant_checkpoint")
    checkpoint = setting in ("checkpoint", "per_variant_checkpoint") and unet is not None
    return per_variant, checkpoint


def build_compose_plan(
    groups: Sequence[Sequence[Sequence[int]]],
    mask_tokens: Sequence[Sequence[int]],
    settings: CloraSettings,
) -> ComposePlan:
    """Per-variant LoRA lists from the settings: binding k is LoRA index k (variant k+1); style s is index K+s.

    A "whole" style LoRA goes on every variant's rows (base included); a "subjects" style LoRA only on the variants
    of the bindings whose subjects it names.  The uncond rows carry the same LoRAs when ``lora_on_uncond`` is set
    (the authors' behaviour), else only the style LoRAs.
    """
    K = len(settings.bindings)
    V = K + 1
    cond: list[list[tuple[int, float]]] = [[] for _ in range(V)]
    styles: list[list[tuple[int, float]]] = [[] for _ in range(V)]
    for k, b in enumerate(settings.bindings):
        cond[k + 1].append((k, float(b.weight)))
    for s, style in enumerate(settings.styles):
        idx = K + s
        if style.mode == "whole":
            targets = range(V)
        else:
            named = {w.lower() for w in style.subjects}
            targets = [k + 1 for k, b in enumerate(settings.bindings) if named & {w.lower() for w in b.subjects}]
        for v in targets:
            styles[v].append((idx, float(style.weight)))
    cond_rows = [c + s for c, s in zip(cond, styles)]
    uncond_rows = cond_rows if settings.lora_on_uncond else styles
    return ComposePlan(
        groups=[[list(t) for t in g] for g in groups],
        mask_tokens=[list(t) for t in mask_tokens],
        cond_loras=cond_rows,
        uncond_loras=[list(r) for r in uncond_rows],
    )
