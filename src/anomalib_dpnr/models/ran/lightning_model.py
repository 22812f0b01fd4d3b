"""RAN as an anomalib model: Removing Anomalies as Noises (Lu et al., ICCV 2023).

Training learns the denoiser with learned variance and its feature head (``loss.RanLoss``). When fit starts, the
gradient-denoising Gaussian is fitted on the training images' backbone features; when validation starts during fit,
the per-level normalisation statistics of the KL and feature maps are computed on training images with the current
networks; with ``alpha_choices``, Eq. 11's ``alpha`` is then chosen on the validation masks. All are saved in the
checkpoint. Equations, reference details and choices where the paper is silent: ``models/ran/README.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

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

from .loss import RanLoss
from .torch_model import RanModel

__all__ = ["Ran"]


class Ran(FittedTermWeight, FittedMapStatistics, DiffusionAnomalyModule):
    """RAN: pixel KL and feature scores over a noise ensemble, with optional gradient denoising.

    With ``alpha_choices``, Eq. 11's ``alpha`` is chosen on the validation split when it is scored (after the
    statistics are fitted) and saved in the checkpoint.

    Args:
        image_size: Side (or ``(H, W)``) images are resized to (reference: 256).
        num_timesteps: Diffusion steps ``T`` of training (reference: 1000).
        beta_schedule: diffusers schedule name (reference: linear).
        beta_start: First beta (reference: 1e-4).
        beta_end: Last beta (reference: 0.02).
        block_out_channels: Denoiser width per level (reference: guided-diffusion's 256 px model, base 256,
            multipliers 1, 1, 2, 2, 4, 4).
        layers_per_block: ResNet blocks per level (reference: 2).
        attention_levels: Levels with self-attention (reference: 32, 16 and 8 px).
        attention_head_dim: Channels per attention head (reference: 64).
        norm_num_groups: GroupNorm groups of the denoiser and the feature head.
        backbone: timm backbone whose features the head predicts (reference: EfficientNet-B4).
        feature_layers: Backbone layers the head predicts (concatenated on the finest one's grid).
        feature_block: Decoder block (index into the UNet's ``up_blocks``, 0 = deepest) the head reads.
        pre_trained: ImageNet weights from the offline HF cache.
        backbone_weights: Local state-dict file instead (any timm backbone).
        respacing: Steps of the respaced schedule scores are read on (reference: 250).
        inference_timesteps: Steps of the respaced schedule that are scored and ensembled (reference: 5, 50, 100).
        clip_denoised: Clip the predicted ``x_0`` to ``[-1, 1]`` in ``p_theta``'s mean at inference.
        alpha: Weight of the normalised KL map against the feature map (Eq. 11; reference 1 : 1, i.e. 0.5; used as
            given when ``alpha_choices`` is null or the validation split has no anomalous pixels).
        alpha_choices: Values ``alpha`` is chosen from on the validation split: the one whose smoothed map has the
            highest pixel AUROC + PRO on the validation masks (``components.term_weights``; saved in the checkpoint).
            Null (reference) keeps ``alpha``.
        normalise_features: Standardise the feature maps per level too (Eq. 11 standardises the KL maps only).
        positional_statistics: Standardise each map pixel by the training images' mean and standard deviation at
            that pixel position (per term and level) instead of one mean and standard deviation per level. Both
            are fitted and saved; this only chooses the reading.
        positional_shrinkage: Share of the level's variance over all pixels added to each position's variance
            (guards positions where the training maps barely vary, such as a constant background).
        statistics_images: Training images (at most) the normalisation statistics are computed on.
        top_k: Image score = mean of the ``top_k`` largest map values (reference: 64).
        smoothing_sigma: Gaussian sigma on the anomaly map (0: none).
        gradient_denoising: Score the gradient-denoised reconstruction (Algorithm 1); the reference evaluates
            without it.
        guidance_layers: Backbone layers of the PaDiM Gaussian (reference: WRN50-2 layers 1-3).
        guidance_features: Random channels kept for the Gaussian (reference: 500 of WRN50-2's 1792).
        guidance_iterations: Gradient-denoising iterations ``N`` (reference: 100).
        guidance_step: Step of the respaced schedule whose ``beta`` and reverse step Algorithm 1 uses (reference: 8).
        denoise_every: ``N_d``: a reverse step after every ``N_d`` gradient updates.
        inference_seed: Seed of the inference noise (and of the Gaussian's random channels).
        vb_weight: Weight of the variational-bound term (1 = improved DDPM's hybrid loss).
        feature_weight: Weight of the feature MSE (reference: 1).
        learning_rate: AdamW learning rate (reference: 1e-4).
        weight_decay: AdamW weight decay (reference: 0).
        inference_dtype: Precision of the denoiser at inference: ``"float32"``, ``"bfloat16"`` (about half the
            CPU time on CPUs with AVX512-BF16/AMX) or ``"float16"`` (CUDA). Training is unaffected.
        seed: ``lightning.seed_everything(seed)`` before the networks are built (``None``: unseeded).
    """

    fitted_weight = "alpha"  # FittedTermWeight chooses Eq. 11's alpha from alpha_choices

    def __init__(
        self,
        image_size: int | tuple[int, int] = 256,
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
        backbone_weights: str | None = None,
        respacing: int = 250,
        inference_timesteps: Sequence[int] = (5, 50, 100),
        clip_denoised: bool = True,
        alpha: float = 0.5,
        alpha_choices: Sequence[float] | None = None,
        normalise_features: bool = False,
        positional_statistics: bool = False,
        positional_shrinkage: float = 0.1,
        statistics_images: int = 256,
        top_k: int = 64,
        smoothing_sigma: float = 4.0,
        gradient_denoising: bool = False,
        guidance_layers: Sequence[str] = ("blocks.2", "blocks.4"),
        guidance_features: int = 100,
        guidance_iterations: int = 100,
        guidance_step: int = 8,
        denoise_every: int = 1,
        inference_seed: int = 0,
        vb_weight: float = 1.0,
        feature_weight: float = 1.0,
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
        self.alpha_choices = check_weights(alpha_choices, "alpha_choices")
        if self.alpha_choices and max(self.alpha_choices) > 1:
            msg = f"alpha_choices must lie in [0, 1], got {list(alpha_choices)}"
            raise ValueError(msg)
        self.model = RanModel(
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
            feature_layers=feature_layers,
            feature_block=feature_block,
            pre_trained=pre_trained,
            backbone_weights=backbone_weights,
            respacing=respacing,
            inference_timesteps=inference_timesteps,
            clip_denoised=clip_denoised,
            alpha=alpha,
            normalise_features=normalise_features,
            positional_statistics=positional_statistics,
            positional_shrinkage=positional_shrinkage,
            image_size=image_size,
            top_k=top_k,
            smoothing_sigma=smoothing_sigma,
            gradient_denoising=gradient_denoising,
            guidance_layers=guidance_layers,
            guidance_features=guidance_features,
            guidance_iterations=guidance_iterations,
            guidance_step=guidance_step,
            denoise_every=denoise_every,
            inference_seed=inference_seed,
        )
        self.loss = RanLoss(vb_weight, feature_weight)
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay

    # --- fitted state ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_guide(self, dataset: Dataset) -> None:
        """PaDiM Gaussian of the training images' guidance embeddings (Algorithm 1's ``N(mu, Sigma)``)."""
        self.model.guide.fit(torch.cat([self.model.guidance_embedding(images) for images in self.training_images(dataset)]))

    def setup(self, stage: str | None = None) -> None:
        """Fit the gradient-denoising Gaussian from the training set when fit starts."""
        super().setup(stage)
        if stage == "fit":
            self.fit_guide(self.fitting_data("the gradient-denoising Gaussian"))

    # --- training -------------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Hybrid eps-MSE + VB loss and feature MSE of one noising per image."""
        del args, kwargs
        losses = self.loss(self.model(batch.image), self.model.schedule)
        return self.log_losses(losses, batch.image.shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the denoiser and the feature head (the backbone is frozen)."""
        parameters = [*self.model.denoiser.parameters(), *self.model.feature_head.parameters()]
        return torch.optim.AdamW(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)

    def to_onnx(self, export_root: Path | str, model_file_name: str = "model", input_size: tuple[int, int] | None = None, **kwargs: Any) -> Path:
        """ONNX export (``DiffusionAnomalyModule.to_onnx``); gradient denoising differentiates through the backbone,
        which an exported graph cannot, so it must be off."""
        if self.model.gradient_denoising:
            msg = "Ran: gradient denoising cannot be exported (it differentiates through the backbone); set gradient_denoising false"
            raise ValueError(msg)
        return super().to_onnx(export_root, model_file_name, input_size=input_size, **kwargs)
