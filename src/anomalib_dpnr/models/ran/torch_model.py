"""RAN torch model (Lu et al., "Removing Anomalies as Noises for Industrial Defect Localization", ICCV 2023).

A DDPM-style denoiser with learned variance (improved DDPM: 3 noise + 3 variance-interpolation channels) and a feature
head on one of its decoder blocks (Eq. 10) learn the joint distribution of normal images and their backbone features.
Inference scores each selected step ``t_i`` of a respaced schedule with one noising of the image: the per-pixel KL
between the true and the learned reverse step (``kl_score``) and the head's feature error (``feature_head``),
standardised with training-image statistics and ensembled (Eq. 11, ``ensemble``); the image score is the top-k mean.
Gradient denoising (Algorithm 1, ``gradient_denoising``) optionally turns the image into its normal version first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from torch import nn
from torch.nn import functional as F

from anomalib_dpnr.components import (
    AnomalyScorer,
    NoiseSchedule,
    build_unet,
    check_images,
    gaussian_noise,
    image_size_pair,
    unet_downsampling_factor,
)
from anomalib_dpnr.components.features import FeatureEmbedder
from anomalib_dpnr.components.statistics import MapStatistics

from .ensemble import TERMS, standardised_terms
from .feature_head import FeatureHead, feature_error
from .gradient_denoising import MahalanobisGuide, gradient_denoise
from .kl_score import reverse_step, variational_terms

__all__ = ["RanModel", "RanOutput"]


@dataclass
class RanOutput:
    """One training step's tensors: the noise and what the denoiser predicted from ``x_t``."""

    images: torch.Tensor
    noisy: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    eps: torch.Tensor
    variance: torch.Tensor
    features: torch.Tensor
    target_features: torch.Tensor


class RanModel(nn.Module):
    """RAN (see module docstring). Arguments mirror ``anomalib_dpnr.Ran``."""

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        block_out_channels: Sequence[int] = (256, 256, 512, 512, 1024, 1024),
        layers_per_block: int = 2,
        attention_levels: Sequence[int] = (3, 4, 5),
        attention_head_dim: int = 64,
        norm_num_groups: int = 32,
        backbone: str = "efficientnet_lite0",
        feature_layers: Sequence[str] = ("blocks.4",),
        feature_block: int = 0,
        pre_trained: bool = True,
        backbone_weights: str | Path | None = None,
        respacing: int = 250,
        inference_timesteps: Sequence[int] = (5, 50, 100),
        clip_denoised: bool = True,
        alpha: float = 0.5,
        normalise_features: bool = False,
        positional_statistics: bool = False,
        positional_shrinkage: float = 0.1,
        image_size: int | tuple[int, int] = 256,
        top_k: int = 64,
        smoothing_sigma: float = 4.0,
        gradient_denoising: bool = False,
        guidance_layers: Sequence[str] = ("blocks.2", "blocks.4"),
        guidance_features: int = 100,
        guidance_iterations: int = 100,
        guidance_step: int = 8,
        denoise_every: int = 1,
        inference_seed: int = 0,
    ) -> None:
        super().__init__()
        if not inference_timesteps:
            msg = "inference_timesteps must name at least one step of the respaced schedule"
            raise ValueError(msg)
        if not 0 <= alpha <= 1:
            msg = f"alpha must lie in [0, 1], got {alpha}"
            raise ValueError(msg)
        if guidance_iterations < 0 or denoise_every < 1:
            msg = f"need guidance_iterations >= 0 and denoise_every >= 1, got {guidance_iterations} and {denoise_every}"
            raise ValueError(msg)
        feature_layers, guidance_layers = list(feature_layers), list(guidance_layers)
        if not feature_layers or not guidance_layers:
            msg = "feature_layers and guidance_layers must each name at least one backbone layer"
            raise ValueError(msg)
        self.schedule = NoiseSchedule(num_timesteps, beta_schedule, beta_start, beta_end)
        self.sampling, steps = self.schedule.respace(respacing)  # the respaced schedule scores are read on
        self.register_buffer("sampling_steps", steps, persistent=False)
        self.sampling.check_timesteps([*inference_timesteps, guidance_step])
        self.denoiser = build_unet(
            3, 6, block_out_channels, layers_per_block, attention_levels, attention_head_dim, norm_num_groups,
        )  # fmt: skip  # 3 noise + 3 variance-interpolation channels (improved DDPM)
        union = list(dict.fromkeys([*feature_layers, *guidance_layers]))
        self.backbone = FeatureEmbedder(backbone, union, None, pre_trained, backbone_weights)  # frozen
        dims, strides = self.backbone.channels, self.backbone.strides
        self.feature_layers, self.guidance_layers = feature_layers, guidance_layers
        self.feature_stride = min(strides[layer] for layer in feature_layers)
        self.feature_head = FeatureHead(self.denoiser, feature_block, sum(dims[layer] for layer in feature_layers), norm_num_groups)
        self.guide = MahalanobisGuide(guidance_layers, [dims[layer] for layer in guidance_layers], guidance_features, inference_seed)
        self.normaliser = MapStatistics((len(TERMS), len(inference_timesteps)), image_size_pair(image_size), positional_shrinkage)
        self.scorer = AnomalyScorer(smoothing_sigma, top_k)
        self.inference_timesteps = tuple(int(t) for t in inference_timesteps)
        self.clip_denoised = clip_denoised
        self.alpha = alpha
        self.normalise_features = normalise_features
        self.positional_statistics = positional_statistics
        self.gradient_denoising = gradient_denoising
        self.guidance_iterations = guidance_iterations
        self.guidance_step = guidance_step
        self.denoise_every = denoise_every
        self.inference_seed = inference_seed
        self.size_multiple = max(unet_downsampling_factor(block_out_channels), self.backbone.size_multiple)

    # --- networks -----------------------------------------------------------------------------------------
    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predicted noise, variance values and backbone features (on the feature grid) of ``x_t`` at (original)
        ``timesteps``: one UNet pass."""
        self.feature_head.clear()
        output = self.denoiser(x_t, timesteps).sample
        grid = (x_t.shape[-2] // self.feature_stride, x_t.shape[-1] // self.feature_stride)
        return output[:, :3], output[:, 3:], self.feature_head(grid)

    def target_features(self, images: torch.Tensor, maps: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The frozen backbone's ``feature_layers`` of ``[-1, 1]`` images, concatenated on the finest grid: ``f(x_0)``."""
        maps = self.backbone.layer_maps(images) if maps is None else maps
        by_layer = dict(zip(self.backbone.layers, maps, strict=True))
        grid = (images.shape[-2] // self.feature_stride, images.shape[-1] // self.feature_stride)
        return torch.cat([F.interpolate(by_layer[layer], size=grid, mode="bilinear", align_corners=False) for layer in self.feature_layers], dim=1)

    def guidance_embedding(self, images: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        """PaDiM embedding of ``[-1, 1]`` images for the gradient-denoising Gaussian."""
        maps = dict(zip(self.backbone.layers, self.backbone.layer_maps(images, differentiable=differentiable), strict=True))
        return self.guide.embedding([maps[layer] for layer in self.guidance_layers])

    # --- gradient denoising (Algorithm 1) -----------------------------------------------------------------
    def mahalanobis(self, images: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        """Mean squared Mahalanobis distance of each image's features to the Gaussian (Eq. 12): ``[B]``."""
        return self.guide(self.guidance_embedding(images, differentiable)).flatten(1).mean(dim=1)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Algorithm 1 from ``[-1, 1]`` images: their normal version (``guidance_iterations`` updates at the respaced
        ``guidance_step``). Runs with gradients enabled whatever the caller's mode."""
        step = self.guidance_step
        original = self.sampling_steps[step]
        beta = float(self.sampling.betas[step])
        generator = torch.Generator(device=images.device).manual_seed(self.inference_seed + 1000)

        def denoise(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                eps, values, _ = self.denoise(x, original.expand(x.shape[0]))
                steps = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
                mean, log_var = reverse_step(self.sampling, eps.float(), values.float(), x, steps, self.clip_denoised)
                return mean if step == 0 else mean + (0.5 * log_var).exp() * gaussian_noise(x, generator)

        with torch.inference_mode(False), torch.enable_grad():
            start = images.clone()
            return gradient_denoise(
                start, lambda x: self.mahalanobis(x, differentiable=True), denoise, self.guidance_iterations, beta, self.denoise_every
            )

    # --- scoring ------------------------------------------------------------------------------------------
    def level_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw per-pixel KL and feature-error maps ``[levels, B, 1, H, W]`` at ``inference_timesteps``.

        ``x_t`` is one seeded noising (per level) of the image, or of its gradient-denoised reconstruction when
        ``gradient_denoising`` is on; the true posterior and the feature target always use the input image.
        """
        batch, levels, size = images.shape[0], len(self.inference_timesteps), images.shape[-2:]
        source = self.reconstruct(images) if self.gradient_denoising else images
        noise = torch.cat([
            gaussian_noise(images, torch.Generator(device=images.device).manual_seed(self.inference_seed + i)) for i in range(levels)
        ])
        steps = torch.tensor(self.inference_timesteps, device=images.device).repeat_interleave(batch)
        x0 = images.repeat(levels, 1, 1, 1)
        x_t = self.sampling.add_noise(source.repeat(levels, 1, 1, 1), noise, steps)
        eps, values, features = self.denoise(x_t, self.sampling_steps[steps])
        kl = variational_terms(self.sampling, eps, values, x0, x_t, steps, self.clip_denoised).mean(dim=1, keepdim=True)
        target = self.target_features(images).repeat(levels, 1, 1, 1)
        feature = feature_error(features, target, size)
        return kl.view(levels, batch, 1, *size), feature.view(levels, batch, 1, *size)

    def statistics_maps(self, images: torch.Tensor) -> torch.Tensor:
        """``[2, levels, B, 1, H, W]`` raw KL and feature maps (what ``normaliser``'s statistics are fitted on)."""
        return torch.stack(self.level_maps(images))

    def validation_terms(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw ``[levels, B, 1, H, W]`` KL and feature maps (what ``FittedTermWeight`` keeps to choose ``alpha``)."""
        return self.level_maps(images)

    def weighted_terms(self, kl: torch.Tensor, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s^f, s_hat - s^f)`` (level means, ``ensemble.standardised_terms``): Eq. 11's map before smoothing is
        ``base + alpha * extra``."""
        reading = "position" if self.positional_statistics else "standard"
        pixel, semantic = standardised_terms(kl, feature, self.normaliser, self.normalise_features, reading)
        return semantic, pixel - semantic

    def score_maps(self, kl: torch.Tensor, feature: torch.Tensor) -> InferenceBatch:
        """Anomaly map (Eq. 11, Gaussian-smoothed) and image score (top-k mean) of raw level maps."""
        base, extra = self.weighted_terms(kl, feature)
        anomaly_map, pred_score = self.scorer(base + self.alpha * extra)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> InferenceBatch:
        """Anomaly map (Eq. 11, Gaussian-smoothed) and image score (top-k mean)."""
        return self.score_maps(*self.level_maps(images))

    # --- training -----------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> RanOutput | InferenceBatch:
        """Training: one noising per image at ``t ~ U{0, T-1}`` (full schedule). Inference: :meth:`predict`."""
        check_images(images, 3, self.size_multiple, "Ran")
        if not self.training:
            return self.predict(images)
        noise = torch.randn_like(images)
        timesteps = self.schedule.sample_timesteps(images.shape[0], images.device)
        noisy = self.schedule.add_noise(images, noise, timesteps)
        eps, values, features = self.denoise(noisy, timesteps)
        with torch.no_grad():
            target = self.target_features(images)
        return RanOutput(images, noisy, noise, timesteps, eps, values, features, target)

