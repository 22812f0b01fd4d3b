"""Latent space of a latent-diffusion model: a frozen diffusers ``AutoencoderKL``, a small one trained on the
training images, or pixel space.

``z = c_scale * E(x)`` (DPNR Eqs. 10-11). Pretrained weights come only from a local folder or the Hugging Face
cache (offline). With ``autoencoder_channels`` a small convolutional ``AutoencoderKL`` is built from scratch and
trained on the normal images (``reconstruction_loss``: L1 + a KL weight, as latent diffusion's KL autoencoders
without their perceptual and adversarial terms), and ``c_scale = 1 / std(z)`` over training latents is fitted
after it (``fit_scale``), as Stable Diffusion's scaling factor was. With neither the "latent" is the ``[-1, 1]``
image itself (``c_scale = 1``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from .unet import check_widths, inference_autocast
from .weights import load_diffusers_model

__all__ = ["LatentCodec", "build_autoencoder"]


class LatentCodec(nn.Module):
    """Encode ``[-1, 1]`` images to scaled latents and decode them back.

    Args:
        vae_path: A local diffusers ``AutoencoderKL`` folder (``config.json`` +
            ``diffusion_pytorch_model.safetensors``) or a hub id already in the HF cache
            (e.g. ``stabilityai/sd-vae-ft-mse``); ``None`` = pixel space (or ``autoencoder_channels``).
        scale: Latent scaling ``c_scale``; default: the VAE's ``scaling_factor`` (1 in pixel space; fitted for a
            trained autoencoder).
        autoencoder_channels: Widths of a small ``AutoencoderKL`` trained from scratch (one level per entry, each
            but the last halving the resolution: ``(32, 64, 128)`` maps 128 px to 32 x 32); ``None``: none.
        latent_channels: Latent channels of that autoencoder.
        norm_num_groups: Its GroupNorm groups; must divide every width.

    ``autocast_dtype`` (not saved; ``None`` = float32) runs the VAE's encoder and decoder under autocast in eval mode
    (``inference_dtype``, as ``Denoiser``); latents and images come back in the input's dtype.
    """

    autocast_dtype: torch.dtype | None = None

    def __init__(
        self,
        vae_path: str | Path | None = None,
        scale: float | None = None,
        autoencoder_channels: Sequence[int] | None = None,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
    ) -> None:
        super().__init__()
        self.trainable = bool(autoencoder_channels)
        if self.trainable and vae_path is not None:
            msg = f"give either vae_path ({vae_path!r}, a pretrained VAE) or autoencoder_channels ({autoencoder_channels}, one trained here), not both"
            raise ValueError(msg)
        if self.trainable:
            self.vae = build_autoencoder(autoencoder_channels, latent_channels, norm_num_groups)
        else:
            self.vae = None if vae_path is None else _load_vae(vae_path)
        if self.vae is None:
            self.channels, self.factor = 3, 1
            default_scale = 1.0
        else:
            if not self.trainable:
                self.vae.requires_grad_(False).eval()
            self.channels = int(self.vae.config.latent_channels)
            self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            default_scale = 1.0 if self.trainable else float(self.vae.config.scaling_factor)
        self.fixed_scale = scale is not None
        value = default_scale if scale is None else float(scale)
        if self.trainable:  # fitted after the autoencoder trains: saved in the checkpoint
            self.register_buffer("scale", torch.tensor(value))
        else:
            self.scale = value

    def train(self, mode: bool = True) -> LatentCodec:
        """A pretrained VAE stays frozen in eval mode (the trained autoencoder has no mode-dependent layers)."""
        super().train(mode)
        if self.vae is not None and not self.trainable:
            self.vae.eval()
        return self

    def reconstruction_loss(self, images: torch.Tensor, kl_weight: float = 1e-6) -> dict[str, torch.Tensor]:
        """Training loss of the trained autoencoder: ``|x - D(z)|`` (mean) + ``kl_weight`` x KL of the posterior to
        N(0, I) (summed over the latent, averaged over images), with ``z`` sampled from the posterior."""
        if not self.trainable:
            msg = "reconstruction_loss trains the autoencoder built from autoencoder_channels; this codec has none"
            raise RuntimeError(msg)
        posterior = self.vae.encode(images).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        l1 = (images - reconstruction).abs().mean()
        kl = posterior.kl().mean()
        return {"loss": l1 + kl_weight * kl, "l1": l1, "kl": kl}

    @torch.no_grad()
    def fit_scale(self, batches: Iterable[torch.Tensor]) -> float:
        """``c_scale = 1 / std`` of the unscaled latents of ``batches`` (training images), unless ``scale`` was
        given; returns it."""
        if not self.trainable:
            msg = "fit_scale fits the trained autoencoder's latent scale; this codec has none"
            raise RuntimeError(msg)
        if not self.fixed_scale:
            latents = [self.vae.encode(images).latent_dist.mean.flatten() for images in batches]
            latents = torch.cat(latents) if latents else torch.zeros(0)
            if latents.numel() < 2 or not torch.isfinite(latents).all() or latents.std() == 0:
                msg = "cannot fit the latent scale: the training latents are constant, empty or not finite"
                raise ValueError(msg)
            self.scale.fill_(1 / latents.std().item())
        return float(self.scale)

    def _autocast(self, tensor: torch.Tensor) -> torch.autocast:
        """The inference autocast (a no-op in training and for float32)."""
        return inference_autocast(tensor, self.autocast_dtype, enabled=not self.training)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``z = c_scale * E(x)`` using the posterior mean (deterministic)."""
        if self.vae is None:
            return images * self.scale
        with self._autocast(images):
            latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean
        return latents.to(images.dtype) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents back to ``[-1, 1]`` images."""
        if self.vae is None:
            return latents / self.scale
        with self._autocast(latents):
            images = self.vae.decode((latents / self.scale).to(self.vae.dtype)).sample
        return images.to(latents.dtype)


def build_autoencoder(channels: Sequence[int], latent_channels: int = 4, norm_num_groups: int = 32) -> nn.Module:
    """A diffusers ``AutoencoderKL`` with random weights: one ResNet block per level, convolutional only (no
    mid-block attention), downsampling by ``2 ** (len(channels) - 1)``."""
    from diffusers import AutoencoderKL

    channels = check_widths(channels, norm_num_groups, name="autoencoder_channels")
    if latent_channels < 1:
        msg = f"latent_channels must be >= 1 (got {latent_channels})"
        raise ValueError(msg)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        mid_block_add_attention=False,
    )


def _load_vae(vae_path: str | Path) -> nn.Module:
    """Load an ``AutoencoderKL`` from a local folder or the offline HF cache, or say what is missing."""
    from diffusers import AutoencoderKL

    return load_diffusers_model(AutoencoderKL, vae_path, "VAE", fallback=", or set vae_path to null to diffuse in pixel space")
