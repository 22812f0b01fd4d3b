"""Factory for diffusers ``UNet2DModel`` denoisers with width/depth taken from config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput

from .validation import _tracing

__all__ = ["INFERENCE_DTYPES", "Denoiser", "build_unet", "inference_autocast", "parse_inference_dtype", "unet_downsampling_factor"]

INFERENCE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def inference_autocast(tensor: torch.Tensor, dtype: torch.dtype | None, enabled: bool = True) -> torch.autocast:
    """Autocast to an ``inference_dtype``'s ``dtype`` on ``tensor``'s device; a no-op for ``None`` (float32) or when
    not ``enabled``."""
    return torch.autocast(tensor.device.type, dtype=dtype, enabled=enabled and dtype is not None)


def parse_inference_dtype(name: str, model: str) -> torch.dtype | None:
    """The autocast dtype of ``inference_dtype`` ``name`` (``None`` for float32); a clear error on any other name."""
    if name not in INFERENCE_DTYPES:
        msg = f"{model}: inference_dtype must be one of {sorted(INFERENCE_DTYPES)}, got {name!r}"
        raise ValueError(msg)
    return INFERENCE_DTYPES[name]


class Denoiser(UNet2DModel):
    """``UNet2DModel`` whose eval-mode forward can run under autocast in a lower precision.

    On a CPU, inference denoises the batch in chunks of ``cpu_chunk`` images (smaller activations stay in cache);
    the numbers are those of one pass over the batch up to float rounding (CPU runs also lay the weights out
    channels-last: ``DiffusionAnomalyModule.setup``).
    ``autocast_dtype`` (not saved; ``None`` = float32) applies to inference only: training always runs in the
    trainer's precision. The output is cast back to the input's dtype, so everything after the denoiser (scores,
    maps, metrics) stays in float32. bfloat16 halves the CPU time of the denoiser on CPUs with AVX512-BF16/AMX.
    """

    autocast_dtype: torch.dtype | None = None
    cpu_chunk: int = 4  # CPU inference denoises at most this many images at once (activations stay in cache: faster)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        if self.training:
            return super().forward(sample, timestep, *args, **kwargs)
        # exported graphs keep a symbolic batch: the batch size is read only when not tracing
        if not (_tracing() or args or kwargs) and sample.device.type == "cpu" and 0 < self.cpu_chunk < sample.shape[0]:
            steps = torch.as_tensor(timestep, device=sample.device)
            steps = steps.reshape(-1).expand(sample.shape[0]) if steps.numel() == 1 else steps
            chunks = zip(sample.split(self.cpu_chunk), steps.split(self.cpu_chunk), strict=True)
            predicted = torch.cat([self._denoise(images, times).sample for images, times in chunks])
            return UNet2DOutput(sample=predicted.to(sample.dtype))
        output = self._denoise(sample, timestep, *args, **kwargs)
        if isinstance(output, tuple):
            return (output[0].to(sample.dtype), *output[1:])
        output.sample = output.sample.to(sample.dtype)
        return output

    def _denoise(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, *args: Any, **kwargs: Any) -> Any:
        """One ``UNet2DModel`` pass under the inference autocast (a no-op for float32)."""
        with inference_autocast(sample, self.autocast_dtype):
            return super().forward(sample, timestep, *args, **kwargs)


def check_widths(
    widths: Sequence[int], norm_num_groups: int, attention_levels: Sequence[int] = (), name: str = "block_out_channels"
) -> tuple[int, ...]:
    """Level widths as ints, or a ``ValueError``: at least one level, each a positive multiple of
    ``norm_num_groups`` (GroupNorm), and every attention level an index into them."""
    checked = tuple(int(c) for c in widths)
    if not checked or any(c < 1 or c % norm_num_groups for c in checked):
        msg = f"{name} {checked} must name at least one level, each a positive multiple of norm_num_groups={norm_num_groups}"
        raise ValueError(msg)
    if not set(attention_levels) <= set(range(len(checked))):
        msg = f"attention_levels {sorted(set(attention_levels))} must index {name} (0..{len(checked) - 1})"
        raise ValueError(msg)
    return checked


def build_unet(
    in_channels: int = 3,
    out_channels: int = 3,
    block_out_channels: Sequence[int] = (128, 128, 256, 256, 512, 512),
    layers_per_block: int = 2,
    attention_levels: Sequence[int] = (3, 4, 5),
    attention_head_dim: int = 64,
    norm_num_groups: int = 32,
    dropout: float = 0.0,
) -> Denoiser:
    """Build a DDPM-style UNet (ResNet blocks, sinusoidal time embedding, self-attention).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        block_out_channels: Width of each resolution level; level ``i`` works at ``1 / 2**i`` of
            the input size. The default is guided-diffusion's 256 px layout (base 128, multipliers
            1, 1, 2, 2, 4, 4), as used by DiffusionAD.
        layers_per_block: ResNet blocks per level.
        attention_levels: Indices of the levels that get self-attention (``(3, 4, 5)`` = 32, 16, 8 px
            for a 256 px input, DiffusionAD Sec. 4.2).
        attention_head_dim: Channels per attention head.
        norm_num_groups: GroupNorm groups; must divide every entry of ``block_out_channels``.
        dropout: Dropout in the ResNet blocks.
    """
    widths = check_widths(block_out_channels, norm_num_groups, attention_levels)
    levels = set(attention_levels)
    down = tuple("AttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(len(widths)))
    up = tuple("AttnUpBlock2D" if i in levels else "UpBlock2D" for i in reversed(range(len(widths))))
    return Denoiser(
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=widths,
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
        dropout=dropout,
    )


def unet_downsampling_factor(block_out_channels: Sequence[int]) -> int:
    """Total spatial reduction of a UNet built by :func:`build_unet` (inputs must be divisible by it)."""
    return 2 ** (len(block_out_channels) - 1)
