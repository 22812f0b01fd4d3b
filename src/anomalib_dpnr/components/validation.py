"""Input checks that turn bad batches into clear errors instead of deep shape errors."""

from __future__ import annotations

import torch

__all__ = ["as_rgb", "check_image_size", "check_images"]


def check_images(images: torch.Tensor, channels: int, multiple: int, model: str) -> None:
    """Validate a ``[B, C, H, W]`` batch for a model that needs ``channels`` and sizes divisible by ``multiple``."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        msg = f"{model} expects a [B, C, H, W] image tensor, got {shape}"
        raise ValueError(msg)
    if images.shape[0] == 0:
        msg = f"{model} got an empty batch"
        raise ValueError(msg)
    if images.shape[1] != channels:
        hint = " (grayscale: repeat the channel, e.g. images.expand(-1, 3, -1, -1))" if images.shape[1] == 1 else ""
        msg = f"{model} expects {channels}-channel images, got {images.shape[1]} channels{hint}"
        raise ValueError(msg)
    height, width = images.shape[-2:]
    if height % multiple or width % multiple:
        msg = (
            f"{model} needs image height and width divisible by {multiple}, got {height}x{width}; "
            f"set the model's image_size (e.g. {max(multiple, round(height / multiple) * multiple)})"
        )
        raise ValueError(msg)
    if not _tracing() and not torch.isfinite(images).all():
        msg = f"{model} got NaN or infinite pixel values"
        raise ValueError(msg)


def _tracing() -> bool:
    """Whether the model is being exported/traced: value checks are data-dependent and are left out then."""
    return torch.compiler.is_exporting() or torch.compiler.is_compiling() or torch.jit.is_tracing()


def as_rgb(images: torch.Tensor, model: str) -> torch.Tensor:
    """``[B, 1, H, W]`` grayscale repeated to RGB (what anomalib's image readers do with grayscale files);
    ``[B, 3, H, W]`` unchanged; any other channel count is refused by name before pre-processing."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] == 3:
        return images  # anything else not 4-D is named by check_images inside the model
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    msg = f"{model} expects RGB (3-channel) or grayscale (1-channel) images, got {images.shape[1]} channels"
    raise ValueError(msg)


def check_image_size(size: tuple[int, int] | torch.Size | None, multiple: int, model: str) -> None:
    """Refuse a configured ``image_size`` the model's down-sampling cannot take."""
    if size is None or multiple <= 1:
        return
    height, width = (int(s) for s in size)
    if height % multiple or width % multiple:
        fit = [max(multiple, round(s / multiple) * multiple) for s in (height, width)]
        msg = f"{model}: image_size {height}x{width} is not divisible by {multiple}; use e.g. image_size: {fit}"
        raise ValueError(msg)
