"""Synthetic anomalies on anomalib's ``PerlinAnomalyGenerator`` (DiffusionAD Sec. 3.3, Eq. 9).

A Perlin-noise blob ``P`` (anomalib) is multiplied by the object foreground ``F`` to give the
ground-truth mask ``M``; the anomalous appearance ``A`` comes from a texture folder (DTD in the
paper) or, without one, from self-augmentation of the image itself (two random photometric ops,
then an 8x8 grid shuffle, or, for a share ``1 - shuffle_probability``, no shuffle: the region keeps its structure
and changes tone, like a stain or an unevenly finished area); ``S = beta (M N) + (1 - beta)(M A) + (1 - M) N``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from torchvision import io
from torchvision.transforms.v2 import functional as TF  # noqa: N812

__all__ = ["SyntheticAnomalyGenerator", "estimate_foreground", "self_augment"]

_SELF_AUGMENTATIONS: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = (
    TF.equalize,
    lambda x: TF.adjust_sharpness(x, random.uniform(0.0, 3.0)),
    TF.autocontrast,
    lambda x: TF.solarize(x, random.uniform(0.3, 0.9)),
    lambda x: TF.posterize(x, random.randint(2, 5)),
    TF.invert,
    lambda x: TF.adjust_gamma(x, random.uniform(0.5, 2.0)),
)


def estimate_foreground(images: torch.Tensor, threshold: float = 0.1, min_fraction: float = 0.02) -> torch.Tensor:
    """Object foreground of ``[B, 3, H, W]`` images in ``[0, 1]`` as ``[B, 1, H, W]`` in ``{0, 1}``.

    The background colour is the median of a border strip; pixels farther than ``threshold`` from it
    (max over channels) are foreground, cleaned by a 7x7 majority filter. Where that leaves less than
    ``min_fraction`` of the image, or covers nearly all of it (textures), the whole image counts as
    foreground, which is the paper's rule for textural categories.
    """
    _, _, height, width = images.shape
    strip = max(1, min(height, width) // 25)
    border = torch.cat(
        [
            images[..., :strip, :].flatten(2),
            images[..., -strip:, :].flatten(2),
            images[..., :, :strip].flatten(2),
            images[..., :, -strip:].flatten(2),
        ],
        dim=2,
    )
    background = border.median(dim=2).values[..., None, None]
    foreground = ((images - background).abs().amax(dim=1, keepdim=True) > threshold).float()
    foreground = (F.avg_pool2d(foreground, 7, stride=1, padding=3, count_include_pad=False) > 0.5).float()
    fraction = foreground.mean(dim=(1, 2, 3), keepdim=True)
    use_all = (fraction < min_fraction) | (fraction > 1 - min_fraction)
    return torch.where(use_all, torch.ones_like(foreground), foreground)


def self_augment(image: torch.Tensor, num_ops: int = 2, grid: int = 8, shuffle: bool = True) -> torch.Tensor:
    """Anomalous appearance from the image itself: ``num_ops`` random ops, then (``shuffle``) a grid shuffle."""
    out = image.clamp(0, 1)
    for op in random.sample(_SELF_AUGMENTATIONS, num_ops):
        out = op(out).clamp(0, 1)
    if not shuffle:
        return out
    _, height, width = out.shape
    cell_h, cell_w = height // grid, width // grid
    if cell_h == 0 or cell_w == 0:
        return out
    body = out[:, : cell_h * grid, : cell_w * grid]
    cells = body.unfold(1, cell_h, cell_h).unfold(2, cell_w, cell_w).reshape(3, grid * grid, cell_h, cell_w)
    cells = cells[:, torch.randperm(grid * grid, device=out.device)]
    body = cells.reshape(3, grid, grid, cell_h, cell_w).permute(0, 1, 3, 2, 4).reshape(3, grid * cell_h, grid * cell_w)
    out = out.clone()
    out[:, : cell_h * grid, : cell_w * grid] = body
    return out


class SyntheticAnomalyGenerator(PerlinAnomalyGenerator):
    """Perlin-shaped anomalies restricted to the foreground, with texture or self-texture appearance.

    Args:
        anomaly_source_path: Folder of texture images (e.g. DTD). ``None`` uses self-augmentation.
        probability: Chance that an image gets an anomaly (0.5 = the paper's half-normal batches).
        blend_factor: Range of the anomaly opacity ``1 - beta`` in Eq. 9.
        use_foreground: Restrict anomalies to the estimated object foreground.
        foreground_threshold: Colour distance to the background that counts as foreground.
        max_tries: Perlin draws tried before an image whose foreground mask stays empty is left normal.
        shuffle_probability: Share of self-textured anomalies whose appearance is grid-shuffled; the others keep
            the image's own structure under the photometric ops (tone and texture changes, no new edges).
    """

    def __init__(
        self,
        anomaly_source_path: str | Path | None = None,
        probability: float = 0.5,
        blend_factor: tuple[float, float] = (0.2, 1.0),
        use_foreground: bool = True,
        foreground_threshold: float = 0.1,
        max_tries: int = 10,
        shuffle_probability: float = 1.0,
    ) -> None:
        if not 0.0 <= shuffle_probability <= 1.0:
            msg = f"shuffle_probability must be in [0, 1], got {shuffle_probability}"
            raise ValueError(msg)
        if anomaly_source_path is not None and shuffle_probability < 1.0:
            msg = "shuffle_probability applies to self-textured anomalies only; leave it at 1 with anomaly_source_path"
            raise ValueError(msg)
        if anomaly_source_path is not None and not Path(anomaly_source_path).is_dir():
            msg = f"anomaly_source_path {anomaly_source_path!s} is not a folder of texture images"
            raise FileNotFoundError(msg)
        super().__init__(anomaly_source_path=anomaly_source_path, probability=probability, blend_factor=blend_factor)
        if anomaly_source_path is not None and not self.anomaly_source_paths:
            msg = f"anomaly_source_path {anomaly_source_path!s} holds no images"
            raise FileNotFoundError(msg)
        self.use_foreground = use_foreground
        self.foreground_threshold = foreground_threshold
        self.max_tries = max_tries
        self.shuffle_probability = shuffle_probability

    def _appearance(self, image: torch.Tensor) -> torch.Tensor:
        """Anomalous appearance ``A`` (``[3, H, W]`` in ``[0, 1]``)."""
        if not self.anomaly_source_paths:
            # draw only for a mixed share, so the default (always shuffle) keeps its random stream
            mixed = 0.0 < self.shuffle_probability < 1.0
            shuffle = random.random() < self.shuffle_probability if mixed else self.shuffle_probability == 1.0
            return self_augment(image, shuffle=shuffle)
        path = random.choice(self.anomaly_source_paths)
        texture = io.read_image(str(path), mode=io.ImageReadMode.RGB).float().to(image.device) / 255.0
        texture = TF.resize(texture, list(image.shape[-2:]), antialias=True)
        return self.augmenters(texture).clamp(0, 1)

    def forward(  # type: ignore[override]
        self,
        images: torch.Tensor,
        foreground: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Synthesise anomalies on ``[B, 3, H, W]`` images in ``[0, 1]``.

        Returns:
            The augmented images and their ``[B, 1, H, W]`` ground-truth masks in ``{0, 1}``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            msg = f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}"
            raise ValueError(msg)
        batch, _, height, width = images.shape
        if foreground is None:
            foreground = (
                estimate_foreground(images, self.foreground_threshold)
                if self.use_foreground
                else torch.ones(batch, 1, height, width, device=images.device)
            )
        outputs, masks = [], []
        for image, fg in zip(images, foreground, strict=True):
            mask = torch.zeros(1, height, width, device=images.device)
            if torch.rand(1).item() < self.probability:
                for _ in range(self.max_tries):
                    _, perlin = self.generate_perturbation(height, width, images.device)
                    mask = perlin.permute(2, 0, 1) * fg
                    if mask.any():
                        break
            if mask.any():
                low, high = self.blend_factor
                opacity = low + (high - low) * torch.rand(1, device=images.device)
                image = image * (1 - mask) + (1 - opacity) * image * mask + opacity * self._appearance(image) * mask
            outputs.append(image)
            masks.append(mask)
        return torch.stack(outputs), torch.stack(masks)
