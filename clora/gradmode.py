"""Gradient passes inside hosts that sample under ``torch.inference_mode()`` (Forge).

Three things stop a backward pass there, and `inference_safe_gradients` undoes each for the duration of one pass:

1. inference mode itself — left with ``torch.inference_mode(False)``;
2. weights created (and LoRA-merged) under inference mode are *inference tensors*, which autograd may not save for
   backward — each such parameter is replaced, in its module's ``_parameters`` slot, by a normal copy, and the
   original object is put back afterwards (``.data`` assignment is refused for inference tensors);
3. residual adds done in place (``x += n`` after ``n = norm(x)``) modify a tensor a LayerNorm saved for backward —
   every LayerNorm gets a forward pre-hook that hands it a copy of its input, so the in-place add touches a tensor
   nobody saved.

Everything is restored in ``finally``; the copies are dropped at once (memory: one extra copy of the weights during
the pass).  Outside inference mode with normal weights the context is harmless and changes nothing.
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


@contextmanager
def inference_safe_gradients(model: nn.Module, protect_norm_inputs: bool = True) -> Iterator[None]:
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    handles = []
    with torch.inference_mode(False):
        try:
            for module in model.modules():
                for name, param in list(module._parameters.items()):
                    if param is not None and param.is_inference():
                        module._parameters[name] = nn.Parameter(param.detach().clone(), requires_grad=False)
                        swapped.append((module, name, param))
                if protect_norm_inputs and isinstance(module, nn.LayerNorm):
                    handles.append(module.register_forward_pre_hook(_copy_input))
            yield
        finally:
            for h in handles:
                h.remove()
            for module, name, param in reversed(swapped):
                module._parameters[name] = param
