"""Gradient passes inside hosts that sample under ``torch.inference_mode()`` (Forge).

Three things stop a backward pass there, and `inference_safe_gradients` undoes each for the duration of one pass:

1. inference mode itself — left with ``torch.inference_mode(False)``;
2. weights created (and LoRA-merged) under inference mode are *inference tensors*, which autograd may not save for
   backward — while a module runs with autograd on, each such parameter of it is replaced, in its ``_parameters``
   slot, by a normal copy, and the original object is put back when its forward ends (``.data`` assignment is
   refused for inference tensors).  Only autograd keeps a copy alive, and only while the backward pass needs it:
   under recomputation (`clora.attention.recomputing`) that is one unit's weights at a time, not the model's;
3. residual adds done in place (``x += n`` after ``n = norm(x)``) modify a tensor a LayerNorm saved for backward —
   every LayerNorm gets a forward pre-hook that hands it a copy of its input, so the in-place add touches a tensor
   nobody saved.

Everything is restored in ``finally``.  Memory: without recomputation, a copy of the weights of the layers the
gradient pass runs through (they are saved for its backward); with it, about one unit's.  Outside inference mode with normal weights the context is harmless and changes nothing.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["inference_safe_gradients"]


def _copy_input(module: nn.Module, args: tuple) -> tuple:
    if args and isinstance(args[0], torch.Tensor):
        return (args[0].clone(),) + tuple(args[1:])
    return args


def _normal_copy(param: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(param.detach().clone(), requires_grad=False)


@contextmanager
def inference_safe_gradients(model: nn.Module, protect_norm_inputs: bool = True) -> Iterator[None]:
    swapped: dict[int, list[tuple[nn.Module, str, torch.Tensor]]] = {}
    handles = []

    def swap_in(module: nn.Module, args: tuple) -> None:
        """Before the module runs with autograd on: normal copies of its inference parameters (only autograd keeps
        them, for as long as the backward pass needs them)."""
        if not torch.is_grad_enabled() or id(module) in swapped:
            return
        done = []
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_inference():
                module._parameters[name] = _normal_copy(param)
                done.append((module, name, param))
        swapped[id(module)] = done

    def swap_out(module: nn.Module, *_: object) -> None:
        for owner, name, param in reversed(swapped.pop(id(module), [])):
            owner._parameters[name] = param

    with torch.inference_mode(False):
        try:
            for module in model.modules():
                if any(p is not None and p.is_inference() for p in module._parameters.values()):
                    handles.append(module.register_forward_pre_hook(swap_in))
                    handles.append(module.register_forward_hook(swap_out, always_call=True))
                if protect_norm_inputs and isinstance(module, nn.LayerNorm):
                    handles.append(module.register_forward_pre_hook(_copy_input))
            yield
        finally:
            for h in handles:
                h.remove()
            for key in list(swapped):
                for owner, name, param in reversed(swapped.pop(key)):
                    owner._parameters[name] = param
