"""Capture cross-attention probabilities from an ldm-style UNet, differentiably, without touching its attention.

The host keeps its own attention implementation (SDPA, xformers, sub-quadratic ...).  A read-only forward hook on
each cross-attention module recomputes ``q = to_q(x)`` and ``k = to_k(context)`` for the layers whose query length
matches the requested map size and stores ``softmax(q kᵀ · scale)`` averaged over heads.  The module's output is
never replaced.

Cross-attention modules are found by structure: a submodule whose own name is ``attn2`` and which has ``to_q``,
``to_k`` and an integer ``heads`` (ldm's ``CrossAttention`` and ``MemoryEfficientCrossAttention`` inside
``BasicTransformerBlock``, and their look-alikes in other trees).

Early stop: a gradient pass only needs the UNet up to the last layer at the map resolution.  The first complete
pass run through :meth:`AttentionCapture.run` records which layers fired in which order; afterwards, with
``stop_after_last=True``, the hook of the last of them raises a private exception that :meth:`AttentionCapture.run`
catches, so the rest of the UNet never runs.  With ``grad_until_last=True`` instead, the pass runs to the end (its
output is wanted) but autograd is switched off after the last layer, so the rest of the UNet keeps no activations
for a backward pass that would never reach them; :meth:`AttentionCapture.run` restores the grad mode on exit.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

__all__ = [
    "attention_probs", "find_cross_attention", "AttentionCapture", "no_checkpointing", "recomputing",
    "recompute_units", "map_size", "UNET_PARTS", "unet_part", "NoMapsError",
]


class NoMapsError(RuntimeError):
    """No cross-attention map was captured in a pass (no layer at the map size, or none among the chosen parts)."""


#: Parts of the UNet whose cross-attention layers (at the map size) `AttentionCapture` may be limited to, by the
#: first component of the layer's name (ldm/sgm/Forge names; diffusers' names as well).
UNET_PARTS = {
    "down": ("input_blocks", "down_blocks"),
    "mid": ("middle_block", "mid_block"),
    "up": ("output_blocks", "up_blocks"),
}


def unet_part(name: str) -> Optional[str]:
    """``"down"``, ``"mid"`` or ``"up"`` for a qualified layer name of a UNet, ``None`` when its name says neither."""
    head = name.split(".", 1)[0]
    return next((part for part, heads in UNET_PARTS.items() if head in heads), None)


class _StopForward(BaseException):
    """Raised by a capture hook to abandon the rest of a forward pass.

    A ``BaseException`` so that host code with a broad ``except Exception`` cannot swallow it on the way up to
    :meth:`AttentionCapture.run`.
    """


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, scale: Optional[float] = None) -> torch.Tensor:
    """``softmax(q kᵀ · scale)`` per head, averaged over heads.

    q: (B, N, heads·d); k: (B, T, heads·d) (a batch of 1 broadcasts); scale defaults to ``d ** -0.5``.
    Returns (B, N, T).  Half-precision inputs are computed and returned in float32.  Differentiable.
    """
    if q.shape[-1] != k.shape[-1] or q.shape[-1] % heads:
        raise ValueError(
            f"Cannot split query width {q.shape[-1]} and key width {k.shape[-1]} into {heads} attention heads."
        )
    d = q.shape[-1] // heads
    if scale is None:
        scale = d**-0.5
    if q.dtype in (torch.float16, torch.bfloat16):
        q, k = q.float(), k.float()
    qh = q.reshape(q.shape[0], q.shape[1], heads, d).transpose(1, 2)  # (B, h, N, d)
    kh = k.reshape(k.shape[0], k.shape[1], heads, d).transpose(1, 2)  # (B, h, T, d)
    sim = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    return sim.softmax(dim=-1).mean(dim=1)


def map_size(latent_hw: "tuple[int, int] | torch.Size", downscale: int) -> tuple[int, int]:
    """(h, w) of the attention maps for a latent of ``latent_hw``: the UNet's level ``downscale`` times smaller, whose
    size is ``ceil`` of the latent's (each stride-2 convolution with padding 1 rounds up), as in the UNet itself."""
    h, w = (int(latent_hw[0]), int(latent_hw[1]))
    return (max(1, -(-h // downscale)), max(1, -(-w // downscale)))


def _is_cross_attention(name: str, module: nn.Module) -> bool:
    return (
        name.rsplit(".", 1)[-1] == "attn2"
        and isinstance(getattr(module, "to_q", None), nn.Module)
        and isinstance(getattr(module, "to_k", None), nn.Module)
        and isinstance(getattr(module, "heads", None), int)
    )


def find_cross_attention(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every cross-attention module in ``model``, in registration order."""
    return [(name, mod) for name, mod in model.named_modules() if _is_cross_attention(name, mod)]


class AttentionCapture:
    """Context manager that records cross-attention maps of ``model`` at one resolution.

    Typical use (one pass)::

        with AttentionCapture(unet) as cap:
            cap.configure(size=(8, 8), grad=True, stop_after_last=True)
            cap.reset()
            cap.run(unet, x, t, context=c)        # None when stopped early
            maps = cap.maps()                     # (B, 8, 8, T), mean over the captured layers

    Settings persist between passes; :meth:`reset` clears the stored maps.  Maps are averaged over heads within a
    layer, then over layers (equal to the mean over all (layer, head) pairs when every layer has the same number of
    heads, as in SD1.x).  Hooks are registered on entry and removed on exit, whatever ends the block.
    """

    def __init__(self, model: nn.Module) -> None:
        self._targets = find_cross_attention(model)
        if not self._targets:
            raise ValueError(
                f"No cross-attention layers were found in {type(model).__name__}: expected submodules named 'attn2' "
                "with to_q, to_k and heads."
            )
        self._handles: list[Any] = []
        self._size: Optional[tuple[int, int]] = None
        self._grad = False
        self._stop_after_last = False
        self._grad_until_last = False
        self._grad_mode_saved: Optional[bool] = None
        self._enabled = True
        self._store: list[torch.Tensor] = []
        self._names: list[str] = []
        self._pass_names: list[str] = []
        self._order: Optional[tuple[str, ...]] = None
        self._order_size: Optional[tuple[int, int]] = None
        self._in_run = False
        self._parts: Optional[frozenset[str]] = None  # None: every part

    # ----- context management -------------------------------------------------------------------------------------
    def __enter__(self) -> "AttentionCapture":
        if self._handles:
            raise RuntimeError("This AttentionCapture is already active; use one `with` block at a time.")
        try:
            for name, module in self._targets:
                self._handles.append(module.register_forward_hook(self._make_hook(name), with_kwargs=True))
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove_hooks()
        self._in_run = False

    def _remove_hooks(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    # ----- settings -----------------------------------------------------------------------------------------------
    def configure(
        self,
        size: Optional[tuple[int, int]] = None,
        grad: Optional[bool] = None,
        stop_after_last: Optional[bool] = None,
        enabled: Optional[bool] = None,
        grad_until_last: Optional[bool] = None,
        parts: Optional[Iterable[str]] = None,
    ) -> None:
        """Change the settings given (others keep their value).

        size: ``(h, w)`` of the maps to capture; layers whose query length is ``h·w`` are captured.
        grad: keep the autograd graph to the input (otherwise maps are computed under ``no_grad``).
        stop_after_last: inside :meth:`run`, abandon the forward after the last layer at ``size`` (known once a
                         complete pass at that size has run through :meth:`run`).
        enabled: capture at all.
        grad_until_last: inside :meth:`run`, switch autograd off after the last layer at ``size`` (the pass still
                         completes; known once a complete pass at that size has run through :meth:`run`).
        parts: capture only layers of these parts of the UNet (keys of `UNET_PARTS`); ``"all"`` (or every part):
               no limit.  Raises ``ValueError`` when none of the model's cross-attention layers is in them.
        """
        if size is not None:
            h, w = (int(size[0]), int(size[1]))
            if h <= 0 or w <= 0:
                raise ValueError(f"The attention map size must be positive, got {size}.")
            self._size = (h, w)
        if grad is not None:
            self._grad = bool(grad)
        if stop_after_last is not None:
            self._stop_after_last = bool(stop_after_last)
        if enabled is not None:
            self._enabled = bool(enabled)
        if grad_until_last is not None:
            self._grad_until_last = bool(grad_until_last)
        if parts is not None:
            chosen = frozenset(parts) if not isinstance(parts, str) else frozenset((parts,))
            if "all" in chosen or chosen >= frozenset(UNET_PARTS):
                new_parts = None
            else:
                unknown = sorted(chosen - set(UNET_PARTS))
                if unknown:
                    raise ValueError(f"Unknown UNet part(s) {', '.join(unknown)}; expected {', '.join(UNET_PARTS)}.")
                if not any(unet_part(name) in chosen for name, _ in self._targets):
                    raise ValueError(
                        f"This UNet has no cross-attention layers in its {' or '.join(sorted(chosen))} part "
                        "(its layer names do not say which part they belong to)."
                    )
                new_parts = chosen
            if new_parts != self._parts:
                self._parts = new_parts
                self._order = self._order_size = None  # the last layer changes with the parts

    @property
    def parts(self) -> Optional[frozenset[str]]:
        """The UNet parts captured (``None``: all)."""
        return self._parts

    @property
    def size(self) -> Optional[tuple[int, int]]:
        return self._size

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Qualified names of the layers captured since the last :meth:`reset`, in firing order."""
        return tuple(self._names)

    @property
    def known_order(self) -> Optional[tuple[str, ...]]:
        """The layers at the current size recorded by the last complete :meth:`run`, or ``None``."""
        return self._order if self._order_size == self._size else None

    def reset(self) -> None:
        """Forget the captured maps (call between passes)."""
        self._store = []
        self._names = []

    # ----- passes -------------------------------------------------------------------------------------------------
    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn(*args, **kwargs)``; return its result, or ``None`` when the pass was stopped early.

        A pass that completes records the order of the layers it captured, which enables early stopping later.
        """
        self._pass_names = []
        self._in_run = True
        self._grad_mode_saved = torch.is_grad_enabled()
        try:
            out = fn(*args, **kwargs)
        except _StopForward:
            return None
        finally:
            self._in_run = False
            torch.set_grad_enabled(self._grad_mode_saved)
            self._grad_mode_saved = None
        if self._size is not None and self._enabled:
            self._order = tuple(self._pass_names)
            self._order_size = self._size
        return out

    def maps(self) -> torch.Tensor:
        """Mean over the captured layers: (B, h, w, T)."""
        if not self._store:
            size = "x".join(map(str, self._size)) if self._size else "(no size set)"
            if self._parts is not None:
                raise NoMapsError(
                    f"No cross-attention layer of the UNet's {' / '.join(sorted(self._parts))} part runs at the "
                    f"attention-map size {size} in this model; choose other attention layers (e.g. all)."
                )
            raise NoMapsError(f"No cross-attention maps were captured at {size}; did a UNet pass run inside the capture?")
        shapes = {tuple(m.shape) for m in self._store}
        if len(shapes) > 1:
            raise RuntimeError(
                f"The captured attention maps have different shapes {sorted(shapes)}; call reset() between passes."
            )
        if len(self._store) == 1:
            return self._store[0]
        return torch.stack(self._store).mean(dim=0)

    def layer_maps(self) -> list[tuple[str, torch.Tensor]]:
        """Each captured layer's map, ``(qualified name, (B, h, w, T) averaged over heads)``, in firing order."""
        return list(zip(self._names, self._store))

    # ----- the hook -----------------------------------------------------------------------------------------------
    def _make_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            self._on_forward(name, module, args, kwargs)

        return hook

    def _on_forward(self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._enabled or self._size is None:
            return
        x = args[0] if args else kwargs.get("x")
        context = kwargs["context"] if "context" in kwargs else (args[1] if len(args) > 1 else None)
        if not isinstance(x, torch.Tensor) or not isinstance(context, torch.Tensor) or x.dim() != 3:
            return
        h, w = self._size
        if x.shape[1] != h * w:
            return
        if self._parts is not None and unet_part(name) not in self._parts:
            return
        scale = getattr(module, "scale", None)
        if self._grad:
            probs = attention_probs(module.to_q(x), module.to_k(context), module.heads, scale)
        else:
            with torch.no_grad():
                probs = attention_probs(module.to_q(x), module.to_k(context), module.heads, scale).detach()
        self._store.append(probs.reshape(probs.shape[0], h, w, probs.shape[-1]))
        self._names.append(name)
        self._pass_names.append(name)
        order = self.known_order
        if self._in_run and order and len(self._pass_names) == len(order) and name == order[-1]:
            if self._stop_after_last:
                raise _StopForward()
            if self._grad_until_last:
                torch.set_grad_enabled(False)  # restored by run()


_CHECKPOINT_FLAGS = ("checkpoint", "use_checkpoint")


@contextmanager
def no_checkpointing(model: nn.Module) -> Iterator[None]:
    """Turn ldm gradient checkpointing off inside the block; restore every flag's exact previous value on exit.

    ldm runs a block under its own ``CheckpointFunction`` when ``BasicTransformerBlock.checkpoint`` (set from
    ``SpatialTransformer``'s ``use_checkpoint``) or ``ResBlock.use_checkpoint`` is true; such a block's forward runs
    without grad, so attention captured inside it carries no gradient.  Every boolean instance attribute named
    ``checkpoint`` or ``use_checkpoint`` in the tree is set to ``False``.  (ldm's legacy ``AttentionBlock``
    checkpoints unconditionally; SD's spatial-transformer UNets do not use it.)
    """
    saved: list[tuple[nn.Module, str, bool]] = []
    try:
        for module in model.modules():
            for attr in _CHECKPOINT_FLAGS:
                value = module.__dict__.get(attr)
                if isinstance(value, bool):
                    saved.append((module, attr, value))
                    setattr(module, attr, False)
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


def recompute_units(model: nn.Module) -> list[nn.Module]:
    """The modules `recomputing` wraps: the innermost ones carrying a boolean ``checkpoint`` / ``use_checkpoint``
    instance attribute (ldm's and Forge's ``ResBlock`` and ``BasicTransformerBlock``, the units ldm itself would
    checkpoint; not the UNet or a ``SpatialTransformer``, which contain such units)."""
    flagged = [
        (name, m) for name, m in model.named_modules()
        if any(isinstance(m.__dict__.get(attr), bool) for attr in _CHECKPOINT_FLAGS)
    ]
    names = [name for name, _ in flagged]

    def contains(outer: str, inner: str) -> bool:
        return outer != inner and (outer == "" or inner.startswith(outer + "."))

    return [m for name, m in flagged if not any(contains(name, other) for other in names)]


@contextmanager
def recomputing(model: Optional[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Inside the block, every unit of `recompute_units` runs under ``torch.utils.checkpoint`` (non-reentrant) while
    autograd is on: it keeps only its inputs for the backward pass and runs again during it.  The units' own
    ``forward`` is restored exactly on exit.

    The recomputation runs the forward hooks again, the capture's included: an `AttentionCapture` stores the
    recomputed maps once more (call ``reset()`` after the backward pass) but, outside ``run``, never stops a pass
    or switches autograd off.  Non-reentrant checkpointing keeps the gradient of tensors computed inside a unit
    that leave it by other ways than its output, as the captured maps do.  ``model=None`` or ``enabled=False``:
    nothing changes."""
    if model is None or not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    def wrap(forward: Callable[..., Any]) -> Callable[..., Any]:
        def fresh_inputs(*args: Any, **kwargs: Any) -> Any:
            # the checkpoint keeps the unit's inputs for the recomputation; units that add into their input in place
            # (Forge's transformer blocks: ``x += n``) get a copy, which nobody saved
            args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            return forward(*args, **kwargs)

        def checkpointed(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return checkpoint(fresh_inputs, *args, use_reentrant=False, **kwargs)

        return checkpointed

    patched: list[tuple[nn.Module, bool, Any]] = []
    try:
        for module in recompute_units(model):
            had = "forward" in module.__dict__
            patched.append((module, had, module.__dict__.get("forward")))
            module.forward = wrap(module.forward)
        yield
    finally:
        for module, had, value in reversed(patched):
            if had:
                module.forward = value
            else:
                del module.forward
