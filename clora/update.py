"""The latent update of CLoRA expressed in the sampler's own variable.

The paper updates the noisy latent ``z_t`` by one gradient step, ``z_t ← z_t − α ∇_z L``.  The samplers hold
different variables:

* k-diffusion samplers (Euler, DPM++ ... through ``CompVisDenoiser``) hold ``x = z_t · sqrt(1 + σ²)``: the UNet
  sees ``z_t = x · c_in`` with ``c_in = 1 / sqrt(σ² + 1)``.  Since ``L`` depends on ``x`` only through ``z = c_in x``,
  the chain rule gives ``∇ₓL = c_in ∇_z L``.  The z-space step ``z' = z − α ∇_z L`` maps back to
  ``x' = z' / c_in = x − (α / c_in) ∇_z L = x − (α / c_in²) ∇ₓL = x − α (1 + σ²) ∇ₓL``.
* eps-space samplers (A1111's DDIM, PLMS, UniPC) hold ``z_t`` itself (``c_in = 1``): ``x' = x − α ∇ₓL``.

So one function covers both: ``x − α · s · ∇ₓL`` with ``s = 1 + σ²`` (``space="k"``) or ``s = 1`` (``space="eps"``).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["latent_step", "step_scale"]

Sigma = Union[float, torch.Tensor]


def step_scale(sigma: Optional[Sigma], space: str, like: torch.Tensor) -> Union[float, torch.Tensor]:
    """The factor ``s`` multiplying ``α ∇ₓL``: ``1 + σ²`` for ``space="k"``, ``1`` for ``space="eps"``.

    A tensor ``sigma`` of shape (B,) is broadcast over the trailing dimensions of ``like`` (B, ...).
    """
    if space == "eps":
        return 1.0
    if space != "k":
        raise ValueError(f"Unknown latent space {space!r}; use 'k' (k-diffusion x) or 'eps' (z_t itself).")
    if sigma is None:
        raise ValueError("A k-diffusion latent step needs the current sigma.")
    if isinstance(sigma, torch.Tensor):
        s = sigma.to(device=like.device, dtype=like.dtype)
        if s.dim() == 1 and like.dim() > 1 and s.shape[0] == like.shape[0]:
            s = s.reshape(-1, *([1] * (like.dim() - 1)))
        return 1.0 + s * s
    return 1.0 + float(sigma) ** 2


def latent_step(
    x: torch.Tensor, grad: torch.Tensor, alpha: float, sigma: Optional[Sigma] = None, space: str = "k"
) -> torch.Tensor:
    """The sampler-space latent after a z-space gradient step of size ``alpha``.

    x: the sampler's latent; grad: ``∇ₓL`` (gradient with respect to that same ``x``); sigma: the current noise level
    (float or (B,) tensor; needed for ``space="k"``).  See the module docstring for the derivation.
    """
    if grad.shape != x.shape:
        raise ValueError(f"The latent has shape {tuple(x.shape)} but its gradient has shape {tuple(grad.shape)}.")
    return x - alpha * step_scale(sigma, space, x) * grad
