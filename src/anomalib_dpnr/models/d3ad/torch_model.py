"""D3AD torch model (Tebbe & Tayyub), with DDAD (Mousakhan et al.) as its fixed-step configuration.

Training: the denoiser learns ``eps_theta`` with the DDPM loss in the latent space of ``LatentCodec`` (pixel
space without a VAE). Inference (Fig. 2 of D3AD): a kNN estimate on backbone features picks each image's (or
region's) start step ``t`` (``DynamicStep``), the latent is scaled to ``sqrt(abar_t) z0`` (no noise added;
``add_noise`` adds it, as DDAD does), denoised by conditioned DDIM (``ddim_reconstruct``), and the anomaly map
combines the latent/pixel distance with the feature distance of a (domain-adapted) backbone between input and
reconstruction, each normalised by statistics of training images (``MapStatistics``: min-max as the reference, or
per pixel position with ``positional_statistics``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from torch import nn
from torch.nn import functional as F  # noqa: N812

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
from anomalib_dpnr.components.latent import LatentCodec
from anomalib_dpnr.components.statistics import MapStatistics

from .conditioning import ddim_reconstruct
from .domain_adaptation import AdaptedBackbone
from .dynamic_step import DynamicStep

__all__ = ["D3ADModel", "D3ADOutput", "STEP_MODES"]

STEP_MODES = ("image", "region", "fixed")


@dataclass
class D3ADOutput:
    """Denoiser training outputs (latent resolution)."""

    noise: torch.Tensor
    predicted: torch.Tensor
    timesteps: torch.Tensor


class D3ADModel(nn.Module):
    """D3AD / DDAD (see module docstring). Arguments mirror ``anomalib_dpnr.D3AD``."""

    def __init__(
        self,
        image_size: int | tuple[int, int] = 256,
        vae_path: str | Path | None = None,
        latent_scale: float | None = None,
        autoencoder_channels: Sequence[int] | None = None,
        latent_channels: int = 4,
        autoencoder_norm_groups: int | None = None,
        num_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 0.0015,
        beta_end: float = 0.0195,
        block_out_channels: Sequence[int] = (192, 384, 384, 768, 768),
        layers_per_block: int = 2,
        attention_levels: Sequence[int] = (2, 3, 4),
        attention_head_dim: int = 64,
        norm_num_groups: int = 32,
        backbone: str = "efficientnet_lite0",
        knn_layer: str = "blocks.2",
        layers: Sequence[str] = ("blocks.2", "blocks.4"),
        pre_trained: bool = True,
        backbone_weights: str | Path | None = None,
        knn_k: int = 20,
        knn_pool_size: int = 16,
        knn_bins: int = 10,
        min_bin: int = 2,
        max_step: int = 80,
        step_rounding: int = 10,
        step_mode: str = "image",
        fixed_step: int = 250,
        ddim_steps: int = 10,
        add_noise: bool = False,
        condition_weight: float = 4.0,
        domain_adaptation: bool = True,
        adaptation_steps: tuple[int, int] = (8, 80),
        pixel_weight: float = 0.85,
        feature_weight: float = 0.15,
        feature_pooling: int = 1,
        normalise_maps: bool = True,
        positional_statistics: bool = False,
        positional_shrinkage: float = 0.1,
        smoothing_sigma: float = 4.0,
        inference_seed: int = 0,
    ) -> None:
        super().__init__()
        if step_mode not in STEP_MODES:
            msg = f"step_mode must be one of {STEP_MODES}, got {step_mode!r}"
            raise ValueError(msg)
        if ddim_steps < 1 or knn_pool_size < 1 or feature_pooling < 1 or feature_pooling % 2 == 0:
            msg = (
                f"need ddim_steps >= 1, knn_pool_size >= 1 and an odd feature_pooling >= 1, got ddim_steps={ddim_steps}, "
                f"knn_pool_size={knn_pool_size}, feature_pooling={feature_pooling}"
            )
            raise ValueError(msg)
        if len(adaptation_steps) != 2 or not 1 <= adaptation_steps[0] <= adaptation_steps[1]:
            msg = f"adaptation_steps must be (low, high) with 1 <= low <= high, got {adaptation_steps}"
            raise ValueError(msg)
        self.codec = LatentCodec(
            vae_path, latent_scale, autoencoder_channels, latent_channels,
            norm_num_groups if autoencoder_norm_groups is None else autoencoder_norm_groups,
        )  # fmt: skip
        self.schedule = NoiseSchedule(num_timesteps, beta_schedule, beta_start, beta_end)
        self.schedule.check_timesteps([fixed_step] if step_mode == "fixed" else [max_step])
        self.schedule.check_timesteps(list(adaptation_steps))
        self.denoiser = build_unet(
            self.codec.channels, self.codec.channels, block_out_channels, layers_per_block,
            attention_levels, attention_head_dim, norm_num_groups,
        )  # fmt: skip
        layers = list(layers)
        if not layers:
            msg = "layers must name at least one backbone layer for the feature distance"
            raise ValueError(msg)
        union = [knn_layer, *(layer for layer in layers if layer != knn_layer)]
        self.backbone = FeatureEmbedder(backbone, union, None, pre_trained, backbone_weights)  # frozen
        self.score_indices = [union.index(layer) for layer in layers]
        self.dynamic = DynamicStep(knn_k, knn_bins, min_bin, max_step, step_rounding, "region" if step_mode == "region" else "image")
        self.adapted = AdaptedBackbone(self.backbone) if domain_adaptation else None
        self.normaliser = MapStatistics((2,), image_size_pair(image_size), positional_shrinkage)  # latent, feature
        self.scorer = AnomalyScorer(smoothing_sigma, top_k=1)  # image score = the map's maximum
        self.knn_pool_size = knn_pool_size
        self.step_mode = step_mode
        self.fixed_step = fixed_step
        self.ddim_steps = ddim_steps
        self.add_noise = add_noise
        self.condition_weight = condition_weight
        self.adaptation_steps = tuple(int(s) for s in adaptation_steps)
        self.pixel_weight = pixel_weight
        self.feature_weight = feature_weight
        self.feature_pooling = feature_pooling
        self.normalise_maps = normalise_maps
        self.positional_statistics = positional_statistics
        self.inference_seed = inference_seed
        factor = unet_downsampling_factor(block_out_channels) * self.codec.factor
        self.size_multiple = max(factor, self.backbone.size_multiple)

    # --- initial anomaly estimate and dynamic step --------------------------------------------------------
    @property
    def needs_bank(self) -> bool:
        """Whether the start step comes from the kNN estimate (not ``fixed``)."""
        return self.step_mode != "fixed"

    def knn_features(self, knn_map: torch.Tensor) -> torch.Tensor:
        """The kNN layer's map average-pooled to ``knn_pool_size`` squared regions: ``[B, L, C]``."""
        return F.adaptive_avg_pool2d(knn_map, self.knn_pool_size).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def bank_features(self, images: torch.Tensor) -> torch.Tensor:
        """kNN features ``[B, L, C]`` of ``[-1, 1]`` training images (frozen backbone)."""
        return self.knn_features(self.backbone.layer_maps(images)[0])

    def start_steps(self, knn_map: torch.Tensor) -> torch.Tensor:
        """Start step per image ``[B]`` (``image``, ``fixed``) or per region ``[B, 1, g, g]`` (``region``)."""
        batch = knn_map.shape[0]
        if self.step_mode == "fixed":
            return torch.full((batch,), self.fixed_step, device=knn_map.device, dtype=torch.long)
        steps = self.dynamic.steps(self.dynamic.distances(self.knn_features(knn_map)))
        return steps if self.step_mode == "image" else steps.reshape(batch, 1, self.knn_pool_size, self.knn_pool_size)

    # --- reconstruction -----------------------------------------------------------------------------------
    def reconstruct(self, latents: torch.Tensor, steps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Start at ``sqrt(abar_t) z0`` (plus noise with ``add_noise``) and denoise with conditioned DDIM."""
        abar = self.schedule.alphas_cumprod[steps].reshape(-1, 1, 1, 1).to(latents.dtype)
        start = abar.sqrt() * latents
        if self.add_noise:
            start = start + (1 - abar).sqrt() * gaussian_noise(latents, generator)
        return ddim_reconstruct(self.denoiser, self.schedule.alphas_cumprod, start, latents, steps, self.ddim_steps, self.condition_weight)

    def reconstruct_regions(self, latents: torch.Tensor, steps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Region-wise steps ``[B, 1, g, g]``: each region takes the reconstruction started at its own step."""
        region = F.interpolate(steps.float(), size=latents.shape[-2:], mode="nearest")
        result = torch.zeros_like(latents)
        for level in self.dynamic.levels:  # every possible step: a fixed loop, exportable
            level_steps = torch.full((latents.shape[0],), level, device=latents.device, dtype=torch.long)
            result = result + (region == level).to(latents.dtype) * self.reconstruct(latents, level_steps, generator)
        return result

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The fixed inference noise (only drawn with ``add_noise``)."""
        return torch.Generator(device=device).manual_seed(self.inference_seed) if self.add_noise else None

    # --- anomaly map --------------------------------------------------------------------------------------
    @property
    def scoring_backbone(self) -> FeatureEmbedder | AdaptedBackbone:
        """The domain-adapted copy, or the frozen backbone without domain adaptation."""
        return self.backbone if self.adapted is None else self.adapted

    def feature_distance(self, inputs: list[torch.Tensor], reconstructions: list[torch.Tensor], size: torch.Size) -> torch.Tensor:
        """Mean over layers of ``1 - cos`` (after ``feature_pooling`` mean filtering), upsampled ``[B, 1, H, W]``."""
        distances = []
        for a, b in zip(inputs, reconstructions, strict=True):
            if self.feature_pooling > 1:  # DDAD's patch-wise features
                a, b = (F.avg_pool2d(m, self.feature_pooling, stride=1, padding=self.feature_pooling // 2) for m in (a, b))
            cosine = 1 - F.cosine_similarity(a, b, dim=1).unsqueeze(1)
            distances.append(F.interpolate(cosine, size=size, mode="bilinear", align_corners=False))
        return torch.stack(distances).mean(dim=0)

    @torch.no_grad()
    def term_maps(self, images: torch.Tensor, features: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw latent/pixel distance and feature distance maps ``[B, 1, H, W]`` and the start steps
        (``features=False``: the feature distance is zero, the scoring backbone does not run)."""
        size = images.shape[-2:]
        latents = self.codec.encode(images)
        frozen = self.backbone.layer_maps(images)
        steps = self.start_steps(frozen[0])
        generator = self.generator(images.device)
        if steps.ndim == 1:
            reconstruction = self.reconstruct(latents, steps, generator)
        else:
            reconstruction = self.reconstruct_regions(latents, steps, generator)
        latent = (reconstruction - latents).abs().mean(dim=1, keepdim=True)
        latent = F.interpolate(latent, size=size, mode="bilinear", align_corners=False) if latent.shape[-2:] != size else latent
        if not features:
            return latent, torch.zeros_like(latent), steps
        decoded = self.codec.decode(reconstruction).clamp(-1, 1)
        if self.adapted is None:
            inputs = [frozen[i] for i in self.score_indices]
            rebuilt = self.backbone.layer_maps(decoded)
            rebuilt = [rebuilt[i] for i in self.score_indices]
        else:
            adapted_inputs, adapted_rebuilt = self.adapted.layer_maps(images), self.adapted.layer_maps(decoded)
            inputs = [adapted_inputs[i] for i in self.score_indices]
            rebuilt = [adapted_rebuilt[i] for i in self.score_indices]
        return latent, self.feature_distance(inputs, rebuilt, size), steps

    def statistics_maps(self, images: torch.Tensor) -> torch.Tensor:
        """``[2, B, 1, H, W]`` raw latent/pixel and feature distance maps (what ``normaliser`` is fitted on)."""
        return torch.stack(self.term_maps(images)[:2])

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> InferenceBatch:
        """Anomaly map and image score of ``images`` (see :meth:`score_maps`); the feature term only if weighted."""
        return self.score_maps(*self.term_maps(images, features=bool(self.feature_weight))[:2])

    def validation_terms(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw latent/pixel and feature distance maps (what ``FittedTermWeight`` keeps)."""
        return self.term_maps(images)[:2]

    def weighted_terms(self, latent: torch.Tensor, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pixel_weight * norm(latent), norm(feature))``: the map before smoothing is ``base + feature_weight * extra``.
        ``norm``: min-max over training pixels, or per position (``positional_statistics``)."""
        if self.normalise_maps:
            reading = "position" if self.positional_statistics else "minmax"
            latent, feature = self.normaliser(latent, 0, reading), self.normaliser(feature, 1, reading)
        return self.pixel_weight * latent, feature

    def score_maps(self, latent: torch.Tensor, feature: torch.Tensor) -> InferenceBatch:
        """``pixel_weight * norm(latent distance) + feature_weight * norm(feature distance)``, Gaussian-smoothed;
        image score = its maximum."""
        base, extra = self.weighted_terms(latent, feature)
        anomaly_map, pred_score = self.scorer(base + self.feature_weight * extra)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    # --- training -----------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> D3ADOutput | InferenceBatch:
        """Training: one DDPM step per image for the denoiser. Inference: :meth:`predict` (``[-1, 1]`` images)."""
        check_images(images, 3, self.size_multiple, "D3AD")
        if not self.training:
            return self.predict(images)
        latents = self.codec.encode(images)
        noise = torch.randn_like(latents)
        timesteps = self.schedule.sample_timesteps(latents.shape[0], latents.device)
        predicted = self.denoiser(self.schedule.add_noise(latents, noise, timesteps), timesteps).sample
        return D3ADOutput(noise, predicted, timesteps)

    def adaptation_features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
        """Domain adaptation inputs: reconstructions from random steps in ``adaptation_steps`` (no gradient), and
        the adapted (with gradient) and frozen features of input and reconstruction, at the scoring layers."""
        check_images(images, 3, self.size_multiple, "D3AD")
        if self.adapted is None:
            msg = "D3AD: domain adaptation is off (domain_adaptation=False); there is no backbone copy to fine-tune"
            raise RuntimeError(msg)
        low, high = self.adaptation_steps
        steps = torch.randint(low, high + 1, (images.shape[0],), device=images.device)
        with torch.no_grad():
            latents = self.codec.encode(images)
            decoded = self.codec.decode(self.reconstruct(latents, steps)).clamp(-1, 1)
            frozen_in, frozen_rec = self.backbone.layer_maps(images), self.backbone.layer_maps(decoded)
        adapted_in, adapted_rec = self.adapted.layer_maps(images), self.adapted.layer_maps(decoded)
        pick = lambda maps: [maps[i] for i in self.score_indices]  # noqa: E731
        return pick(adapted_in), pick(adapted_rec), pick(frozen_in), pick(frozen_rec)
