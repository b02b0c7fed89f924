"""latent_step: a z-space gradient step expressed in k-diffusion's x (and eps-space samplers' z_t)."""
from __future__ import annotations

import math

import pytest
import torch

from clora.update import latent_step


def _loss(z: torch.Tensor) -> torch.Tensor:
    """A small differentiable, non-quadratic function of the latent (fixed random tiny network)."""
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(8, z.shape[1], generator=g, dtype=z.dtype)
    w2 = torch.randn(z.shape[1], 8, generator=g, dtype=z.dtype)
    h = torch.tanh(torch.einsum("oc,bchw->bohw", w1, z))
    return (torch.einsum("co,bohw->bchw", w2, h) * z).sum() + 0.3 * (z**2).sum()


def _kdiff_c_in(sigma: torch.Tensor) -> torch.Tensor:
    """c_in from k-diffusion's own CompVisDenoiser scalings when available, else the formula."""
    try:
        from k_diffusion.external import DiscreteEpsDDPMDenoiser
    except Exception:  # pragma: no cover - k-diffusion is in the dev stack
        return 1.0 / torch.sqrt(sigma**2 + 1.0)
    den = DiscreteEpsDDPMDenoiser(torch.nn.Identity(), torch.linspace(0.999, 0.01, 1000, dtype=torch.float64), False)
    _, c_in = den.get_scalings(sigma)
    return c_in


@pytest.mark.parametrize("sigma", [0.03, 0.5, 1.0, 3.7, 14.6])
@pytest.mark.parametrize("alpha", [0.1, 20.0])
def test_k_space_step_is_the_z_space_step(sigma: float, alpha: float) -> None:
    torch.manual_seed(1)
    z = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    s = torch.tensor(sigma, dtype=torch.float64)
    c_in = _kdiff_c_in(s)
    assert math.isclose(float(c_in), 1.0 / math.sqrt(1.0 + sigma**2), rel_tol=1e-12)

    x = (z / c_in).requires_grad_(True)  # x = z · sqrt(1 + σ²)
    (grad_x,) = torch.autograd.grad(_loss(x * c_in), x)
    x_new = latent_step(x.detach(), grad_x, alpha, sigma=sigma, space="k")

    zz = z.clone().requires_grad_(True)
    (grad_z,) = torch.autograd.grad(_loss(zz), zz)
    z_new = z - alpha * grad_z
    assert (grad_z.abs() > 1e-3).any()
    torch.testing.assert_close(x_new * c_in, z_new, rtol=1e-12, atol=1e-12)


def test_per_row_sigma_tensor() -> None:
    torch.manual_seed(2)
    z = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    sig = torch.tensor([0.2, 2.0, 9.0], dtype=torch.float64)
    c_in = (1.0 / torch.sqrt(1.0 + sig**2)).reshape(3, 1, 1, 1)
    x = (z / c_in).requires_grad_(True)
    (grad_x,) = torch.autograd.grad(_loss(x * c_in), x)
    x_new = latent_step(x.detach(), grad_x, 0.7, sigma=sig)
    zz = z.clone().requires_grad_(True)
    (grad_z,) = torch.autograd.grad(_loss(zz), zz)
    torch.testing.assert_close(x_new * c_in, z - 0.7 * grad_z, rtol=1e-12, atol=1e-12)


def test_eps_space_step_is_plain_gradient_step() -> None:
    torch.manual_seed(3)
    z = torch.randn(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(_loss(z), z)
    out = latent_step(z.detach(), grad, 5.0, space="eps")
    torch.testing.assert_close(out, z.detach() - 5.0 * grad, rtol=0, atol=0)


def test_errors() -> None:
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="sigma"):
        latent_step(x, x, 1.0)
    with pytest.raises(ValueError, match="'v'"):
        latent_step(x, x, 1.0, sigma=1.0, space="v")
    with pytest.raises(ValueError, match="gradient has shape"):
        latent_step(x, x[:, :2], 1.0, sigma=1.0)
