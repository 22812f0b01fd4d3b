"""DiffusionAD torch model: denoising sub-network + segmentation sub-network (Zhang et al., Sec. 3.2)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from anomalib.data import InferenceBatch
from anomalib.models.image.draem.torch_model import DiscriminativeSubNetwork
from torch import nn

from anomalib_dpnr.components import (
    AnomalyScorer,
    NoiseSchedule,
    build_unet,
    check_images,
    gaussian_noise,
    unet_downsampling_factor,
)
from anomalib_dpnr.components.validation import _tracing

__all__ = ["INFERENCE_MODES", "DiffusionADModel", "DiffusionADOutput"]

# DRAEM's discriminative U-Net (the segmentation sub-network the paper builds on) pools five times.
_SEGMENTATION_FACTOR = 32
INFERENCE_MODES = ("norm_guided", "average")


@dataclass
class DiffusionADOutput:
    """Training-time outputs (Alg. 1 with the reference code's two noise levels).

    ``noise`` and ``predicted_noise`` are ``[B, 2, C, H, W]``: level ``t_n`` then level ``t_s`` per image.
    ``reconstruction`` is the norm-guided, clamped ``x0`` estimate the segmentation sub-network saw.
    """

    noise: torch.Tensor
    predicted_noise: torch.Tensor
    reconstruction: torch.Tensor
    mask_logits: torch.Tensor
    timesteps: torch.Tensor  # [B, 2]: (t_n, t_s)


class DiffusionADModel(nn.Module):
    """Noise-to-norm pipeline: corrupt, denoise in one step (Eq. 5), segment ``cat(x0, x0_hat)``.

    Args:
        num_timesteps: Diffusion steps ``T``.
        beta_schedule: diffusers schedule name (paper: linear).
        beta_start: First beta.
        beta_end: Last beta.
        block_out_channels: Denoiser UNet width per level.
        layers_per_block: Denoiser ResNet blocks per level.
        attention_levels: Denoiser levels with self-attention.
        attention_head_dim: Channels per attention head.
        norm_num_groups: GroupNorm groups of the denoiser.
        segmentation_width: Base width of the segmentation U-Net.
        inference_mode: ``"norm_guided"`` (reference code: the estimate from ``guiding_timestep`` guides the
            one-step denoising at ``guided_timestep``) or ``"average"`` (paper Alg. 2: one-step maps from every
            ``inference_timesteps`` level, averaged).
        inference_timesteps: Noise levels ``lambda`` averaged in ``"average"`` mode (paper: 100 and 200).
        guided_timestep: Level whose one-step denoising is guided (reference: 200).
        guiding_timestep: Noisier level whose estimate guides it (reference: 400).
        guidance_weight: ``w`` of the norm guidance (reference: 1), in training and inference.
        timestep_split: Training levels as a fraction of ``T``: ``t_n ~ U[0, split T)`` and
            ``t_s ~ U[split T, T)`` (reference: 300 of 1000).
        clamp_estimate: Clamp every one-step ``x0`` estimate to ``[-1, 1]`` (reference code; Eq. 5 has no clamp).
        top_k: Pixels averaged into the image score.
        smoothing_sigma: Gaussian sigma applied to the anomaly map (0 = none).
        inference_seed: Seed of the inference noise, drawn once per level (seed, seed + 1, ...) and shared by
            every image so scores do not depend on batch composition and repeat exactly.
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        block_out_channels: Sequence[int] = (128, 128, 256, 256, 512, 512),
        layers_per_block: int = 2,
        attention_levels: Sequence[int] = (3, 4, 5),
        attention_head_dim: int = 64,
        norm_num_groups: int = 32,
        segmentation_width: int = 64,
        inference_mode: str = "norm_guided",
        inference_timesteps: Sequence[int] = (100, 200),
        guided_timestep: int = 200,
        guiding_timestep: int = 400,
        guidance_weight: float = 1.0,
        timestep_split: float = 0.3,
        clamp_estimate: bool = True,
        top_k: int = 50,
        smoothing_sigma: float = 4.0,
        inference_seed: int = 0,
    ) -> None:
        super().__init__()
        self.schedule = NoiseSchedule(num_timesteps, beta_schedule, beta_start, beta_end)
        if inference_mode not in INFERENCE_MODES:
            msg = f"inference_mode must be one of {INFERENCE_MODES}, got {inference_mode!r}"
            raise ValueError(msg)
        if not inference_timesteps:
            msg = "inference_timesteps must name at least one noise level"
            raise ValueError(msg)
        self.schedule.check_timesteps(list(inference_timesteps))
        self.schedule.check_timesteps([guided_timestep, guiding_timestep])
        if guiding_timestep <= guided_timestep:
            msg = f"guiding_timestep ({guiding_timestep}) must be noisier than guided_timestep ({guided_timestep})"
            raise ValueError(msg)
        self.split_step = round(timestep_split * num_timesteps)
        if not 0 < self.split_step < num_timesteps:
            msg = f"timestep_split {timestep_split} must leave levels on both sides of split * T (T = {num_timesteps})"
            raise ValueError(msg)
        self.inference_mode = inference_mode
        self.inference_timesteps = tuple(int(t) for t in inference_timesteps)
        self.guided_timestep, self.guiding_timestep = int(guided_timestep), int(guiding_timestep)
        self.guidance_weight = guidance_weight
        self.clamp_estimate = clamp_estimate
        self.inference_seed = inference_seed
        self.denoiser = build_unet(
            3, 3, block_out_channels, layers_per_block, attention_levels, attention_head_dim, norm_num_groups
        )
        self.segmenter = DiscriminativeSubNetwork(in_channels=6, out_channels=1, base_width=segmentation_width)
        self.scorer = AnomalyScorer(smoothing_sigma, top_k)
        self.size_multiple = max(unet_downsampling_factor(block_out_channels), _SEGMENTATION_FACTOR)
        self._noise_cache: dict[tuple, torch.Tensor] = {}

    def denoise(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrupt ``images`` to ``x_t`` (Eq. 2), predict the noise and return ``(eps_hat, x0_hat)`` (Eq. 5)."""
        noisy = self.schedule.add_noise(images, noise, timesteps)
        predicted_noise = self.denoiser(noisy, timesteps).sample
        return predicted_noise, self.estimate(noisy, predicted_noise, timesteps)

    def estimate(self, noisy: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """One-step ``x0`` (Eq. 5), clamped to ``[-1, 1]`` with ``clamp_estimate``."""
        x0 = self.schedule.predict_x0(noisy, noise, timesteps)
        return x0.clamp(-1, 1) if self.clamp_estimate else x0

    def norm_guided(
        self,
        noisy: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        noisier_estimate: torch.Tensor,
    ) -> torch.Tensor:
        """Norm-guided one-step ``x0`` at ``timesteps`` from the noisier level's estimate ``noisier_estimate``.

        ``x_t' = sqrt(abar_t) x0_s + sqrt(1 - abar_t) eps(x_t)``,
        ``eps~ = eps(x_t) - w sqrt(1 - abar_t) (x_t' - x_t)``, ``x0 = predict(x_t, eps~)``.
        """
        guide = self.schedule.add_noise(noisier_estimate, noise, timesteps)
        sigma = (1 - self.schedule.alphas_cumprod[timesteps]).sqrt().reshape(-1, 1, 1, 1)
        return self.estimate(noisy, noise - self.guidance_weight * sigma * (guide - noisy), timesteps)

    def segment(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Mask logits ``[B, 1, H, W]`` from the channel-wise concatenation of input and reconstruction."""
        return self.segmenter(torch.cat([images, reconstruction], dim=1))

    def sample_timesteps(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """``[B, 2]`` training levels: ``t_n ~ U[0, split T)``, ``t_s ~ U[split T, T)`` (reference code)."""
        low = torch.randint(0, self.split_step, (batch_size,), device=device)
        high = torch.randint(self.split_step, self.schedule.num_timesteps, (batch_size,), device=device)
        return torch.stack([low, high], dim=1)

    def forward(self, images: torch.Tensor) -> DiffusionADOutput | InferenceBatch:
        """Training: two noise levels per image, norm-guided estimate segmented. Inference: see ``inference_mode``."""
        check_images(images, 3, self.size_multiple, "DiffusionAD")
        if self.training:
            return self._train_forward(images)
        if _tracing() or torch.is_inference_mode_enabled():
            return self._infer(images)
        with torch.inference_mode():  # no autograd bookkeeping; clone so callers get ordinary tensors
            out = self._infer(images)
        return InferenceBatch(pred_score=out.pred_score.clone(), anomaly_map=out.anomaly_map.clone())

    def _train_forward(self, images: torch.Tensor) -> DiffusionADOutput:
        """Both levels of every image in one denoiser pass, independent noises (reference code)."""
        batch = images.shape[0]
        timesteps = self.sample_timesteps(batch, images.device)  # [B, 2]
        noise = torch.randn(batch, 2, *images.shape[1:], device=images.device, dtype=images.dtype)
        steps = timesteps.T.reshape(-1)  # level-major: [t_n of every image, t_s of every image]
        noisy = self.schedule.add_noise(images.repeat(2, 1, 1, 1), noise.transpose(0, 1).flatten(0, 1), steps)
        predicted = self.denoiser(noisy, steps).sample
        (noisy_n, noisy_s), (eps_n, eps_s) = noisy.chunk(2), predicted.chunk(2)
        estimate_s = self.estimate(noisy_s, eps_s, timesteps[:, 1])
        reconstruction = self.norm_guided(noisy_n, eps_n, timesteps[:, 0], estimate_s)
        predicted = predicted.reshape(2, batch, *images.shape[1:]).transpose(0, 1)
        return DiffusionADOutput(noise, predicted, reconstruction, self.segment(images, reconstruction), timesteps)

    def inference_noise(self, images: torch.Tensor, count: int) -> torch.Tensor:
        """``[count, 1, C, H, W]`` fixed noises (seeds ``inference_seed + i``), drawn once per size and device."""
        if _tracing():  # exported graphs hold the same draws as constants (gaussian_noise)
            return self._draw(images, count)
        key = (count, self.inference_seed, tuple(images.shape[1:]), images.device, images.dtype)
        if key not in self._noise_cache:
            self._noise_cache = {key: self._draw(images, count)}
        return self._noise_cache[key]

    def _draw(self, images: torch.Tensor, count: int) -> torch.Tensor:
        generators = [torch.Generator(device=images.device).manual_seed(self.inference_seed + i) for i in range(count)]
        return torch.stack([gaussian_noise(images[:1], generator) for generator in generators])

    def denoise_levels(self, images: torch.Tensor, steps: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every image at every level of ``steps`` with the fixed inference noise, in one denoiser pass.

        Returns level-major ``[L * B, ...]`` noisy images, predicted noises and timesteps.
        """
        batch, levels = images.shape[0], len(steps)
        noise = self.inference_noise(images, levels).expand(-1, batch, *images.shape[1:]).flatten(0, 1)
        timesteps = torch.tensor(steps, device=images.device)[:, None].expand(levels, batch).reshape(-1)
        noisy = self.schedule.add_noise(images.repeat(levels, 1, 1, 1), noise, timesteps)
        return noisy, self.denoiser(noisy, timesteps).sample, timesteps

    def guided_estimate(self, images: torch.Tensor) -> torch.Tensor:
        """Norm-guided ``x0``: ``guiding_timestep`` guides ``guided_timestep`` (two levels, one denoiser pass)."""
        noisy, predicted, timesteps = self.denoise_levels(images, (self.guided_timestep, self.guiding_timestep))
        (noisy_t, noisy_s), (eps_t, eps_s), (t, s) = (x.unflatten(0, (2, -1)).unbind(0) for x in (noisy, predicted, timesteps))
        return self.norm_guided(noisy_t, eps_t, t, self.estimate(noisy_s, eps_s, s))

    def _infer(self, images: torch.Tensor) -> InferenceBatch:
        """One denoiser and one segmentation pass for the whole batch at every noise level."""
        if self.inference_mode == "norm_guided":
            anomaly_map = torch.sigmoid(self.segment(images, self.guided_estimate(images)))
        else:
            levels = len(self.inference_timesteps)
            reconstruction = self.estimate(*self.denoise_levels(images, self.inference_timesteps))
            logits = self.segment(images.repeat(levels, 1, 1, 1), reconstruction)
            anomaly_map = torch.sigmoid(logits).unflatten(0, (levels, -1)).mean(dim=0)
        anomaly_map, pred_score = self.scorer(anomaly_map)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
