"""DiffusionAD as an anomalib model.

Paper: Zhang et al., "DiffusionAD: Norm-guided One-step Denoising Diffusion for Anomaly Detection".
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

from anomalib_dpnr.components import DiffusionAnomalyModule, SyntheticAnomalyGenerator, from_unit_range, to_unit_range

from .loss import DiffusionADLoss
from .torch_model import DiffusionADModel

__all__ = ["DiffusionAD"]


class DiffusionAD(DiffusionAnomalyModule):
    """DiffusionAD: one-step denoising diffusion + segmentation sub-network.

    Every paper hyper-parameter is an argument with the paper's value as default (Sec. 4.2);
    see ``models/diffusion_ad/README.md`` for the choices made where the paper is silent.

    Args:
        image_size: Side (or ``(H, W)``) images are resized to; must be divisible by 32 (paper: 256).
        num_timesteps: Diffusion steps ``T`` (paper: 1000).
        beta_schedule: Noise schedule (paper: linear).
        beta_start: First beta (paper: 1e-4).
        beta_end: Last beta (DDPM / reference code: 0.02).
        block_out_channels: Denoiser width per level (paper: base 128, 256 px guided-diffusion layout).
        layers_per_block: Denoiser ResNet blocks per level.
        attention_levels: Denoiser levels with attention (paper: 32, 16, 8 px = levels 3, 4, 5).
        attention_head_dim: Channels per attention head.
        norm_num_groups: GroupNorm groups of the denoiser (must divide every width).
        segmentation_width: Base width of the segmentation U-Net.
        inference_mode: ``"norm_guided"`` (reference code, default: the one-step estimate from ``guiding_timestep``
            guides the one-step denoising at ``guided_timestep``; two denoiser passes, one segmentation pass) or
            ``"average"`` (paper Alg. 2: segmentation maps from every ``inference_timesteps`` level, averaged).
        inference_timesteps: Noise levels averaged in ``"average"`` mode (paper: 100 and 200).
        guided_timestep: Level whose one-step denoising is guided (reference: 200).
        guiding_timestep: Noisier level whose clamped estimate guides it (reference: 400).
        guidance_weight: Norm-guidance weight ``w`` in training and inference (reference: 1).
        timestep_split: Training noise levels as a fraction of ``T``: the noise loss and the guided estimate at
            ``t_n ~ U[0, split T)``, guided by ``t_s ~ U[split T, T)`` with an independent noise (reference: 300).
        clamp_estimate: Clamp one-step ``x0`` estimates to ``[-1, 1]`` before they are used (reference code).
        top_k: Pixels averaged into the image score (paper: 50).
        smoothing_sigma: Gaussian sigma on the anomaly map (0 disables).
        inference_seed: Seed of the fixed inference noise.
        focal_weight: Weight ``gamma`` of the focal term (paper: 5).
        focal_gamma: Focusing parameter of the focal loss (reference code: 4).
        focal_alpha: Class weight of the focal loss (reference code: 0.5; negative: none).
        anomaly_source_path: Texture folder for synthetic anomalies (paper: DTD); ``None`` = self-texture.
        anomaly_probability: Share of synthetic anomalies per batch (paper: 3 of 6).
        blend_factor: Range of the anomaly opacity ``1 - beta`` (Eq. 9).
        anomaly_shuffle_probability: Share of self-textured anomalies that are grid-shuffled; the others change
            the region's tone and texture only (``SyntheticAnomalyGenerator.shuffle_probability``).
        use_foreground: Keep synthetic anomalies on the estimated object foreground.
        foreground_threshold: Colour distance to the border colour that counts as foreground.
        learning_rate: Adam learning rate (paper: 1e-4).
        inference_dtype: Precision of the denoiser at inference: ``"float32"``, ``"bfloat16"`` (about half the
            CPU time on CPUs with AVX512-BF16/AMX) or ``"float16"`` (CUDA). Training is unaffected.
        seed: ``lightning.seed_everything(seed)`` before the networks are built: weights, synthetic
            anomalies and data order repeat exactly (``None``: unseeded; the CLI's ``seed_everything`` is not applied).
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 256,
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
        focal_weight: float = 5.0,
        focal_gamma: float = 4.0,
        focal_alpha: float = 0.5,
        anomaly_source_path: str | Path | None = None,
        anomaly_probability: float = 0.5,
        blend_factor: tuple[float, float] = (0.2, 1.0),
        anomaly_shuffle_probability: float = 1.0,
        use_foreground: bool = True,
        foreground_threshold: float = 0.1,
        learning_rate: float = 1e-4,
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
        self.model = DiffusionADModel(
            num_timesteps=num_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            attention_levels=attention_levels,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            segmentation_width=segmentation_width,
            inference_mode=inference_mode,
            inference_timesteps=inference_timesteps,
            guided_timestep=guided_timestep,
            guiding_timestep=guiding_timestep,
            guidance_weight=guidance_weight,
            timestep_split=timestep_split,
            clamp_estimate=clamp_estimate,
            top_k=top_k,
            smoothing_sigma=smoothing_sigma,
            inference_seed=inference_seed,
        )
        self.loss = DiffusionADLoss(focal_weight=focal_weight, focal_gamma=focal_gamma, focal_alpha=focal_alpha)
        self.generator = SyntheticAnomalyGenerator(
            anomaly_source_path=anomaly_source_path,
            probability=anomaly_probability,
            blend_factor=tuple(blend_factor),
            shuffle_probability=anomaly_shuffle_probability,
            use_foreground=use_foreground,
            foreground_threshold=foreground_threshold,
        )
        self.learning_rate = learning_rate

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Synthesise anomalies, corrupt at two levels, norm-guided one-step estimate, segment; joint loss (Alg. 1).

        An image whose synthetic mask is all zero is anomaly-free: only those count in the noise loss.
        """
        del args, kwargs
        augmented, masks = self.generator(to_unit_range(batch.image))
        output = self.model(from_unit_range(augmented))
        losses = self.loss(output.noise, output.predicted_noise, masks, output.mask_logits)
        return self.log_losses(losses, batch.image.shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam on both sub-networks (Sec. 4.2)."""
        return torch.optim.Adam(self.model.parameters(), lr=self.learning_rate)
