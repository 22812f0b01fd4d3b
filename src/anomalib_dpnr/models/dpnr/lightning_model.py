"""DPNR as an anomalib model.

Paper: "DPNR: A Dual-Prototype Noise Repository Based on Prototype Learning for Anomaly Detection"
(``../shared/papers/000_73961bd3366ab4eb.txt``). No public code exists; choices where the paper is
silent are listed in ``models/dpnr/README.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch.utils.data import DataLoader, Dataset

from anomalib_dpnr.components import (
    DiffusionAnomalyModule,
    SyntheticAnomalyGenerator,
    check_images,
    from_unit_range,
    to_unit_range,
)
from anomalib_dpnr.components.statistics import FittedMapStatistics, check_statistics_images
from anomalib_dpnr.components.term_weights import FittedTermWeight, check_weights

from .loss import EpsilonLoss, InjectionLoss, RHNLoss
from .torch_model import DpnrModel

__all__ = ["Dpnr"]


class Dpnr(FittedTermWeight, FittedMapStatistics, DiffusionAnomalyModule):
    """DPNR: diffusion with structured noise from a dual-prototype noise repository.

    Args:
        image_size: Side (or ``(H, W)``) images are resized to (paper: 256).
        vae_path: Local/offline-cached diffusers ``AutoencoderKL`` for the latent space ``E``
            (paper: a pretrained encoder, Eqs. 10-11); ``None`` = pixel space.
        latent_scale: ``c_scale``; default: the VAE's scaling factor (1 in pixel space).
        num_timesteps: Diffusion steps ``T``.
        beta_schedule: diffusers schedule name (paper: cosine, Eq. 25).
        block_out_channels: Denoising U-Net width per level.
        layers_per_block: ResNet blocks per level.
        attention_levels: Levels with self-attention.
        attention_head_dim: Channels per attention head.
        norm_num_groups: GroupNorm groups of the denoiser.
        backbone: timm backbone of the feature extractor ``Phi``.
        layers: Backbone layers fused into ``F`` (Eq. 13).
        layer_weights: Fusion weights ``w_l`` (default: all 1).
        pre_trained: ImageNet weights for ``Phi`` from the offline HF cache.
        backbone_weights: Local state-dict file for ``Phi`` instead.
        num_prototypes: ``K`` K-Means prototypes per set (Eq. 7).
        merge_threshold: Cosine threshold ``tau`` for merging prototypes (Eq. 8).
        repository_patch_size: Noise patch side in pixels.
        repository_min_coverage: Share of a foreground patch covered by the synthetic defect.
        repository_images: Training images used to build the repository (at most).
        residual_sigma: Blur sigma whose residual is background noise.
        repository_seed: Seed of the repository's synthetic defects and K-Means.
        attention_dim: Prototype matcher query/key width.
        parameterizer_width: Hidden width of ``Psi_bg``/``Psi_fg``.
        noise_scale: ``C`` of Eq. 19.
        foreground_weight: ``w_fg`` of Eq. 21.
        mask_sigma: Gaussian sigma of ``G_blur`` (Eq. 20), latent pixels.
        rhn_alpha: Initial blend logit ``alpha`` (Eq. 24).
        rhn_beta: Initial foreground-weight logit ``beta`` (Eq. 28).
        background_weight: ``c`` of Eq. 28.
        snr_clamp: Upper bound of the SNR weight (Eq. 27).
        learn_loss_weights: Train ``alpha``/``beta`` (paper) or keep them fixed.
        structured_noise: Ablation: ``False`` = plain Gaussian noise (Table 2).
        dp_sni: Ablation: ``False`` = raw, unprocessed real noise instead of DP-SNI (Table 2).
        rhn_loss: Ablation: ``False`` = the standard epsilon loss (Table 2).
        detach_noise: Keep the denoiser's loss from reaching DP-SNI (``False`` = the paper's literal
            end-to-end training, whose noise collapses towards zero; see the README).
        nll_weight: Weight of DP-SNI's real-noise likelihood term (``InjectionLoss``).
        mask_weight: Weight of DP-SNI's foreground-attention term (``InjectionLoss``).
        kl_weight: Weight of DP-SNI's N(0, 1) prior on both parameterizers' Gaussians (``InjectionLoss``; chosen on
            bottle's validation half over three seeds: 1 over 0, see the README).
        inference_timesteps: Noise levels whose one-step reconstructions are averaged.
        pixel_weight: Weight of the pixel discrepancy in the anomaly map.
        feature_weight: Weight of the ``Phi`` feature discrepancy in the anomaly map (used as given when
            ``feature_weight_choices`` is null or the validation split has no anomalous pixels).
        feature_weight_choices: Weights ``feature_weight`` is chosen from on the validation split, like the
            thresholds: the one whose map has the highest pixel AUROC + PRO on the validation masks (saved in the
            checkpoint); null keeps ``feature_weight``. The paper gives no weight; see the README.
        top_k: Pixels averaged into the image score.
        score_from: Map whose top-k mean is the image score: ``"pixel"`` (the pixel discrepancy alone) or
            ``"map"`` (the anomaly map); ``benchmarks/dpnr_inference.py`` compares both on a checkpoint.
        positional_statistics: Standardise both discrepancy terms per pixel position with the mean and standard
            deviation at that position over ``statistics_images`` training images (fitted when validation starts
            during fit), so positions high on normal images too (borders, an aligned object's fixed structure) are
            discounted there only. Off: the raw terms (no statistics are fitted).
        positional_shrinkage: Share of the term's variance over all pixels added to each position's variance.
        statistics_images: Training images (at most) the statistics are computed on.
        smoothing_sigma: Gaussian sigma on the anomaly map (0 disables).
        inference_seed: Seed of the fixed inference noise.
        anomaly_source_path: Texture folder for synthetic anomalies ``x_a``; ``None`` = self-texture.
        anomaly_probability: Share of training images that get a synthetic anomaly.
        blend_factor: Range of the synthetic anomaly opacity.
        anomaly_shuffle_probability: Share of self-textured anomalies that are grid-shuffled; the others change
            the region's tone and texture only (``SyntheticAnomalyGenerator.shuffle_probability``).
        use_foreground: Keep synthetic anomalies on the estimated object foreground.
        foreground_threshold: Colour distance to the border colour that counts as foreground.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        inference_dtype: Precision of the denoiser and the latent autoencoder at inference: ``"float32"``,
            ``"bfloat16"`` (about half the CPU time on CPUs with AVX512-BF16/AMX) or ``"float16"`` (CUDA). Training
            is unaffected.
        seed: ``lightning.seed_everything(seed)`` before the networks are built: weights, synthetic
            anomalies and data order repeat exactly (``None``: unseeded; the CLI's ``seed_everything`` is not applied).
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 256,
        vae_path: str | None = None,
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
        backbone_weights: str | None = None,
        num_prototypes: int = 16,
        merge_threshold: float = 0.95,
        repository_patch_size: int = 32,
        repository_min_coverage: float = 0.25,
        repository_images: int = 256,
        residual_sigma: float = 2.0,
        repository_seed: int = 0,
        attention_dim: int = 64,
        parameterizer_width: int = 64,
        noise_scale: float = 1.6,
        foreground_weight: float = 1.0,
        mask_sigma: float = 2.0,
        rhn_alpha: float = 0.0,
        rhn_beta: float = 0.0,
        background_weight: float = 4.0,
        snr_clamp: float = 5.0,
        learn_loss_weights: bool = True,
        structured_noise: bool = True,
        dp_sni: bool = True,
        rhn_loss: bool = True,
        detach_noise: bool = True,
        nll_weight: float = 1.0,
        mask_weight: float = 1.0,
        kl_weight: float = 1.0,
        inference_timesteps: Sequence[int] = (100, 200, 300),
        pixel_weight: float = 1.0,
        feature_weight: float = 0.1,
        feature_weight_choices: Sequence[float] | None = (0.0, 0.1, 1.0),
        top_k: int = 50,
        score_from: str = "pixel",
        positional_statistics: bool = False,
        positional_shrinkage: float = 0.1,
        statistics_images: int = 256,
        smoothing_sigma: float = 4.0,
        inference_seed: int = 0,
        anomaly_source_path: str | Path | None = None,
        anomaly_probability: float = 0.5,
        blend_factor: tuple[float, float] = (0.2, 1.0),
        anomaly_shuffle_probability: float = 1.0,
        use_foreground: bool = True,
        foreground_threshold: float = 0.1,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
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
        self.statistics_images = check_statistics_images(statistics_images)
        self.model = DpnrModel(
            image_size=image_size,
            vae_path=vae_path,
            latent_scale=latent_scale,
            num_timesteps=num_timesteps,
            beta_schedule=beta_schedule,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            attention_levels=attention_levels,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            backbone=backbone,
            layers=layers,
            layer_weights=layer_weights,
            pre_trained=pre_trained,
            backbone_weights=backbone_weights,
            num_prototypes=num_prototypes,
            merge_threshold=merge_threshold,
            repository_patch_size=repository_patch_size,
            repository_min_coverage=repository_min_coverage,
            residual_sigma=residual_sigma,
            repository_seed=repository_seed,
            attention_dim=attention_dim,
            parameterizer_width=parameterizer_width,
            noise_scale=noise_scale,
            foreground_weight=foreground_weight,
            mask_sigma=mask_sigma,
            structured_noise=structured_noise,
            dp_sni=dp_sni,
            detach_noise=detach_noise,
            inference_timesteps=inference_timesteps,
            pixel_weight=pixel_weight,
            feature_weight=feature_weight,
            top_k=top_k,
            score_from=score_from,
            positional_statistics=positional_statistics,
            positional_shrinkage=positional_shrinkage,
            smoothing_sigma=smoothing_sigma,
            inference_seed=inference_seed,
        )
        self.loss = (
            RHNLoss(rhn_alpha, rhn_beta, background_weight, snr_clamp, learn_loss_weights) if rhn_loss else EpsilonLoss()
        )
        self.injection_loss = InjectionLoss(noise_scale, nll_weight, mask_weight, kl_weight)
        generator_args = {
            "anomaly_source_path": anomaly_source_path,
            "blend_factor": tuple(blend_factor),
            "shuffle_probability": anomaly_shuffle_probability,
            "use_foreground": use_foreground,
            "foreground_threshold": foreground_threshold,
        }
        self.generator = SyntheticAnomalyGenerator(probability=anomaly_probability, **generator_args)
        self.repository_generator = SyntheticAnomalyGenerator(probability=1.0, **generator_args)
        self.feature_weight_choices = check_weights(feature_weight_choices, "feature_weight_choices")
        self.repository_images = repository_images
        self.repository_seed = repository_seed
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay

    @property
    def fits_statistics(self) -> bool:
        """The map statistics are fitted only when the map reads them (``positional_statistics``)."""
        return self.model.positional_statistics

    def setup(self, stage: str | None = None) -> None:
        """Build the prototype repository from the training set before training starts."""
        super().setup(stage)
        if stage == "fit" and self.model.needs_repository:
            datamodule = getattr(self.trainer, "datamodule", None)
            if getattr(datamodule, "train_data", None) is None:
                msg = "Dpnr builds its noise repository from the datamodule's train_data; fit with a datamodule"
                raise RuntimeError(msg)
            self.build_repository(datamodule.train_data)

    @torch.no_grad()
    def build_repository(self, dataset: Dataset, batch_size: int = 16) -> None:
        """Embed noise patches of up to ``repository_images`` training images and fit ``M_fg``, ``M_bg``.

        Deterministic for a ``repository_seed`` (fixed image order, seeded synthetic defects), so
        every DDP rank builds the same repository.
        """
        if len(dataset) == 0:
            msg = "Dpnr: cannot build the noise repository from an empty training set"
            raise ValueError(msg)
        indices = list(range(min(len(dataset), self.repository_images)))
        loader = DataLoader(
            torch.utils.data.Subset(dataset, indices),
            batch_size=batch_size,
            shuffle=False,
            collate_fn=getattr(dataset, "collate_fn", None),
        )
        foreground, background = [], []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.repository_seed)
            for batch in loader:
                images = self.pre_processor.transform(batch.image) if self.pre_processor else batch.image
                check_images(images, 3, self.model.size_multiple, "Dpnr (building the noise repository)")
                anomalous, masks = self.repository_generator(to_unit_range(images))
                fg, bg = self.model.repository_features(images, from_unit_range(anomalous), masks)
                foreground.append(fg.cpu())
                background.append(bg.cpu())
        self.model.build_repository(torch.cat(foreground), torch.cat(background))

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Synthesise ``x_a``, inject structured noise into ``z_syn(t)``, RHN-Loss (Fig. 2)."""
        del args, kwargs
        anomalous, masks = self.generator(to_unit_range(batch.image))
        output = self.model(batch.image, from_unit_range(anomalous), masks)
        losses = self.loss(output.predicted, output.structured, output.ideal, output.mask, output.snr)
        if output.dp_sni is not None:  # DP-SNI on: its own objective (see InjectionLoss)
            injection = self.injection_loss(
                output.dp_sni.parameters, output.dp_sni.kl, output.background_noise, output.foreground_noise, output.mask
            )
            losses = {**losses, "loss": losses["loss"] + injection.pop("loss"), **injection}
        return self.log_losses(losses, batch.image.shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW on the denoiser, DP-SNI and the RHN-Loss weights; ``Phi`` and the VAE stay frozen."""
        parameters = [p for p in [*self.model.parameters(), *self.loss.parameters()] if p.requires_grad]
        return torch.optim.AdamW(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)
