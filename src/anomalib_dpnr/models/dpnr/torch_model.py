"""DPNR torch model: structured-noise diffusion with a dual-prototype noise repository.

Training (Fig. 2): ``z_syn(t) = (1 - t/T) z_s + (t/T) z_a`` (Eq. 12) is corrupted with structured
noise ``eps_s`` that DP-SNI computes from the image carrying the synthetic defect (Eq. 4); the
denoiser predicts ``eta_theta``. Its targets (RHN-Loss) are
``eps_s`` itself and the *ideal* noise ``eps* = (x_t - sqrt(abar_t) z_s) / sqrt(1 - abar_t)``, the
noise whose removal (Eq. 5) yields the normal latent ``z_s``: predicting it removes the defect.
Inference (Fig. 3): corrupt the test latent with its own structured noise, reconstruct in one step
(Eq. 5) and localise anomalies by the pixel and ``Phi``-feature discrepancy to the input.
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
    gaussian_blur,
    gaussian_noise,
    image_size_pair,
    topk_mean,
    unet_downsampling_factor,
)
from anomalib_dpnr.components.features import FeatureEmbedder, feature_distance_map
from anomalib_dpnr.components.latent import LatentCodec
from anomalib_dpnr.components.statistics import MapStatistics

from .dp_sni import DPSNI, StructuredNoise
from .repository import DualPrototypeRepository

__all__ = ["DpnrModel", "DpnrOutput", "unit_variance"]


def unit_variance(noise: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``noise`` divided by its per-image standard deviation (over the pixels where ``weight`` is 1, if given)."""
    if weight is None:
        scale = noise.flatten(1).std(dim=1)
    else:
        weight = weight.expand_as(noise).flatten(1)
        count = weight.sum(dim=1).clamp_min(1.0)
        scale = ((weight * noise.flatten(1).pow(2)).sum(dim=1) / count).sqrt()
    return noise / scale.clamp_min(1e-6).view(-1, *([1] * (noise.dim() - 1)))


@dataclass
class DpnrOutput:
    """Training-time outputs, all at latent resolution."""

    noisy: torch.Tensor  # x_t (Eq. 4)
    predicted: torch.Tensor  # eta_theta(x_t, t)
    structured: torch.Tensor  # the injected noise eta (eps_s, raw or Gaussian)
    ideal: torch.Tensor  # eps*: noise that maps x_t back to z_s
    mask: torch.Tensor  # synthetic-defect mask M [B, 1, h, w]
    snr: torch.Tensor  # SNR(t) [B]
    timesteps: torch.Tensor
    dp_sni: StructuredNoise | None = None  # DP-SNI's outputs on the anomalous image (DP-SNI only)
    background_noise: torch.Tensor | None = None  # real residual of z_s, unit variance (what Psi_bg imitates)
    foreground_noise: torch.Tensor | None = None  # z_a - z_s, unit variance inside M (what Psi_fg imitates)


class DpnrModel(nn.Module):
    """DPNR (see module docstring). Arguments mirror ``anomalib_dpnr.Dpnr``."""

    def __init__(
        self,
        image_size: int | tuple[int, int] = 256,
        vae_path: str | Path | None = None,
        latent_scale: float | None = None,
        num_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        attention_levels: Sequence[int] = (1, 2, 3),
        attention_head_dim: int = 64,
        norm_num_groups: int = 32,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] = ("blocks.1", "blocks.2"),
        layer_weights: Sequence[float] | None = None,
        pre_trained: bool = True,
        backbone_weights: str | Path | None = None,
        num_prototypes: int = 16,
        merge_threshold: float = 0.95,
        repository_patch_size: int = 32,
        repository_min_coverage: float = 0.25,
        residual_sigma: float = 2.0,
        repository_seed: int = 0,
        attention_dim: int = 64,
        parameterizer_width: int = 64,
        noise_scale: float = 1.6,
        foreground_weight: float = 1.0,
        mask_sigma: float = 2.0,
        structured_noise: bool = True,
        dp_sni: bool = True,
        detach_noise: bool = True,
        inference_timesteps: Sequence[int] = (100, 200, 300),
        pixel_weight: float = 1.0,
        feature_weight: float = 0.1,
        top_k: int = 50,
        score_from: str = "pixel",
        positional_statistics: bool = False,
        positional_shrinkage: float = 0.1,
        smoothing_sigma: float = 4.0,
        inference_seed: int = 0,
    ) -> None:
        super().__init__()
        if not inference_timesteps:
            msg = "inference_timesteps must name at least one noise level"
            raise ValueError(msg)
        if score_from not in {"pixel", "map"}:
            msg = f"score_from must be 'pixel' (top-k of the pixel discrepancy) or 'map' (of the anomaly map), got {score_from!r}"
            raise ValueError(msg)
        self.codec = LatentCodec(vae_path, latent_scale)
        self.schedule = NoiseSchedule(num_timesteps, beta_schedule)
        self.schedule.check_timesteps(list(inference_timesteps))
        self.denoiser = build_unet(
            self.codec.channels, self.codec.channels, block_out_channels, layers_per_block,
            attention_levels, attention_head_dim, norm_num_groups,
        )  # fmt: skip
        self.embedder = FeatureEmbedder(backbone, layers, layer_weights, pre_trained, backbone_weights)
        self.repository = DualPrototypeRepository(
            num_prototypes, merge_threshold, repository_patch_size, repository_min_coverage, residual_sigma, repository_seed
        )
        self.dp_sni = DPSNI(self.embedder.dim, self.codec.channels, attention_dim, parameterizer_width, noise_scale, foreground_weight, mask_sigma)
        self.latent_blur = gaussian_blur(residual_sigma, self.codec.channels)
        self.scorer = AnomalyScorer(smoothing_sigma, top_k)
        self.normaliser = MapStatistics((2,), image_size_pair(image_size), positional_shrinkage)  # pixel, feature
        self.positional_statistics = positional_statistics
        self.structured_noise = structured_noise
        self.use_dp_sni = dp_sni
        self.detach_noise = detach_noise
        self.inference_timesteps = tuple(int(t) for t in inference_timesteps)
        self.pixel_weight = pixel_weight
        self.feature_weight = feature_weight
        self.score_from = score_from
        self.inference_seed = inference_seed
        self.size_multiple = max(unet_downsampling_factor(block_out_channels) * self.codec.factor, self.embedder.size_multiple)

    # --- repository (Eqs. 6-9) -------------------------------------------------------------
    @property
    def needs_repository(self) -> bool:
        """Whether training needs the prototype repository (DP-SNI on) and it is still empty."""
        return self.structured_noise and self.use_dp_sni and not self.repository.is_fitted

    @torch.no_grad()
    def repository_features(self, images: torch.Tensor, anomalous: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded foreground and background noise patches of one batch (Eq. 6)."""
        patches = self.repository.noise_patches(images, anomalous, masks)
        return tuple(
            self.embedder.embed(p) if len(p) else torch.empty(0, self.embedder.dim, device=images.device)
            for p in patches
        )  # type: ignore[return-value]

    def build_repository(self, foreground_features: torch.Tensor, background_features: torch.Tensor) -> None:
        """K-Means + merging per set (Eqs. 7-9); the matcher's learnable prototypes start from them."""
        self.repository.fit(foreground_features, background_features)
        self.dp_sni.matcher.initialise(self.repository.background.prototypes, self.repository.foreground.prototypes)

    # --- noise --------------------------------------------------------------------------------
    def raw_noise(self, latents: torch.Tensor) -> torch.Tensor:
        """Unprocessed real noise (DP-SNI off): the latent's own high-frequency residual, unit variance per image."""
        return unit_variance(latents - self.latent_blur(latents))

    def gaussian_field(self, images: torch.Tensor, latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gaussian noise (structured noise off) on DP-SNI's grid, upsampled bicubically like its bases (Eq. 21)."""
        grid = self.embedder.grid(images.shape[-2:])
        base = gaussian_noise(latents.new_empty(latents.shape[0], latents.shape[1], *grid), generator)
        return F.interpolate(base, size=latents.shape[-2:], mode="bicubic", align_corners=False)

    def inject(
        self,
        images: torch.Tensor,
        latents: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, StructuredNoise | None]:
        """The forward-process noise ``eta`` for ``images`` (DP-SNI structured, raw real or Gaussian) and DP-SNI's outputs.

        Every variant is computed from the image being corrupted (the one carrying the synthetic defect in
        training, the test image at inference), so training and inference see the same kind of noise.
        """
        if not self.structured_noise:
            return self.gaussian_field(images, latents, generator), None
        if not self.use_dp_sni:
            return self.raw_noise(latents), None
        structured = self.dp_sni(self.embedder(images), latents.shape[-2:], generator)
        return structured.noise, structured

    def level_noises(self, images: torch.Tensor, latents: torch.Tensor) -> list[torch.Tensor]:
        """The seeded inference noise of every level; ``Phi`` and DP-SNI's parameters are computed once."""
        generators = [torch.Generator(device=images.device).manual_seed(self.inference_seed + i) for i in range(len(self.inference_timesteps))]
        if not self.structured_noise:
            return [self.gaussian_field(images, latents, g) for g in generators]
        if not self.use_dp_sni:
            return [self.raw_noise(latents)] * len(generators)
        parameters = self.dp_sni.parameterize(self.embedder(images))
        return [self.dp_sni.sample(parameters, latents.shape[-2:], g)[0] for g in generators]

    # --- forward ------------------------------------------------------------------------------
    def reconstruct(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Corrupt ``latents`` with ``noise`` at ``timesteps`` and reconstruct in one step (Eqs. 4-5)."""
        noisy = self.schedule.add_noise(latents, noise, timesteps)
        predicted = self.denoiser(noisy, timesteps).sample
        return self.codec.decode(self.schedule.predict_x0(noisy, predicted, timesteps)).clamp(-1, 1)

    def discrepancy(
        self,
        images: torch.Tensor,
        reconstruction: torch.Tensor,
        image_maps: list[torch.Tensor] | None = None,
        features: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel L1 (in ``[0, 1]`` units) and ``Phi`` cosine-distance maps ``[B, 1, H, W]``.

        ``image_maps``: ``Phi``'s layer maps of the inputs if already computed (see ``feature_distance_map``).
        ``features``: compute the feature term (default: only if it is weighted; else it is zero).
        """
        pixel = (images - reconstruction).abs().mean(dim=1, keepdim=True) / 2
        if not (bool(self.feature_weight) if features is None else features):
            return pixel, torch.zeros_like(pixel)
        return pixel, feature_distance_map(self.embedder, images, reconstruction, image_maps)

    def forward(
        self,
        images: torch.Tensor,
        anomalous: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> DpnrOutput | InferenceBatch:
        """Training needs ``anomalous`` images and their ``masks``; inference only ``images`` (all ``[-1, 1]``)."""
        check_images(images, 3, self.size_multiple, "Dpnr")
        if not self.training:
            return self.predict(images)
        if anomalous is None or masks is None or anomalous.shape != images.shape:
            msg = "Dpnr training needs anomalous images of the same shape as the normal ones, and their masks"
            raise ValueError(msg)
        if self.needs_repository:
            msg = "Dpnr: the prototype repository is empty; build it first (anomalib_dpnr.Dpnr does this when fit starts)"
            raise RuntimeError(msg)
        z_s, z_a = self.codec.encode(images), self.codec.encode(anomalous)
        timesteps = self.schedule.sample_timesteps(images.shape[0], images.device)
        ratio = (timesteps.float() / self.schedule.num_timesteps).view(-1, 1, 1, 1)
        z_syn = (1 - ratio) * z_s + ratio * z_a  # Eq. 12
        eta, structured = self.inject(anomalous, z_a)
        if self.detach_noise:  # the denoiser's loss must not shrink the noise it is asked to predict
            eta = eta.detach()
        noisy = self.schedule.add_noise(z_syn, eta, timesteps)  # Eq. 4
        predicted = self.denoiser(noisy, timesteps).sample
        abar = self.schedule.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        ideal = (noisy - abar.sqrt() * z_s) / (1 - abar).clamp_min(1e-8).sqrt()
        latent_mask = F.adaptive_avg_pool2d(masks.reshape(images.shape[0], 1, *images.shape[-2:]).float(), z_s.shape[-2:])
        output = DpnrOutput(noisy, predicted, eta, ideal, latent_mask, self.schedule.snr(timesteps), timesteps, structured)
        if structured is not None:  # what DP-SNI's parameterizers imitate (loss.InjectionLoss)
            output.background_noise = self.raw_noise(z_s)
            output.foreground_noise = unit_variance(z_a - z_s, latent_mask)
        return output

    @torch.no_grad()
    def mean_discrepancy(self, images: torch.Tensor, features: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel and ``Phi`` discrepancy maps of one-step reconstructions, averaged over the inference levels.

        ``Phi`` of the input and DP-SNI's parameters are computed once; the levels share one denoiser pass.
        ``features``: compute the feature term (default: only if it is weighted; else it is zero).
        """
        features = bool(self.feature_weight) if features is None else features
        batch, levels = images.shape[0], len(self.inference_timesteps)
        latents = self.codec.encode(images)
        noise = torch.cat(self.level_noises(images, latents))
        timesteps = torch.tensor(self.inference_timesteps, device=images.device).repeat_interleave(batch)
        reconstruction = self.reconstruct(latents.repeat(levels, 1, 1, 1), noise, timesteps)
        image_maps = self.embedder.layer_maps(images) if features else None
        pixel, feature = self.discrepancy(images.repeat(levels, 1, 1, 1), reconstruction, image_maps, features)
        return tuple(m.view(levels, batch, *m.shape[1:]).mean(dim=0) for m in (pixel, feature))  # type: ignore[return-value]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> InferenceBatch:
        """Anomaly map and image score of ``images`` (see :meth:`score_maps`)."""
        return self.score_maps(*self.mean_discrepancy(images))

    def validation_terms(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both discrepancy terms, whatever ``feature_weight`` is (for choosing it: ``FittedTermWeight``)."""
        return self.mean_discrepancy(images, features=True)

    def statistics_maps(self, images: torch.Tensor) -> torch.Tensor:
        """``[2, B, 1, H, W]`` pixel and feature discrepancy maps (what ``normaliser`` is fitted on)."""
        return torch.stack(self.mean_discrepancy(images, features=True))

    def normalised(self, pixel: torch.Tensor, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both terms standardised per pixel position with training-image statistics (``positional_statistics``),
        else as they are."""
        if not self.positional_statistics:
            return pixel, feature
        return self.normaliser(pixel, 0, "position"), self.normaliser(feature, 1, "position")

    def weighted_terms(self, pixel: torch.Tensor, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(base, extra)`` with the map before smoothing ``base + feature_weight * extra``."""
        pixel, feature = self.normalised(pixel, feature)
        return self.pixel_weight * pixel, feature

    def score_maps(self, pixel: torch.Tensor, feature: torch.Tensor) -> InferenceBatch:
        """Anomaly map ``pixel_weight * pixel + feature_weight * feature`` (smoothed) and its top-k image score."""
        pixel, feature = self.normalised(pixel, feature)
        anomaly_map = self.scorer.blur(self.pixel_weight * pixel + self.feature_weight * feature)
        # the image score from the pixel discrepancy alone (chosen on validation data) or from the whole map
        score_map = anomaly_map if self.score_from == "map" else self.scorer.blur(pixel)
        pred_score = topk_mean(score_map, self.scorer.top_k)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
