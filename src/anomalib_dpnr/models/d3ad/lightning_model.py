"""D3AD as an anomalib model, with DDAD as a configuration of it.

Papers: Tebbe & Tayyub, "Dynamic Addition of Noise in a Diffusion Model for Anomaly Detection" (CVPR
workshops 2024; summary ``../shared/papers/004_f48d1efee7acc5ee.txt``) and Mousakhan et al., "Anomaly
Detection with Conditioned Denoising Diffusion Models" (DDAD). Equations, components and our choices where
the papers are silent: ``models/d3ad/README.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch.utils.data import Dataset

from anomalib_dpnr.components import DiffusionAnomalyModule
from anomalib_dpnr.components.statistics import FittedMapStatistics, check_statistics_images
from anomalib_dpnr.components.term_weights import FittedTermWeight, check_weights

from .loss import DenoisingLoss, DomainAdaptationLoss
from .torch_model import D3ADModel

__all__ = ["D3AD"]


class D3AD(FittedTermWeight, FittedMapStatistics, DiffusionAnomalyModule):
    """D3AD: kNN-guided dynamic noise step, scaled conditioned DDIM reconstruction, domain-adapted features.

    One ``anomalib train`` runs three phases: ``setup("fit")`` builds the kNN feature bank and its histogram
    from the training images; with ``autoencoder_channels`` the first ``autoencoder_epochs`` train the latent
    autoencoder, after which its latent scale is fitted and it stays frozen; the next epochs train the denoiser,
    the last ``domain_adaptation_epochs`` fine-tune the backbone copy (denoiser frozen); when validation
    starts during fit, the map-normalisation statistics are fitted on the training images with the current
    networks. Validate at the last epoch (the configs do) so the saved checkpoint holds all three.

    Args:
        image_size: Side (or ``(H, W)``) images are resized to (reference: 256).
        vae_path: Local/offline-cached diffusers ``AutoencoderKL`` (reference: Stable Diffusion's VAE,
            256 px -> 32x32x4); ``None`` = pixel space (DDAD).
        latent_scale: Latent scaling; default: the VAE's scaling factor (1 in pixel space; fitted as 1 / std of the
            training latents for a trained autoencoder).
        autoencoder_channels: Instead of a pretrained VAE, a small ``AutoencoderKL`` of these widths (each level but
            the last halves the resolution) trained from scratch on the training images in the first
            ``autoencoder_epochs`` epochs, then frozen (``components.LatentCodec``); ``None``: none.
        latent_channels: Latent channels of that autoencoder (Stable Diffusion's: 4).
        autoencoder_norm_groups: Its GroupNorm groups (must divide every width); default: ``norm_num_groups``.
        autoencoder_epochs: First epochs of ``max_epochs`` spent training it (needs ``autoencoder_channels``).
        autoencoder_learning_rate: Its AdamW learning rate.
        autoencoder_kl_weight: Weight of its KL term against the L1 reconstruction (latent diffusion's KL-f: 1e-6).
        num_timesteps: Diffusion steps ``T`` (reference: 1000).
        beta_schedule: diffusers schedule name (reference: linear).
        beta_start: First beta (reference: 0.0015).
        beta_end: Last beta (reference: 0.0195).
        block_out_channels: Denoiser width per level (reference: base 192, multipliers 1, 2, 2, 4, 4).
        layers_per_block: ResNet blocks per level.
        attention_levels: Denoiser levels with self-attention.
        attention_head_dim: Channels per attention head.
        norm_num_groups: GroupNorm groups of the denoiser (and, by default, of the trained autoencoder).
        backbone: timm backbone for the kNN estimate and the feature distance.
        knn_layer: Backbone layer of the kNN estimate (reference: ResNet34 ``layer2``).
        layers: Backbone layers of the feature distance (reference: ``layer2``, ``layer3``).
        pre_trained: ImageNet weights from the offline HF cache.
        backbone_weights: Local state-dict file instead (e.g. ResNet34 / WideResNet weights).
        knn_k: Neighbours of the kNN distance (reference: 20).
        knn_pool_size: The kNN layer is average-pooled to this many regions per side (reference: 16).
        knn_bins: Histogram bins over training kNN distances (reference: 10).
        min_bin: Smallest bin used for the step (reference: 2).
        max_step: Step of the last bin (reference: 80).
        step_rounding: Steps are rounded to multiples of this (reference: 10).
        step_mode: ``image`` (dynamic step per image), ``region`` (per kNN region) or ``fixed`` (DDAD).
        fixed_step: Start step in ``fixed`` mode (DDAD: 250).
        ddim_steps: DDIM steps from the start step down to 0 (reference: 10).
        add_noise: Add Gaussian noise to the start state (DDAD) instead of only scaling it (D3AD).
        condition_weight: Implicit-conditioning weight ``w`` (reference D3AD: 4; DDAD: 2-3).
        domain_adaptation: Fine-tune a copy of the backbone for the feature distance.
        domain_adaptation_epochs: Last epochs of ``max_epochs`` spent on it (reference: 1).
        adaptation_steps: Range of start steps of the reconstructions it trains on (reference: 8..80).
        adaptation_learning_rate: AdamW learning rate of the copy (reference: 1e-4).
        frozen_weight: DDAD's weight of the terms keeping the copy near the frozen backbone (DDAD: 0.1; D3AD: 0).
        pixel_weight: Weight of the normalised latent/pixel distance (reference: 0.85).
        feature_weight: Weight of the normalised feature distance (reference: 0.15; used as given when
            ``feature_weight_choices`` is null or the validation split has no anomalous pixels).
        feature_weight_choices: Weights ``feature_weight`` is chosen from on the validation split, like the
            thresholds: the one whose map has the highest pixel AUROC + PRO on the validation masks (saved in the
            checkpoint); null (reference) keeps ``feature_weight``.
        feature_pooling: Mean-filter size on backbone features before the cosine distance (DDAD: 3).
        normalise_maps: Normalise each map term with statistics of training images' maps (reference: min-max).
        positional_statistics: Standardise each term per pixel position instead of min-max: the mean and standard
            deviation at each position over the training images, so positions high on normal images too (borders,
            an aligned object's fixed structure) are discounted there only. Both are fitted, so either reads a
            checkpoint.
        positional_shrinkage: Share of the term's variance over all pixels added to each position's variance, so
            positions that barely vary on training images do not turn small differences into huge scores.
        statistics_images: Training images (at most) the normalisation statistics are computed on.
        smoothing_sigma: Gaussian sigma on the anomaly map (reference: 4).
        inference_seed: Seed of the fixed inference noise (``add_noise`` only).
        learning_rate: AdamW learning rate of the denoiser (reference: 1e-4).
        weight_decay: AdamW weight decay (torch's default, as the reference's AdamW).
        inference_dtype: Precision of the denoiser and the latent autoencoder at inference: ``"float32"``,
            ``"bfloat16"`` (about half the CPU time on CPUs with AVX512-BF16/AMX) or ``"float16"`` (CUDA). Training
            is unaffected.
        seed: ``lightning.seed_everything(seed)`` before the networks are built (``None``: unseeded).
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 256,
        vae_path: str | None = None,
        latent_scale: float | None = None,
        autoencoder_channels: Sequence[int] | None = None,
        latent_channels: int = 4,
        autoencoder_norm_groups: int | None = None,
        autoencoder_epochs: int = 0,
        autoencoder_learning_rate: float = 1e-3,
        autoencoder_kl_weight: float = 1e-6,
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
        backbone_weights: str | None = None,
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
        domain_adaptation_epochs: int = 1,
        adaptation_steps: tuple[int, int] = (8, 80),
        adaptation_learning_rate: float = 1e-4,
        frozen_weight: float = 0.0,
        pixel_weight: float = 0.85,
        feature_weight: float = 0.15,
        feature_weight_choices: Sequence[float] | None = None,
        feature_pooling: int = 1,
        normalise_maps: bool = True,
        positional_statistics: bool = False,
        positional_shrinkage: float = 0.1,
        statistics_images: int = 256,
        smoothing_sigma: float = 4.0,
        inference_seed: int = 0,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        inference_dtype: str = "float32",
        seed: int | None = None,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            image_size=image_size,
            seed=seed,
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
            inference_dtype=inference_dtype,
        )
        if domain_adaptation and domain_adaptation_epochs < 1:
            msg = f"domain_adaptation needs domain_adaptation_epochs >= 1, got {domain_adaptation_epochs} (or set domain_adaptation: false)"
            raise ValueError(msg)
        self.statistics_images = check_statistics_images(statistics_images)
        if positional_statistics and not normalise_maps:
            msg = "positional_statistics reads the map-normalisation statistics: it needs normalise_maps true"
            raise ValueError(msg)
        self.configure_autoencoder_phase(
            autoencoder_channels, autoencoder_epochs, autoencoder_learning_rate, autoencoder_kl_weight, statistics_images
        )
        self.model = D3ADModel(
            image_size=image_size,
            vae_path=vae_path,
            latent_scale=latent_scale,
            autoencoder_channels=autoencoder_channels,
            latent_channels=latent_channels,
            autoencoder_norm_groups=autoencoder_norm_groups,
            num_timesteps=num_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            attention_levels=attention_levels,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            backbone=backbone,
            knn_layer=knn_layer,
            layers=layers,
            pre_trained=pre_trained,
            backbone_weights=backbone_weights,
            knn_k=knn_k,
            knn_pool_size=knn_pool_size,
            knn_bins=knn_bins,
            min_bin=min_bin,
            max_step=max_step,
            step_rounding=step_rounding,
            step_mode=step_mode,
            fixed_step=fixed_step,
            ddim_steps=ddim_steps,
            add_noise=add_noise,
            condition_weight=condition_weight,
            domain_adaptation=domain_adaptation,
            adaptation_steps=tuple(adaptation_steps),
            pixel_weight=pixel_weight,
            feature_weight=feature_weight,
            feature_pooling=feature_pooling,
            normalise_maps=normalise_maps,
            positional_statistics=positional_statistics,
            positional_shrinkage=positional_shrinkage,
            smoothing_sigma=smoothing_sigma,
            inference_seed=inference_seed,
        )
        self.feature_weight_choices = check_weights(feature_weight_choices, "feature_weight_choices")
        self.loss = DenoisingLoss()
        self.adaptation_loss = DomainAdaptationLoss(frozen_weight)
        self.domain_adaptation_epochs = domain_adaptation_epochs if domain_adaptation else 0
        self.adaptation_learning_rate = adaptation_learning_rate
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay

    # --- fitted state ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def build_bank(self, dataset: Dataset) -> None:
        """kNN feature bank, leave-one-out training distances and histogram bins from all training images."""
        self.model.dynamic.fit(torch.cat([self.model.bank_features(images) for images in self.training_images(dataset)]))

    @property
    def fits_statistics(self) -> bool:
        """The map-normalisation statistics are fitted only when the map reads them (``normalise_maps``)."""
        return self.model.normalise_maps

    def setup(self, stage: str | None = None) -> None:
        """Check the epochs leave room for the denoiser; build the kNN bank from the training set."""
        super().setup(stage)
        if stage != "fit":
            return
        hint = " or set domain_adaptation: false" if self.domain_adaptation_epochs else ""
        self.check_denoiser_epochs({"domain_adaptation_epochs": self.domain_adaptation_epochs}, hint)
        if self.model.needs_bank:
            self.build_bank(self.fitting_data("the kNN feature bank"))

    # --- training -------------------------------------------------------------------------------------------
    @property
    def adapting(self) -> bool:
        """Whether this epoch fine-tunes the backbone copy (the last ``domain_adaptation_epochs`` of ``max_epochs``)."""
        if not self.domain_adaptation_epochs or self._trainer is None:
            return False
        max_epochs = self.trainer.max_epochs
        return max_epochs is not None and max_epochs >= 0 and self.trainer.current_epoch >= max_epochs - self.domain_adaptation_epochs

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Autoencoder epochs: L1 + KL. Denoiser epochs: DDPM loss. Adaptation epochs: feature consistency of the
        backbone copy."""
        del args, kwargs
        if self.training_autoencoder:
            return self.autoencoder_step(batch.image)
        if self.adapting:
            phase, losses = "adaptation", self.adaptation_loss(*self.model.adaptation_features(batch.image))
        else:
            output = self.model(batch.image)
            phase, losses = "", self.loss(output.noise, output.predicted)
        return self.log_losses(losses, batch.image.shape[0], phase)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW with the denoiser, the backbone copy and the trained autoencoder as parameter groups; each phase's
        loss reaches only its own group (AdamW skips parameters without gradient). Backbone, pretrained VAE and bank
        stay frozen."""
        groups = [{"params": list(self.model.denoiser.parameters()), "lr": self.learning_rate}]
        groups += self.autoencoder_parameters()
        if self.model.adapted is not None:
            groups.append({"params": list(self.model.adapted.parameters()), "lr": self.adaptation_learning_rate})
        return torch.optim.AdamW(groups, lr=self.learning_rate, weight_decay=self.weight_decay)
