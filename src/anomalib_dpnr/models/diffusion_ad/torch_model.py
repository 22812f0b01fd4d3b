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

__all__ = ["DiffusionADModel", "DiffusionADOutput"]

# DRAEM's discriminative U-Net (the segmentation sub-network the paper builds on) pools five times.
_SEGMENTATION_FACTOR = 32


@dataclass
class DiffusionADOutput:
    """Training-time outputs (Alg. 1)."""

    noise: torch.Tensor
    predicted_noise: torch.Tensor
    reconstruction: torch.Tensor
    mask_logits: torch.Tensor


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
        inference_timesteps: Noise levels ``lambda`` whose predictions are averaged (Alg. 2).
        top_k: Pixels averaged into the image score.
        smoothing_sigma: Gaussian sigma applied to the anomaly map (0 = none).
        inference_seed: Seed of the inference noise, drawn once per level and shared by every
            image so scores do not depend on batch composition and repeat exactly.
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
        inference_timesteps: Sequence[int] = (100, 200),
        top_k: int = 50,
        smoothing_sigma: float = 4.0,
        inference_seed: int = 0,
    ) -> None:
        super().__init__()
        self.schedule = NoiseSchedule(num_timesteps, beta_schedule, beta_start, beta_end)
        if not inference_timesteps:
            msg = "inference_timesteps must name at least one noise level"
            raise ValueError(msg)
        self.schedule.check_timesteps(list(inference_timesteps))
        self.inference_timesteps = tuple(int(t) for t in inference_timesteps)
        self.inference_seed = inference_seed
        self.denoiser = build_unet(
            3, 3, block_out_channels, layers_per_block, attention_levels, attention_head_dim, norm_num_groups
        )
        self.segmenter = DiscriminativeSubNetwork(in_channels=6, out_channels=1, base_width=segmentation_width)
        self.scorer = AnomalyScorer(smoothing_sigma, top_k)
        self.size_multiple = max(unet_downsampling_factor(block_out_channels), _SEGMENTATION_FACTOR)

    def denoise(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrupt ``images`` to ``x_t`` (Eq. 2), predict the noise and return ``(eps_hat, x0_hat)`` (Eq. 5)."""
        noisy = self.schedule.add_noise(images, noise, timesteps)
        predicted_noise = self.denoiser(noisy, timesteps).sample
        return predicted_noise, self.schedule.predict_x0(noisy, predicted_noise, timesteps)

    def segment(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Mask logits ``[B, 1, H, W]`` from the channel-wise concatenation of input and reconstruction."""
        return self.segmenter(torch.cat([images, reconstruction], dim=1))

    def forward(self, images: torch.Tensor) -> DiffusionADOutput | InferenceBatch:
        """Training: one random step per image (Alg. 1). Inference: averaged one-step maps (Alg. 2)."""
        check_images(images, 3, self.size_multiple, "DiffusionAD")
        if self.training:
            noise = torch.randn_like(images)
            timesteps = self.schedule.sample_timesteps(images.shape[0], images.device)
            predicted_noise, reconstruction = self.denoise(images, noise, timesteps)
            return DiffusionADOutput(noise, predicted_noise, reconstruction, self.segment(images, reconstruction))
        anomaly_map = torch.zeros_like(images[:, :1])
        for index, step in enumerate(self.inference_timesteps):
            generator = torch.Generator(device=images.device).manual_seed(self.inference_seed + index)
            timesteps = torch.full((images.shape[0],), step, device=images.device, dtype=torch.long)
            _, reconstruction = self.denoise(images, gaussian_noise(images, generator), timesteps)
            anomaly_map = anomaly_map + torch.sigmoid(self.segment(images, reconstruction))
        anomaly_map, pred_score = self.scorer(anomaly_map / len(self.inference_timesteps))
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
