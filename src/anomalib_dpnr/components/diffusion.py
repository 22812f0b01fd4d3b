"""Noise schedules: a thin wrapper over diffusers' ``DDPMScheduler``.

Forward noising (DDPM Eq. 2, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``) and the one-step
x0 estimate (DiffusionAD Eq. 5) are what every model in this package needs; diffusers owns the
schedule math (linear, cosine, ...), this module only keeps ``alphas_cumprod`` (and what the
posterior ``q(x_{t-1} | x_t, x_0)`` needs) as buffers so they follow the model to its device.
Models with a learned variance also get improved DDPM's variance interpolation and a respaced copy
of the schedule (a subset of the steps, as improved DDPM samples with).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import DDPMScheduler
from torch import nn

__all__ = ["NoiseSchedule", "ddim_loop", "gaussian_noise"]


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample ``[B]`` vector to broadcast against ``like`` ``[B, C, H, W]``."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def gaussian_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``like``.

    With a ``generator`` one sample is drawn and shared by the whole batch, so inference scores repeat
    exactly and do not depend on which images share a batch; without one, every image gets its own.
    """
    if generator is None:
        return torch.randn_like(like)
    shape = (1, *like.shape[1:])
    if torch.compiler.is_exporting():  # export (ONNX) cannot trace a Generator: draw the same sample as a constant
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

        with unset_fake_temporarily(), disable_proxy_modes_tracing():
            sample = torch.randn([int(s) for s in shape], generator=generator, device=like.device, dtype=like.dtype)
        return sample.expand_as(like)
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype).expand_as(like)


class NoiseSchedule(nn.Module):
    """Diffusion variance schedule with noising and one-step denoising.

    Args:
        num_timesteps: Number of diffusion steps ``T``.
        beta_schedule: Any diffusers schedule name (``linear``, ``scaled_linear``,
            ``squaredcos_cap_v2`` = cosine, ``sigmoid``).
        beta_start: First beta of a linear schedule.
        beta_end: Last beta of a linear schedule.
        trained_betas: Explicit betas (one per step) instead of a named schedule (see :meth:`respace`).
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        trained_betas: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if num_timesteps < 1:
            msg = f"num_timesteps must be >= 1, got {num_timesteps}"
            raise ValueError(msg)
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            trained_betas=None if trained_betas is None else [float(b) for b in trained_betas],
        )
        self.num_timesteps = num_timesteps
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone().float(), persistent=False)
        # posterior q(x_{t-1} | x_t, x_0) (DDPM Eqs. 6-7), in float64 then stored as float32
        abar = self.scheduler.alphas_cumprod.double()
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        betas = 1 - abar / abar_prev
        variance = betas * (1 - abar_prev) / (1 - abar)
        clipped = torch.cat([variance[1:2], variance[1:]]) if num_timesteps > 1 else betas  # log(0) at t = 0
        for name, value in {
            "betas": betas,
            "posterior_log_variance": clipped.log(),
            "posterior_coef_x0": abar_prev.sqrt() * betas / (1 - abar),
            "posterior_coef_xt": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
        }.items():
            self.register_buffer(name, value.float(), persistent=False)

    def check_timesteps(self, timesteps: torch.Tensor | list[int] | tuple[int, ...]) -> None:
        """Raise a clear error for steps outside ``[0, T)``."""
        steps = torch.as_tensor(timesteps)
        if steps.numel() and (steps.min() < 0 or steps.max() >= self.num_timesteps):
            msg = f"timesteps must lie in [0, {self.num_timesteps - 1}], got {steps.tolist()}"
            raise ValueError(msg)

    def sample_timesteps(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Uniform ``t ~ U{0, T-1}`` per sample (training, DDPM Eq. 3)."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (DDPM Eq. 2)."""
        abar = _expand(self.alphas_cumprod[timesteps], x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """One-step estimate ``x0 = (x_t - sqrt(1 - abar_t) noise) / sqrt(abar_t)`` (DiffusionAD Eq. 5)."""
        abar = _expand(self.alphas_cumprod[timesteps], x_t)
        return (x_t - (1 - abar).sqrt() * noise) / abar.sqrt()

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log variance (clipped at ``t = 0``, as improved DDPM) of ``q(x_{t-1} | x_t, x_0)`` (DDPM Eqs. 6-7)."""
        mean = _expand(self.posterior_coef_x0[timesteps], x0) * x0 + _expand(self.posterior_coef_xt[timesteps], x_t) * x_t
        return mean, _expand(self.posterior_log_variance[timesteps], x_t).expand_as(x_t)

    def learned_log_variance(self, values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Improved DDPM Eq. 15: ``log Sigma = v log beta_t + (1 - v) log beta~_t`` with ``v = (values + 1) / 2``
        (``values`` are the network's variance outputs, nominally in ``[-1, 1]``)."""
        fraction = (values + 1) / 2
        low, high = _expand(self.posterior_log_variance[timesteps], values), _expand(self.betas[timesteps].log(), values)
        return fraction * high + (1 - fraction) * low

    def respace(self, count: int) -> tuple[NoiseSchedule, torch.Tensor]:
        """A ``count``-step schedule over evenly spaced steps of this one, and those steps (improved DDPM Sec. 4).

        Steps ``round(i (T - 1) / (count - 1))``, ``i = 0..count-1``; the new betas ``1 - abar_k / abar_{k-1}`` keep
        every kept step's ``abar``. A network trained on this schedule is called with the original step numbers.
        """
        if not 1 <= count <= self.num_timesteps:
            msg = f"respacing must lie in [1, {self.num_timesteps}], got {count}"
            raise ValueError(msg)
        stride = (self.num_timesteps - 1) / max(count - 1, 1)
        steps = torch.tensor(sorted({round(i * stride) for i in range(count)}), dtype=torch.long)
        abar = self.scheduler.alphas_cumprod.double()[steps]
        betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
        return NoiseSchedule(len(steps), trained_betas=betas.tolist()), steps

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` per step."""
        abar = self.alphas_cumprod[timesteps]
        return abar / (1 - abar)


def ddim_loop(
    predict_noise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    alphas_cumprod: torch.Tensor,
    start: torch.Tensor,
    steps: torch.Tensor,
    num_steps: int,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from ``start`` at per-image ``steps`` ``[B]`` down to step 0.

    Image ``i`` is denoised in ``num_steps`` equal steps ``t_i, t_i (S-1)/S, ..., t_i / S`` (floored) and a last
    update to step 0: diffusers' ``DDIMScheduler`` update with ``eta = 0``, vectorised over per-image start steps,
    with a fixed loop length (exportable). ``predict_noise(x_t, t, abar_t)`` returns the noise estimate.
    """
    x = start
    for k in range(num_steps):
        t = torch.div(steps * (num_steps - k), num_steps, rounding_mode="floor")
        t_next = torch.div(steps * (num_steps - k - 1), num_steps, rounding_mode="floor")
        abar, abar_next = _expand(alphas_cumprod[t], x), _expand(alphas_cumprod[t_next], x)
        epsilon = predict_noise(x, t, abar)
        x0 = (x - (1 - abar).sqrt() * epsilon) / abar.sqrt()
        x = abar_next.sqrt() * x0 + (1 - abar_next).sqrt() * epsilon
    return x
