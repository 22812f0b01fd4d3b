"""DiAD torch model (He et al., "A Diffusion-Based Framework for Multi-Class Anomaly Detection", AAAI 2024).

Three parts (Fig. 2): a pixel-space autoencoder ``{E, D}`` (``LatentCodec``: a frozen diffusers ``AutoencoderKL``, a small
one trained on the training images first, or pixel space), a latent-space denoiser (diffusers ``UNet2DConditionModel`` conditioned on a stored, fixed empty-prompt
embedding) guided by the Semantic-Guided network with its SFF block (``semantic_guided.py``, ``feature_fusion.py``),
and a feature-space pretrained backbone ``Psi`` for the anomaly map.

Training (Eq. 6): ``||eps - eps_theta(z_t, t, c, x_0)||^2`` with the SG network reading the clean input ``x_0``.
Inference: ``z_0 = E(x_0)``, noised to ``start_step`` (reference: 999), denoised by DDIM (eta 0, reference: 10 steps)
with SG guidance from ``x_0``, ``x_hat = D(z_hat)``; map ``S = G_sigma * sum_n up(1 - cos(Psi_n(x_0), Psi_n(x_hat)))``,
image score = max of the map.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from diffusers import UNet2DConditionModel
from torch import nn

from anomalib_dpnr.components import AnomalyScorer, NoiseSchedule, check_images, check_widths, ddim_loop, gaussian_noise
from anomalib_dpnr.components.features import FeatureEmbedder, feature_distance_map
from anomalib_dpnr.components.latent import LatentCodec
from anomalib_dpnr.components.unet import inference_autocast
from anomalib_dpnr.components.weights import MissingWeightsError, load_diffusers_model

from .semantic_guided import SemanticGuidedNetwork

__all__ = ["DiADModel", "DiADOutput", "build_denoiser", "load_context"]

VAE_DTYPES = {None: None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class DiADOutput:
    """Training outputs (latent resolution)."""

    noise: torch.Tensor
    predicted: torch.Tensor
    timesteps: torch.Tensor


def build_denoiser(
    channels: int,
    block_out_channels: Sequence[int],
    layers_per_block: int,
    attention_levels: Sequence[int],
    attention_head_dim: int,
    cross_attention_dim: int,
    norm_num_groups: int,
) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` shaped like Stable Diffusion's (defaults of ``DiADModel``: SD 1.5's), random init.

    Levels in ``attention_levels`` get cross-attention blocks (SD 1.5: the first three of four); the middle block
    always has one.
    """
    widths = check_widths(block_out_channels, norm_num_groups, attention_levels)
    levels = set(attention_levels)
    down = tuple("CrossAttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(len(widths)))
    up = tuple("CrossAttnUpBlock2D" if i in levels else "UpBlock2D" for i in reversed(range(len(widths))))
    return UNet2DConditionModel(
        in_channels=channels, out_channels=channels, block_out_channels=widths, layers_per_block=layers_per_block,
        down_block_types=down, up_block_types=up, attention_head_dim=attention_head_dim,
        cross_attention_dim=cross_attention_dim, norm_num_groups=norm_num_groups,
    )  # fmt: skip


def load_context(path: str | Path, dim: int) -> torch.Tensor:
    """The stored empty-prompt embedding ``[1, tokens, dim]`` from a ``.safetensors`` (one tensor) or ``.pt`` file."""
    path = Path(path)
    if not path.is_file():
        msg = (
            f"empty-prompt embedding not found: {path}. A pretrained Stable Diffusion denoiser is conditioned on CLIP's "
            "embedding of the empty prompt; compute it once where CLIP is available, e.g. "
            "`ids = CLIPTokenizer.from_pretrained(sd, subfolder='tokenizer')([''], padding='max_length', max_length=77, "
            "return_tensors='pt').input_ids; safetensors.torch.save_file({'context': CLIPTextModel.from_pretrained(sd, "
            f"subfolder='text_encoder')(ids).last_hidden_state}}, '{path.name}')` (transformers), and give its path as context_path"
        )
        raise MissingWeightsError(msg)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = list(load_file(str(path)).values())
        if len(tensors) != 1:
            msg = f"{path} must hold exactly one tensor (the empty-prompt embedding), found {len(tensors)}"
            raise ValueError(msg)
        context = tensors[0]
    else:
        context = torch.load(path, map_location="cpu", weights_only=True)
    context = context.float()
    context = context.unsqueeze(0) if context.ndim == 2 else context
    if context.ndim != 3 or context.shape[0] != 1 or context.shape[-1] != dim:
        msg = f"the embedding in {path} has shape {tuple(context.shape)}; the denoiser needs [1, tokens, {dim}]"
        raise ValueError(msg)
    return context


class DiADModel(nn.Module):
    """DiAD (see module docstring). Arguments mirror ``anomalib_dpnr.DiAD``.

    ``autocast_dtype`` (not saved; ``None`` = float32) runs the SG-guided denoiser passes of :meth:`reconstruct`
    under autocast (``inference_dtype``); the DDIM update and everything after it stay float32. Training is
    unaffected.
    """

    autocast_dtype: torch.dtype | None = None

    def __init__(
        self,
        vae_path: str | Path | None = None,
        latent_scale: float | None = None,
        autoencoder_channels: Sequence[int] | None = None,
        latent_channels: int = 4,
        autoencoder_norm_groups: int | None = None,
        vae_dtype: str | None = None,
        unet_path: str | Path | None = None,
        unet_subfolder: str | None = None,
        context_path: str | Path | None = None,
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
        backbone_weights: str | Path | None = None,
        smoothing_sigma: float = 5.0,
        inference_seed: int = 0,
    ) -> None:
        super().__init__()
        if vae_dtype not in VAE_DTYPES:
            msg = f"vae_dtype must be one of {list(VAE_DTYPES)}, got {vae_dtype!r}"
            raise ValueError(msg)
        if ddim_steps < 1 or context_tokens < 1:
            msg = f"need ddim_steps >= 1 and context_tokens >= 1, got ddim_steps={ddim_steps}, context_tokens={context_tokens}"
            raise ValueError(msg)
        if guidance_scale is not None and not semantic_guided:
            msg = "guidance_scale contrasts SG-guided with unguided noise predictions: it needs semantic_guided=True"
            raise ValueError(msg)
        self.codec = LatentCodec(
            vae_path, latent_scale, autoencoder_channels, latent_channels,
            norm_num_groups if autoencoder_norm_groups is None else autoencoder_norm_groups,
        )  # fmt: skip
        if self.codec.trainable and VAE_DTYPES[vae_dtype] is not None:
            msg = f"vae_dtype={vae_dtype!r} lowers a pretrained, frozen VAE's precision; the autoencoder trained here stays float32 (set vae_dtype: null)"
            raise ValueError(msg)
        if self.codec.vae is not None and VAE_DTYPES[vae_dtype] is not None:
            self.codec.vae.to(VAE_DTYPES[vae_dtype])  # frozen: half precision is safe (cast in and out)
        self.schedule = NoiseSchedule(num_timesteps, beta_schedule, beta_start, beta_end)
        self.schedule.check_timesteps([start_step])
        if unet_path is not None:
            fallback = ", or set unet_path to null to train a denoiser from scratch"
            self.denoiser = load_diffusers_model(UNet2DConditionModel, unet_path, "denoiser", unet_subfolder, fallback)
            if self.denoiser.config.in_channels != self.codec.channels or self.denoiser.config.out_channels != self.codec.channels:
                msg = f"the denoiser from {unet_path} takes {self.denoiser.config.in_channels} channels; the latent space has {self.codec.channels}"
                raise ValueError(msg)
        else:
            self.denoiser = build_denoiser(
                self.codec.channels, block_out_channels, layers_per_block, attention_levels, attention_head_dim,
                cross_attention_dim, norm_num_groups,
            )  # fmt: skip
        dim = int(self.denoiser.config.cross_attention_dim)
        if context_path is not None:
            context = load_context(context_path, dim)
        elif unet_path is not None:
            context = load_context(Path(unet_path) / "empty_prompt_embedding.safetensors", dim)
        else:  # a denoiser trained from scratch: any fixed embedding serves as the constant condition
            context = torch.randn(1, context_tokens, dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("context", context)
        self.sg = (
            SemanticGuidedNetwork(self.denoiser, tuple(hint_channels), self.codec.factor, only_mid_control, feature_fusion)
            if semantic_guided
            else None
        )
        frozen = [self.denoiser.conv_in, self.denoiser.time_embedding, self.denoiser.down_blocks, self.denoiser.mid_block]
        for module in frozen:
            module.requires_grad_(train_encoder)
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
            if self.sg is not None:
                self.sg.copy.enable_gradient_checkpointing()
        layers = list(layers)
        if not layers:
            msg = "layers must name at least one backbone layer for the anomaly map"
            raise ValueError(msg)
        self.backbone = FeatureEmbedder(backbone, layers, None, pre_trained, backbone_weights)  # frozen
        self.scorer = AnomalyScorer(smoothing_sigma, top_k=1)  # image score = the map's maximum
        self.start_step = start_step
        self.ddim_steps = ddim_steps
        self.guidance_scale = guidance_scale
        self.inference_seed = inference_seed
        factor = 2 ** (len(self.denoiser.config.block_out_channels) - 1) * self.codec.factor
        self.size_multiple = max(factor, self.backbone.size_multiple)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What DiAD trains: the SG network (with SFF) and the denoiser's decoder and output layers (and its
        encoder with ``train_encoder``); the VAE and the backbone stay frozen (a trained autoencoder trains in its own
        epochs: ``DiffusionAnomalyModule.autoencoder_parameters``)."""
        modules = [self.denoiser] if self.sg is None else [self.denoiser, self.sg]
        return (p for module in modules for p in module.parameters() if p.requires_grad)

    def noise_prediction(self, noisy: torch.Tensor, timesteps: torch.Tensor, images: torch.Tensor, guided: bool = True) -> torch.Tensor:
        """``eps_theta(z_t, t, c, x_0)`` (Eq. 7): the denoiser with the SG residuals from ``images`` (``guided``)."""
        context = self.context.expand(noisy.shape[0], -1, -1).to(noisy.dtype)
        if self.sg is None or not guided:
            return self.denoiser(noisy, timesteps, context).sample
        down, middle = self.sg(noisy, timesteps, context, images)
        return self.denoiser(noisy, timesteps, context, down_block_additional_residuals=down, mid_block_additional_residual=middle).sample

    def guided_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """One SG-guided pass; with ``guidance_scale`` s: ``eps_u + s (eps_g - eps_u)``, ``eps_u`` without SG."""
        guided = self.noise_prediction(noisy, timesteps, images)
        if self.guidance_scale is None:
            return guided
        unguided = self.noise_prediction(noisy, timesteps, images, guided=False)
        return unguided + self.guidance_scale * (guided - unguided)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """``x_hat = D(DDIM(z_{start}))`` with ``z_start`` the input latent noised with the fixed inference noise."""
        latents = self.codec.encode(images)
        steps = torch.full((images.shape[0],), self.start_step, device=images.device, dtype=torch.long)
        generator = torch.Generator(device=images.device).manual_seed(self.inference_seed)
        start = self.schedule.add_noise(latents, gaussian_noise(latents, generator), steps)
        latents = ddim_loop(self._inference_noise(images), self.schedule.alphas_cumprod, start, steps, self.ddim_steps)
        return self.codec.decode(latents).clamp(-1, 1)

    def _inference_noise(self, images: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """The DDIM loop's noise estimate: one guided pass under the inference autocast, cast back to the latent's dtype."""

        def noise(latents: torch.Tensor, timesteps: torch.Tensor, _abar: torch.Tensor) -> torch.Tensor:
            with inference_autocast(latents, self.autocast_dtype):
                return self.guided_noise(latents, timesteps, images).to(latents.dtype)

        return noise

    def anomaly_map(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """``sum_n up(1 - cos(Psi_n(x_0), Psi_n(x_hat)))`` ``[B, 1, H, W]`` (before smoothing)."""
        return feature_distance_map(self.backbone, images, reconstruction) * len(self.backbone.layers)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> InferenceBatch:
        """Gaussian-smoothed (sigma 5) feature-distance map of input and reconstruction; image score = its max."""
        anomaly_map, pred_score = self.scorer(self.anomaly_map(images, self.reconstruct(images)))
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    def forward(self, images: torch.Tensor) -> DiADOutput | InferenceBatch:
        """Training: one noise-prediction step per image (Eq. 6). Inference: :meth:`predict` (``[-1, 1]`` images)."""
        check_images(images, 3, self.size_multiple, "DiAD")
        if not self.training:
            return self.predict(images)
        latents = self.codec.encode(images)
        noise = torch.randn_like(latents)
        timesteps = self.schedule.sample_timesteps(latents.shape[0], latents.device)
        predicted = self.noise_prediction(self.schedule.add_noise(latents, noise, timesteps), timesteps, images)
        return DiADOutput(noise, predicted, timesteps)
