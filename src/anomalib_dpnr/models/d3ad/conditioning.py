"""Reconstruction by DDIM (eta = 0) with DDAD's implicit conditioning on the input.

DDAD (Mousakhan et al., Sec. 3): at every step the predicted noise is corrected towards the input ``y``,
``eps_hat = eps_theta(x_t, t) - w * sqrt(1 - abar_t) * (y_t - x_t)`` with ``y_t = sqrt(abar_t) y +
sqrt(1 - abar_t) eps_theta(x_t, t)`` (the input brought to the same noise level). Its x0 estimate is then
``x0_hat + w (1 - abar_t) (y - x0_hat)``: the larger ``w``, the closer the reconstruction stays to the input.
D3AD (Tebbe & Tayyub, Sec. 3) uses the same rule, starting from ``sqrt(abar_t) z0`` without noise.

Each image may start from its own step ``t_i``: it is denoised in ``num_steps`` equal DDIM steps
``t_i, t_i (S-1)/S, ..., t_i / S`` down to step 0, the same update as diffusers' ``DDIMScheduler`` with
``eta = 0`` (tested), vectorised over per-image steps and with a fixed loop length (exportable).
"""

from __future__ import annotations

import torch
from torch import nn

from anomalib_dpnr.components.diffusion import ddim_loop

__all__ = ["conditioned_epsilon", "ddim_reconstruct"]


def conditioned_epsilon(
    epsilon: torch.Tensor, noisy: torch.Tensor, target: torch.Tensor, abar: torch.Tensor, weight: float
) -> torch.Tensor:
    """DDAD's implicit conditioning: ``eps - w sqrt(1 - abar_t) (y_t - x_t)``, ``y_t = sqrt(abar_t) y + sqrt(1 - abar_t) eps``."""
    if weight == 0:
        return epsilon
    target_t = abar.sqrt() * target + (1 - abar).sqrt() * epsilon
    return epsilon - weight * (1 - abar).sqrt() * (target_t - noisy)


def ddim_reconstruct(
    denoiser: nn.Module,
    alphas_cumprod: torch.Tensor,
    start: torch.Tensor,
    target: torch.Tensor,
    steps: torch.Tensor,
    num_steps: int,
    condition_weight: float,
) -> torch.Tensor:
    """Denoise ``start`` (the state at per-image ``steps`` ``[B]``) to step 0 in ``num_steps`` DDIM steps.

    Args:
        denoiser: diffusers ``UNet2DModel`` predicting the noise.
        alphas_cumprod: ``abar`` per step ``[T]``.
        start: ``x_t`` at each image's step, ``[B, C, h, w]``.
        target: What the implicit conditioning pulls towards (the input latent ``y``).
        steps: Start step of each image ``[B]`` (long).
        num_steps: DDIM steps ``S``.
        condition_weight: ``w`` (0 = unconditioned DDIM).
    """
    def predict_noise(x: torch.Tensor, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        return conditioned_epsilon(denoiser(x, t).sample, x, target, abar, condition_weight)

    return ddim_loop(predict_noise, alphas_cumprod, start, steps, num_steps)
