"""RAN's pixel score: the per-pixel KL divergence between the true and the learned reverse step (Lu et al., Sec. 3.2).

For a noising ``x_t`` of the image ``x_0``, ``KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))`` is large where the
model cannot explain the image (improved DDPM's variational-bound term ``L_{t-1}``, kept per pixel); at ``t = 0`` the
term is the decoder's negative log likelihood ``-log p_theta(x_0 | x_1)`` of the 8-bit image. Both are in bits, as
improved DDPM reports them. The same function gives the training loss's VB term (``loss.py``).
"""

from __future__ import annotations

import math

import torch

from anomalib_dpnr.components import NoiseSchedule

__all__ = ["discretized_gaussian_nll", "normal_kl", "reverse_step", "variational_terms"]


def normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(N(mean1, e^log_var1) || N(mean2, e^log_var2))`` in nats."""
    return 0.5 * (log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2) - 1)


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Tanh approximation of the standard normal CDF (as improved DDPM)."""
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Elementwise ``-log P(x)`` in nats of 8-bit images ``x`` in ``[-1, 1]`` under ``N(mean, e^log_var)`` integrated
    over each pixel's bin of width ``2 / 255`` (the outermost bins reach to infinity; DDPM Eq. 13)."""
    centred = x - mean
    inv_std = torch.exp(-0.5 * log_var)
    cdf_plus = _standard_normal_cdf(inv_std * (centred + 1 / 255))
    cdf_min = _standard_normal_cdf(inv_std * (centred - 1 / 255))
    log_cdf_plus = cdf_plus.clamp_min(1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp_min(1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp_min(1e-12).log()
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
    return -log_probs


def reverse_step(
    schedule: NoiseSchedule,
    eps: torch.Tensor,
    values: torch.Tensor,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    clip_denoised: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and log variance of ``p_theta(x_{t-1} | x_t)``: the posterior mean at the predicted ``x_0`` (clipped to
    ``[-1, 1]`` with ``clip_denoised``) and the learned variance."""
    x0 = schedule.predict_x0(x_t, eps, timesteps)
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    mean, _ = schedule.posterior(x0, x_t, timesteps)
    return mean, schedule.learned_log_variance(values, timesteps)  # improved DDPM Eq. 15


def variational_terms(
    schedule: NoiseSchedule,
    eps: torch.Tensor,
    values: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """Elementwise variational-bound term in bits: ``KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))`` for
    ``t > 0``, ``-log p_theta(x_0 | x_1)`` for ``t = 0`` (improved DDPM Eqs. 4-5). Computed in float32."""
    eps, values, x0, x_t = (v.float() for v in (eps, values, x0, x_t))
    true_mean, true_log_var = schedule.posterior(x0, x_t, timesteps)
    model_mean, model_log_var = reverse_step(schedule, eps, values, x_t, timesteps, clip_denoised)
    kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var)
    decoder = discretized_gaussian_nll(x0, model_mean, model_log_var)
    first = (timesteps == 0).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.where(first, decoder, kl) / math.log(2.0)
