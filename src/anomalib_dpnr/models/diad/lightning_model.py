"""DiAD as an anomalib model.

Paper: He et al., "A Diffusion-Based Framework for Multi-Class Anomaly Detection" (AAAI 2024;
``../shared/papers/003_8ae7299cb902eed3.txt``). Blocks, their code and our choices where the paper is silent:
``models/diad/README.md``. Multi-class training (the paper's setting): ``anomalib_dpnr.data.MVTecMultiClass``.
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

from anomalib_dpnr.components import DiffusionAnomalyModule

from .loss import DiADLoss
from .torch_model import DiADModel

__all__ = ["DiAD"]


class DiAD(DiffusionAnomalyModule):
    """DiAD: latent diffusion guided by the Semantic-Guided network with Spatial-aware Feature Fusion.

    Args:
        image_size: Side (or ``(H, W)``) images are resized to (paper: 256).
        vae_path: Local/offline-cached diffusers ``AutoencoderKL`` (paper: SD's kl-f8, 256 px -> 32x32x4);
            ``None`` = pixel space (or ``autoencoder_channels``).
        latent_scale: Latent scaling; default: the VAE's scaling factor (1 in pixel space; fitted as 1 / std of the
            training latents for a trained autoencoder).
        autoencoder_channels: Instead of a pretrained VAE, a small ``AutoencoderKL`` of these widths (each level but
            the last halving the resolution), trained on the training images in the first ``autoencoder_epochs``
            epochs, then frozen (``components.LatentCodec``; the paper fine-tunes SD's VAE on the dataset instead);
            ``None``: none.
        latent_channels: Latent channels of that autoencoder (Stable Diffusion's: 4).
        autoencoder_norm_groups: Its GroupNorm groups (must divide every width); default: ``norm_num_groups``.
        autoencoder_epochs: First epochs of ``max_epochs`` spent training it (needs ``autoencoder_channels``).
        autoencoder_learning_rate: Its AdamW learning rate.
        autoencoder_kl_weight: Weight of its KL term against the L1 reconstruction (latent diffusion's KL-f: 1e-6).
        vae_dtype: Precision of the frozen VAE (``float16``/``bfloat16`` halve its memory; ``None`` keeps float32).
        unet_path: Local/offline-cached diffusers ``UNet2DConditionModel`` (paper: Stable Diffusion 1.5's denoiser);
            ``None`` builds one from the architecture arguments below, randomly initialised.
        unet_subfolder: Subfolder of ``unet_path`` holding it (``unet`` in a Stable Diffusion folder).
        context_path: The stored empty-prompt embedding ``[1, 77, 768]`` the pretrained denoiser is conditioned on
            (default with ``unet_path``: ``<unet_path>/empty_prompt_embedding.safetensors``); no text encoder runs.
        num_timesteps: Diffusion steps ``T`` (SD: 1000).
        beta_schedule: diffusers schedule name (SD: ``scaled_linear``, LDM's "linear").
        beta_start: First beta (SD: 0.00085).
        beta_end: Last beta (SD: 0.012).
        block_out_channels: Denoiser width per level (SD 1.5: 320, 640, 1280, 1280).
        layers_per_block: ResNet blocks per level (SD: 2; the SFF block fuses the per-level outputs).
        attention_levels: Levels with cross-attention blocks (SD 1.5: 0, 1, 2).
        attention_head_dim: diffusers' ``attention_head_dim``, which ``UNet2DConditionModel`` uses as the number of
            attention heads (SD 1.5: 8).
        cross_attention_dim: Width of the conditioning embedding (SD 1.5: 768).
        context_tokens: Tokens of the fixed embedding of a denoiser trained from scratch (SD: 77).
        norm_num_groups: GroupNorm groups of the denoiser (SD: 32).
        semantic_guided: Use the SG network (``False``: plain LDM, the paper's "SD" ablation).
        hint_channels: Hint encoder widths (reference: 16, 32, 96, 256).
        only_mid_control: SG controls the middle block and the first decoder level's skips only (reference);
            ``False``: every skip connection.
        feature_fusion: The SFF block (``False``: the paper's ablation without it).
        train_encoder: Also train the denoiser's encoder and middle block (frozen in the paper, whose encoder is
            Stable Diffusion's pretrained one).
        gradient_checkpointing: Recompute denoiser and SG activations in the backward pass (memory for time).
        start_step: Step the input latent is noised to before denoising (reference: 999).
        ddim_steps: DDIM steps, eta 0 (reference: 10).
        guidance_scale: ``None`` (default): one SG-guided pass per step. A number ``s``: classifier-free-style
            ``eps_u + s (eps_g - eps_u)`` against the denoiser without SG (two passes per step).
        backbone: timm backbone of the anomaly map (paper: ResNet50).
        layers: Backbone layers (paper: ResNet50 ``layer1``-``layer3``).
        pre_trained: ImageNet weights from the offline HF cache (EfficientNet-Lite0 installs offline).
        backbone_weights: Local state-dict file instead (e.g. ResNet50 weights).
        smoothing_sigma: Gaussian sigma on the anomaly map (paper: 5).
        inference_seed: Seed of the fixed inference noise.
        learning_rate: AdamW learning rate (paper: 1e-5).
        weight_decay: AdamW weight decay (torch's default).
        inference_dtype: Precision of the SG-guided denoiser passes and the latent autoencoder at inference:
            ``"float32"``, ``"bfloat16"`` (about half the CPU time on CPUs with AVX512-BF16/AMX) or ``"float16"``
            (CUDA). Training is unaffected.
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
        vae_dtype: str | None = None,
        unet_path: str | None = None,
        unet_subfolder: str | None = None,
        context_path: str | None = None,
        num_timesteps: int = 1000,
        beta_schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        attention_levels: Sequence[int] = (0, 1, 2),
        attention_head_dim: int = 8,
        cross_attention_dim: int = 768,
        context_tokens: int = 77,
        norm_num_groups: int = 32,
        semantic_guided: bool = True,
        hint_channels: Sequence[int] = (16, 32, 96, 256),
        only_mid_control: bool = True,
        feature_fusion: bool = True,
        train_encoder: bool = False,
        gradient_checkpointing: bool = False,
        start_step: int = 999,
        ddim_steps: int = 10,
        guidance_scale: float | None = None,
        backbone: str = "resnet50",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool = False,
        backbone_weights: str | None = None,
        smoothing_sigma: float = 5.0,
        inference_seed: int = 0,
        learning_rate: float = 1e-5,
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
            inference_dtype=inference_dtype,
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.configure_autoencoder_phase(autoencoder_channels, autoencoder_epochs, autoencoder_learning_rate, autoencoder_kl_weight)
        self.model = DiADModel(
            vae_path=vae_path,
            latent_scale=latent_scale,
            autoencoder_channels=autoencoder_channels,
            latent_channels=latent_channels,
            autoencoder_norm_groups=autoencoder_norm_groups,
            vae_dtype=vae_dtype,
            unet_path=unet_path,
            unet_subfolder=unet_subfolder,
            context_path=context_path,
            num_timesteps=num_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            attention_levels=attention_levels,
            attention_head_dim=attention_head_dim,
            cross_attention_dim=cross_attention_dim,
            context_tokens=context_tokens,
            norm_num_groups=norm_num_groups,
            semantic_guided=semantic_guided,
            hint_channels=tuple(hint_channels),
            only_mid_control=only_mid_control,
            feature_fusion=feature_fusion,
            train_encoder=train_encoder,
            gradient_checkpointing=gradient_checkpointing,
            start_step=start_step,
            ddim_steps=ddim_steps,
            guidance_scale=guidance_scale,
            backbone=backbone,
            layers=layers,
            pre_trained=pre_trained,
            backbone_weights=backbone_weights,
            smoothing_sigma=smoothing_sigma,
            inference_seed=inference_seed,
        )
        self.loss = DiADLoss()
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay

    def setup(self, stage: str | None = None) -> None:
        """Check ``max_epochs`` leaves the denoiser an epoch after a trained autoencoder's."""
        super().setup(stage)
        if stage == "fit":
            self.check_denoiser_epochs()

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Noise-prediction loss of the SG-guided denoiser (Eq. 6); L1 + KL in a trained autoencoder's epochs."""
        del args, kwargs
        if self.training_autoencoder:
            return self.autoencoder_step(batch.image)
        output = self.model(batch.image)
        return self.log_losses(self.loss(output.noise, output.predicted), batch.image.shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the SG network and the denoiser's decoder and output layers (``trainable_parameters``), and a
        trained autoencoder as its own parameter group."""
        groups = [{"params": list(self.model.trainable_parameters()), "lr": self.learning_rate}, *self.autoencoder_parameters()]
        return torch.optim.AdamW(groups, lr=self.learning_rate, weight_decay=self.weight_decay)
