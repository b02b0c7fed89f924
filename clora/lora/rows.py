"""Per-row LoRA application: each LoRA acts on its own batch rows only, in one batched model call.

Hosts merge a LoRA into the weights, so every batch row sees it.  CLoRA needs one prompt variant per LoRA with that
LoRA alone active, and wants all variants in a single UNet (or text encoder) call.  This module does that with forward
hooks on the targeted ``nn.Linear`` / ``nn.Conv2d`` modules:

* `RowPlan` says, for each batch row, which LoRAs act on it and with which user weight
  (``row r -> ((lora_index, weight), ...)``; an empty tuple leaves the row untouched).
* `LoraRows` is a context manager.  On enter it registers one forward hook per target module and prepares each LoRA's
  factors once, in the module weight's dtype and device.  The hook adds, for every LoRA of the current plan that
  targets the module, ``weight * scale * ΔW x`` to that LoRA's rows only: the rows are gathered with ``index_select``
  (a view when they are consecutive), the low-rank product runs once per LoRA (never once per row; 1x1 convolutions
  run as matmuls) and the result is added back with ``index_add`` (out of place on the module output, so autograd
  reaches the input).  Modules whose `LoraModule.factors` is ``None`` (LoHa, LoKr, DoRA) use their dense ``ΔW``
  computed once on enter, applied as ``F.linear`` / ``F.conv2d`` with the layer's own convolution parameters.
* On exit (normal, exception, ``KeyboardInterrupt``) every hook is removed and every cache dropped.  Weights are never
  written, so the modules are exactly as they were.

Re-entrancy: a `LoraRows` that is active cannot be entered again, and no `LoraRows` can be entered on a module that
already carries the hooks of another active one (that would apply LoRAs twice): both raise `LoraError`.  Once a
context has exited it may be entered again.

Dtype: the factors are prepared in the module weight's dtype; if a call's input arrives in another dtype or on another
device (a host that casts weights to the input, as Forge does), a second copy is prepared for that dtype/device once and
kept until exit.  The delta is added in the output's dtype.  The per-row weight multiplies ``ΔW`` linearly (for DoRA
that is ``weight * (W_dora - W)``).

Limits: only ``nn.Linear`` and ``nn.Conv2d`` (and subclasses) whose forward is actually called; the ``out_proj`` of
``torch.nn.MultiheadAttention`` is refused because that module never calls it.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator, Optional, Protocol, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .dense import shape_problem
from .types import LoraError, LoraModule, is_conv2d, is_linear

__all__ = ["RowPlan", "RowGroup", "LoraRows", "Target", "targets_of"]

Target = tuple[nn.Module, int, LoraModule]
"""``(module, lora_index, lora_module)``: apply ``lora_module`` (of LoRA number ``lora_index``) to ``module``."""


class _Resolved(Protocol):
    """What `targets_of` needs of ``keymap.ResolvedLora``."""

    targets: list[tuple[str, str, nn.Module, LoraModule]]


def targets_of(resolved: Sequence[_Resolved], component: str) -> list[Target]:
    """`LoraRows` targets of one component (``"unet"`` or ``"text"``); LoRA ``i`` is ``resolved[i]``."""
    return [
        (module, index, lora)
        for index, item in enumerate(resolved)
        for comp, _path, module, lora in item.targets
        if comp == component
    ]


_RowSpec = Iterable[tuple[int, float]]


# --------------------------------------------------------------------------------------------------------------------
# Row plans
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowGroup:
    """The rows one LoRA acts on, as tensors ready for the hooks.

    rows: ``LongTensor`` of batch row indices (ascending).
    weights: per-row user weights in the compute dtype, shape ``(len(rows),)``; ``None`` when all are ``1.0``.
    span: ``(start, length)`` when the rows are consecutive (gathered by a view instead of a copy), else ``None``.
    """

    rows: torch.Tensor
    weights: Optional[torch.Tensor]
    span: Optional[tuple[int, int]] = None

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The group's rows of ``x`` (dim 0)."""
        if self.span is not None:
            return x.narrow(0, *self.span)
        return x.index_select(0, self.rows)


def _normalise_row(row: _RowSpec, r: int) -> tuple[tuple[int, float], ...]:
    """Validate one row's ``(lora_index, weight)`` pairs; repeated indices are summed (the delta is linear)."""
    summed: dict[int, float] = {}
    for item in row:
        try:
            index, weight = item
        except (TypeError, ValueError):
            raise LoraError(
                f"Row {r} of the LoRA row plan has {item!r}; expected (lora_index, weight) pairs."
            ) from None
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise LoraError(f"Row {r} of the LoRA row plan has LoRA index {index!r}; indices are integers >= 0.")
        weight = float(weight)
        if not math.isfinite(weight):
            raise LoraError(f"Row {r} of the LoRA row plan gives LoRA {index} the weight {weight}; it must be finite.")
        summed[index] = summed.get(index, 0.0) + weight
    return tuple(sorted(summed.items()))


@dataclass(frozen=True)
class RowPlan:
    """Which LoRAs act on which batch rows: ``rows[r]`` is a tuple of ``(lora_index, weight)``.

    Immutable; build it with `from_lists`, `empty`, `concat` / ``+`` and `repeat`.  `groups` turns it into per-LoRA
    index/weight tensors, cached per device and dtype on the plan itself.
    """

    rows: tuple[tuple[tuple[int, float], ...], ...]
    _cache: dict[tuple[torch.device, torch.dtype], dict[int, RowGroup]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        normalised = tuple(_normalise_row(row, r) for r, row in enumerate(self.rows))
        object.__setattr__(self, "rows", normalised)

    # ----- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_lists(cls, rows: Iterable[_RowSpec]) -> "RowPlan":
        """``RowPlan.from_lists([[(0, 1.0)], [], [(1, 0.8), (2, 0.5)]])``: one list of pairs per batch row."""
        return cls(tuple(tuple(row) for row in rows))

    @classmethod
    def empty(cls, n: int) -> "RowPlan":
        """``n`` rows that no LoRA touches (e.g. the unconditional rows)."""
        if n < 0:
            raise LoraError(f"A LoRA row plan cannot have {n} rows.")
        return cls(((),) * n)

    @classmethod
    def concat(cls, *plans: "RowPlan") -> "RowPlan":
        """The rows of ``plans`` one after the other (batch layout ``[plans[0] rows..., plans[1] rows..., ...]``)."""
        return cls(tuple(row for plan in plans for row in plan.rows))

    def repeat(self, n: int) -> "RowPlan":
        """This plan's rows ``n`` times over: ``[rows..., rows..., ...]`` (like ``Tensor.repeat`` on dim 0)."""
        if n < 0:
            raise LoraError(f"A LoRA row plan cannot be repeated {n} times.")
        return RowPlan(self.rows * n)

    def __add__(self, other: "RowPlan") -> "RowPlan":
        if not isinstance(other, RowPlan):
            return NotImplemented
        return RowPlan.concat(self, other)

    # ----- queries --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lora_indices(self) -> tuple[int, ...]:
        """The LoRA indices used by at least one row, ascending."""
        return tuple(sorted({index for row in self.rows for index, _ in row}))

    def groups(self, device: Union[torch.device, str], dtype: torch.dtype = torch.float32) -> dict[int, RowGroup]:
        """Per LoRA index: its rows and per-row weights as tensors on ``device`` (weights in ``dtype``). Cached."""
        key = (torch.device(device), dtype)
        cached = self._cache.get(key)
        if cached is None:
            with torch.inference_mode(False):  # index tensors a gradient pass may save (see _ModuleHook)
                cached = self._build_groups(*key)
            self._cache[key] = cached
        return cached

    def _build_groups(self, device: torch.device, dtype: torch.dtype) -> dict[int, RowGroup]:
        per_lora: dict[int, tuple[list[int], list[float]]] = {}
        for r, row in enumerate(self.rows):
            for index, weight in row:
                rows, weights = per_lora.setdefault(index, ([], []))
                rows.append(r)
                weights.append(weight)
        out: dict[int, RowGroup] = {}
        for index in sorted(per_lora):
            rows, weights = per_lora[index]
            w = None if all(v == 1.0 for v in weights) else torch.tensor(weights, dtype=dtype, device=device)
            span = (rows[0], len(rows)) if rows == list(range(rows[0], rows[0] + len(rows))) else None
            out[index] = RowGroup(rows=torch.tensor(rows, dtype=torch.long, device=device), weights=w, span=span)
        return out


# --------------------------------------------------------------------------------------------------------------------
# Preparing one LoRA module for one target
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    """Tensors of one entry in one dtype/device: factored ``(down, mid, up)`` (``up`` pre-scaled), or ``lazy``: a
    module whose update has no low-rank form (LoHa, LoKr, DoRA), its small tensors moved to the layer weight's
    device once; its full ``ΔW`` is computed inside each call and dropped after it (kept for every layer, those
    deltas would be the size of the targeted weights: GBs for an SDXL LoHa)."""

    down: Optional[torch.Tensor] = None
    mid: Optional[torch.Tensor] = None
    up: Optional[torch.Tensor] = None
    lazy: Optional[LoraModule] = None


def _module_kind(module: nn.Module, key: str) -> str:
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        raise LoraError(
            f"LoRA module {key} targets the out_proj of a torch MultiheadAttention, whose forward never calls it; "
            "per-row LoRA cannot reach it."
        )
    if is_linear(module):
        return "linear"
    if is_conv2d(module):
        return "conv"
    raise LoraError(
        f"LoRA module {key} targets a {type(module).__name__}; per-row LoRA supports Linear and Conv2d layers only."
    )


def _as_linear(t: torch.Tensor, key: str, name: str) -> torch.Tensor:
    """A 2-D factor; 1x1 conv-shaped factors ``(o, i, 1, 1)`` are flattened."""
    if t.dim() == 4 and t.shape[2:] == (1, 1):
        return t.flatten(1)
    if t.dim() != 2:
        raise LoraError(f"LoRA module {key} has a {name} of shape {tuple(t.shape)}, which does not fit a Linear layer.")
    return t


def _as_conv(t: torch.Tensor) -> torch.Tensor:
    """A 4-D conv factor; 2-D (Linear-shaped) factors become 1x1 kernels."""
    return t[:, :, None, None] if t.dim() == 2 else t


def _check_factors(
    module: nn.Module, kind: str, down: torch.Tensor, mid: Optional[torch.Tensor], up: torch.Tensor, key: str
) -> None:
    """Raise `LoraError` unless ``(down, mid, up)`` compose to a delta of ``module.weight``'s shape."""
    weight_shape = tuple(module.weight.shape)
    rank = down.shape[0]
    problem = None
    if up.shape[1] != (mid.shape[0] if mid is not None else rank):
        problem = f"up {tuple(up.shape)} does not follow {'mid' if mid is not None else 'down'}"
    elif mid is not None and mid.shape[1] != rank:
        problem = f"mid {tuple(mid.shape)} does not follow down {tuple(down.shape)}"
    elif up.shape[0] != weight_shape[0] or down.shape[1] != weight_shape[1]:
        problem = f"down {tuple(down.shape)} / up {tuple(up.shape)} do not match the layer weight {weight_shape}"
    elif kind == "conv":
        kernel = tuple(module.weight.shape[2:])
        mid_k = tuple(mid.shape[2:]) if mid is not None else (1, 1)
        if mid is not None and tuple(down.shape[2:]) != (1, 1):
            problem = f"down {tuple(down.shape)} must be 1x1 when a mid (CP) factor is present"
        elif tuple(up.shape[2:]) != (1, 1):
            problem = f"up {tuple(up.shape)} must be a 1x1 kernel"
        elif (mid_k if mid is not None else tuple(down.shape[2:])) != kernel:
            problem = f"its kernel does not match the layer's {kernel}"
        elif module.groups != 1:
            problem = f"the layer is a grouped convolution (groups={module.groups})"
    if problem is not None:
        raise LoraError(f"LoRA module {key} does not fit its layer: {problem}.")


def _prepare(module: nn.Module, lora: LoraModule, device: torch.device, dtype: torch.dtype) -> _Prepared:
    """The entry's tensors in ``dtype`` on ``device``, scale folded into ``up`` (dense deltas already carry it)."""
    kind = _module_kind(module, lora.key)
    factors = lora.factors()
    if factors is None:
        problem = shape_problem(lora, tuple(module.weight.shape))
        if problem is not None:
            raise LoraError(f"LoRA module {lora.key} does not fit its layer: {problem}.")
        dev = module.weight.device

        def moved(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else _normal(t.detach().to(device=dev))

        lazy = replace(lora, tensors={k: moved(v) for k, v in lora.tensors.items()}, dora_scale=moved(lora.dora_scale))
        return _Prepared(lazy=lazy)
    down, mid, up = (t.detach() if t is not None else None for t in factors)
    if kind == "linear":
        down, up = _as_linear(down, lora.key, "down"), _as_linear(up, lora.key, "up")
        if mid is not None:
            mid = _as_linear(mid, lora.key, "mid")
    else:
        down, up = _as_conv(down), _as_conv(up)
        mid = _as_conv(mid) if mid is not None else None
    _check_factors(module, kind, down, mid, up, lora.key)
    # fold the scale in (at least) float32, then cast once
    up = up.to(device=device, dtype=torch.promote_types(dtype, torch.float32)) * float(lora.scale)
    return _Prepared(
        down=_normal(down.to(device=device, dtype=dtype)),
        mid=_normal(mid.to(device=device, dtype=dtype)) if mid is not None else None,
        up=_normal(up.to(dtype=dtype)),
    )


def _normal(t: torch.Tensor) -> torch.Tensor:
    """A tensor autograd may save: a no-op ``.to()`` returns the file's own tensor, which is an inference tensor
    when the host loaded it under ``torch.inference_mode()``."""
    return t.clone() if t.is_inference() else t


# --------------------------------------------------------------------------------------------------------------------
# Delta computation (pure functions of a module's conv parameters and the prepared tensors)
# --------------------------------------------------------------------------------------------------------------------
def _pointwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution as one matmul (faster than a conv at rank width): ``(k, c, H, W) -> (k, o, H, W)``."""
    out = torch.matmul(weight.reshape(weight.shape[0], -1), x.flatten(2))
    return out.unflatten(2, tuple(x.shape[2:]))


def _is_pointwise(module: nn.Conv2d) -> bool:
    return (
        tuple(module.kernel_size) == (1, 1) and tuple(module.stride) == (1, 1) and module.groups == 1
        and (module.padding == "valid" or tuple(module.padding) == (0, 0))
    )


def _conv_spatial(x: torch.Tensor, weight: torch.Tensor, module: nn.Conv2d) -> torch.Tensor:
    """``weight`` applied with ``module``'s stride, padding (incl. padding mode), dilation and groups."""
    if _is_pointwise(module):
        return _pointwise(x, weight)
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return F.conv2d(x, weight, None, module.stride, 0, module.dilation, module.groups)
    return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)


def _scale_rows(h: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    if weights is None:
        return h
    return h * weights.to(h.dtype).view(-1, *([1] * (h.dim() - 1)))


def _delta(module: nn.Module, p: _Prepared, x: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """``weights[i] * ΔW x[i]`` for the gathered rows ``x`` (per-row weights applied at the cheapest point)."""
    dense = None
    if p.lazy is not None:
        dense = p.lazy.dense_delta(module.weight.detach()).to(device=x.device, dtype=x.dtype)
    if is_linear(module):
        if dense is not None:
            return F.linear(_scale_rows(x, weights), dense)
        h = _scale_rows(F.linear(x, p.down), weights)
        if p.mid is not None:
            h = F.linear(h, p.mid)
        return F.linear(h, p.up)
    if dense is not None:
        return _conv_spatial(_scale_rows(x, weights), dense, module)
    if p.mid is None:
        h = _conv_spatial(x, p.down, module)
    else:
        h = _conv_spatial(_pointwise(x, p.down), p.mid, module)
    return _pointwise(_scale_rows(h, weights), p.up)


# --------------------------------------------------------------------------------------------------------------------
# Hooks and the context manager
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    """One LoRA module on one target; ``prepared`` caches its tensors per (device, dtype)."""

    lora_index: int
    lora: LoraModule
    prepared: dict[tuple[torch.device, torch.dtype], _Prepared]


class _ModuleHook:
    """The single forward hook of one target module (all LoRAs targeting it)."""

    def __init__(self, owner: "LoraRows", module: nn.Module, entries: list[_Entry]):
        self.owner = owner
        self.entries = entries
        self.name = entries[0].lora.key
        self.is_conv = is_conv2d(module)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        plan = self.owner.plan
        if plan is None:
            return None
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            raise LoraError(f"Per-row LoRA on {self.name}: the layer was not called with a tensor.")
        if self.is_conv and x.dim() != 4:
            raise LoraError(
                f"Per-row LoRA on {self.name}: expected a batched (B, C, H, W) input, got shape {tuple(x.shape)}."
            )
        if x.dim() < 2 or x.shape[0] != len(plan):
            raise LoraError(
                f"The LoRA row plan has {len(plan)} rows but {self.name} was called with a batch of "
                f"{x.shape[0] if x.dim() else 0} rows; a per-row plan must match the batch exactly."
            )
        groups = plan.groups(x.device, x.dtype)
        result = output
        fresh = False  # True once `result` is our own tensor and may be added into in place
        for entry in self.entries:
            group = groups.get(entry.lora_index)
            if group is None:
                continue
            p = entry.prepared.get((x.device, x.dtype))
            if p is None:
                # normal tensors even when the host runs under inference mode (Forge), so a later gradient pass
                # may save them for backward
                with torch.inference_mode(False):
                    p = _prepare(module, entry.lora, x.device, x.dtype)
                entry.prepared[(x.device, x.dtype)] = p
            d = _delta(module, p, group.gather(x), group.weights).to(result.dtype)
            if fresh:
                result.index_add_(0, group.rows, d)
            else:
                result = result.index_add(0, group.rows, d)
                fresh = True
        return result if fresh else None


class LoraRows:
    """Context manager applying LoRAs to chosen batch rows through forward hooks.

    ``targets``: ``(module, lora_index, lora_module)`` triples; several LoRAs may target the same module, but one LoRA
    index may target a module once.  Use::

        with LoraRows(targets) as rows:
            rows.plan = RowPlan.from_lists([[], [(0, 1.0)], [(1, 0.8)]])
            eps = unet(x, t, context)            # row 1 sees LoRA 0, row 2 sees LoRA 1 at 0.8
            with rows.use(None):
                plain = unet(x, t, context)      # no plan: the hooks pass everything through

    With no plan the hooks change nothing.  A call whose batch size differs from the plan's row count raises
    `LoraError`.  See the module docstring for re-entrancy and dtype rules.
    """

    def __init__(self, targets: Sequence[Target]):
        self._targets: list[Target] = list(targets)
        self._plan: Optional[RowPlan] = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._active = False
        self._validate_targets()

    def _validate_targets(self) -> None:
        seen: dict[tuple[int, int], str] = {}
        for item in self._targets:
            try:
                module, index, lora = item
            except (TypeError, ValueError):
                raise LoraError(
                    f"A per-row LoRA target must be (module, lora_index, lora_module), got {item!r}."
                ) from None
            if not isinstance(lora, LoraModule):
                raise LoraError(f"A per-row LoRA target has {type(lora).__name__} where a LoraModule was expected.")
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise LoraError(f"LoRA module {lora.key} has LoRA index {index!r}; indices are integers >= 0.")
            _module_kind(module, lora.key)
            previous = seen.get((id(module), index))
            if previous is not None:
                raise LoraError(
                    f"LoRA {index} targets the same layer twice (modules {previous} and {lora.key}); "
                    "it would be applied twice."
                )
            seen[(id(module), index)] = lora.key

    # ----- plan -----------------------------------------------------------------------------------
    @property
    def plan(self) -> Optional[RowPlan]:
        """The plan for the following calls; ``None`` lets every call pass through unchanged."""
        return self._plan

    @plan.setter
    def plan(self, plan: Optional[RowPlan]) -> None:
        if plan is not None and not isinstance(plan, RowPlan):
            raise LoraError(f"A per-row LoRA plan must be a RowPlan or None, got {type(plan).__name__}.")
        self._plan = plan

    @contextmanager
    def use(self, plan: Optional[RowPlan]) -> Iterator["LoraRows"]:
        """Set ``plan`` for the calls inside the block, restoring the previous plan afterwards."""
        previous = self.plan
        self.plan = plan
        try:
            yield self
        finally:
            self.plan = previous

    @property
    def active(self) -> bool:
        return self._active

    @property
    def lora_indices(self) -> tuple[int, ...]:
        return tuple(sorted({index for _, index, _ in self._targets}))

    # ----- enter / exit ---------------------------------------------------------------------------
    def __enter__(self) -> "LoraRows":
        if self._active:
            raise LoraError("This per-row LoRA context is already active; it cannot be entered twice.")
        modules: dict[int, nn.Module] = {id(module): module for module, _, _ in self._targets}
        for module in modules.values():
            if any(isinstance(hook, _ModuleHook) for hook in module._forward_hooks.values()):
                key = next(lora.key for m, _, lora in self._targets if m is module)
                raise LoraError(
                    f"Layer {key} already carries per-row LoRA hooks of another active context; "
                    "nesting them would apply LoRAs twice."
                )
        by_module: dict[int, tuple[nn.Module, list[_Entry]]] = {}
        for module, index, lora in self._targets:  # prepare everything before the first hook is registered
            _, entries = by_module.setdefault(id(module), (module, []))
            key = (module.weight.device, module.weight.dtype)
            entries.append(_Entry(index, lora, {key: _prepare(module, lora, *key)}))
        try:
            for module, entries in by_module.values():
                hook = _ModuleHook(self, module, entries)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        except BaseException:
            self._remove_hooks()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        try:
            while self._handles:
                self._handles.pop().remove()
        finally:
            self._handles.clear()
            self._active = False
