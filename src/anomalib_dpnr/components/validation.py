"""Input checks that turn bad batches into clear errors instead of deep shape errors."""

from __future__ import annotations

import torch

__all__ = ["check_images"]


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
    if not torch.isfinite(images).all():
        msg = f"{model} got NaN or infinite pixel values"
        raise ValueError(msg)
