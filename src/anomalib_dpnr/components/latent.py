"""Latent space of a latent-diffusion model: a frozen diffusers ``AutoencoderKL`` or pixel space.

``z = c_scale * E(x)`` (DPNR Eqs. 10-11). Weights come only from a local folder or the Hugging Face
cache (offline); with no VAE the "latent" is the ``[-1, 1]`` image itself (``c_scale = 1``), which
is what the CPU configs use.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .weights import load_diffusers_model

__all__ = ["LatentCodec"]


class LatentCodec(nn.Module):
    """Encode ``[-1, 1]`` images to scaled latents and decode them back.

    Args:
        vae_path: A local diffusers ``AutoencoderKL`` folder (``config.json`` +
            ``diffusion_pytorch_model.safetensors``) or a hub id already in the HF cache
            (e.g. ``stabilityai/sd-vae-ft-mse``); ``None`` = pixel space.
        scale: Latent scaling ``c_scale``; default: the VAE's ``scaling_factor`` (1 in pixel space).
    """

    def __init__(self, vae_path: str | Path | None = None, scale: float | None = None) -> None:
        super().__init__()
        self.vae = None if vae_path is None else _load_vae(vae_path)
        if self.vae is None:
            self.channels, self.factor = 3, 1
            default_scale = 1.0
        else:
            self.vae.requires_grad_(False).eval()
            self.channels = int(self.vae.config.latent_channels)
            self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            default_scale = float(self.vae.config.scaling_factor)
        self.scale = default_scale if scale is None else float(scale)

    def train(self, mode: bool = True) -> LatentCodec:
        """The VAE stays frozen in eval mode."""
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``z = c_scale * E(x)`` using the posterior mean (deterministic)."""
        if self.vae is None:
            return images * self.scale
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean.to(images.dtype) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents back to ``[-1, 1]`` images."""
        if self.vae is None:
            return latents / self.scale
        return self.vae.decode((latents / self.scale).to(self.vae.dtype)).sample.to(latents.dtype)


def _load_vae(vae_path: str | Path) -> nn.Module:
    """Load an ``AutoencoderKL`` from a local folder or the offline HF cache, or say what is missing."""
    from diffusers import AutoencoderKL

    return load_diffusers_model(AutoencoderKL, vae_path, "VAE", fallback=", or set vae_path to null to diffuse in pixel space")
