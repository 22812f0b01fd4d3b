"""RAN's multi-scale noise ensemble (Lu et al., Eq. 11).

Each score level ``t_i`` gives a pixel (KL) map ``s_{t_i}`` and a feature map ``s^f_{t_i}``; the KL maps vary in scale
with ``t``, so each is standardised, ``s_hat = (s - m_i) / d_i``, with the mean ``m_i`` and standard deviation ``d_i``
of that level's map over training images (stored buffers, fitted once: never statistics of the batch being scored).
``A = 1/n sum_i [alpha s_hat_{t_i} + (1 - alpha) s^f_{t_i}]`` (the feature maps standardised too when asked).

With ``per_position`` (``positional_statistics``), ``m_i`` and ``d_i`` are maps instead: the mean and standard
deviation at each pixel position over the training images, so a position whose score is high on normal images too
(image borders, where the convolutions' padding shows, or the fixed structure of aligned objects) is discounted there
only. Positions where the training maps barely vary (a constant background) would turn tiny differences into huge
scores, so the variance there is ridged with a share of the level's variance over all pixels:
``d_i(p)^2 = var_i(p) + shrinkage * var_i``. Both kinds are fitted together, so either reading works on the same
checkpoint.
"""

from __future__ import annotations

import torch
from anomalib.models.components.base import DynamicBufferMixin
from torch import nn

__all__ = ["LevelNormaliser", "StatisticsAccumulator", "ensemble"]

TERMS = ("kl", "feature")


class LevelNormaliser(DynamicBufferMixin, nn.Module):
    """Per-term, per-level mean and standard deviation of the raw maps, over all pixels (``mean``/``std``,
    ``[2, levels]``) and per pixel position (``position_mean``/``position_std``, ``[2, levels, H, W]``); identity
    until fitted. A checkpoint's per-position statistics load at the size they were fitted at (anomalib's
    ``DynamicBufferMixin``), so its weights also load into a model of another ``image_size``, read per level.

    Args:
        levels: Number of score levels.
        size: ``(H, W)`` of the maps (the model's image size).
        shrinkage: Share of the level's variance over all pixels added to each position's variance.
    """

    def __init__(self, levels: int, size: tuple[int, int], shrinkage: float = 0.1) -> None:
        super().__init__()
        if shrinkage < 0:
            msg = f"positional_shrinkage must be >= 0, got {shrinkage}"
            raise ValueError(msg)
        self.shrinkage = shrinkage
        self.register_buffer("mean", torch.zeros(len(TERMS), levels))
        self.register_buffer("std", torch.ones(len(TERMS), levels))
        self.register_buffer("position_mean", torch.zeros(len(TERMS), levels, *size))
        self.register_buffer("position_std", torch.ones(len(TERMS), levels, *size))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def size(self) -> tuple[int, int]:
        """Map size of the per-position statistics."""
        return tuple(self.position_mean.shape[2:])

    def fit(self, mean: torch.Tensor, std: torch.Tensor, position_mean: torch.Tensor, position_std: torch.Tensor) -> None:
        """Store the statistics (row 0: KL, row 1: feature), as ``StatisticsAccumulator.result`` returns them."""
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-12))
        self.position_mean.copy_(position_mean)
        self.position_std.copy_(position_std.clamp_min(1e-12))
        self.fitted.fill_(True)

    def forward(self, scores: torch.Tensor, term: int, level: int, per_position: bool = False) -> torch.Tensor:
        """``(scores - mean) / std`` of ``[B, 1, H, W]`` maps of term ``term`` (0 KL, 1 feature) at level ``level``."""
        if not per_position:
            return (scores - self.mean[term, level]) / self.std[term, level]
        if tuple(scores.shape[-2:]) != self.size:
            msg = (f"per-position statistics are {self.size[0]}x{self.size[1]}, the maps {scores.shape[-2]}x{scores.shape[-1]}: "
                   "score at the image_size the statistics were fitted at, or set positional_statistics false")  # fmt: skip
            raise ValueError(msg)
        variance = self.position_std[term, level] ** 2 + self.shrinkage * self.std[term, level] ** 2
        return (scores - self.position_mean[term, level]) / variance.sqrt().clamp_min(1e-12)


class StatisticsAccumulator:
    """Running per-term, per-level sums of many ``[levels, B, 1, H, W]`` maps, per pixel position (float64)."""

    def __init__(self) -> None:
        self.images = 0
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    def add(self, kl: torch.Tensor, feature: torch.Tensor) -> None:
        """Add ``[levels, B, 1, H, W]`` raw maps of both terms."""
        maps = torch.stack((kl, feature)).double().flatten(2, 3)  # [2, levels, B, H, W]
        total, squares = maps.sum(dim=2), maps.pow(2).sum(dim=2)
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.images += maps.shape[2]

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean, std)`` over all pixels (``[2, levels]``), then per position (``[2, levels, H, W]``)."""
        if self.total is None or self.squares is None:
            msg = "no maps were added"
            raise ValueError(msg)
        position_mean, position_square = self.total / self.images, self.squares / self.images
        mean, square = position_mean.mean(dim=(2, 3)), position_square.mean(dim=(2, 3))  # every position has as many pixels
        std, position_std = ((x2 - x**2).clamp_min(0).sqrt() for x, x2 in ((mean, square), (position_mean, position_square)))
        return mean.float(), std.float(), position_mean.float(), position_std.float()


def ensemble(
    kl: torch.Tensor,
    feature: torch.Tensor,
    normaliser: LevelNormaliser,
    alpha: float,
    normalise_features: bool,
    per_position: bool = False,
) -> torch.Tensor:
    """Eq. 11 (averaged over levels) from ``[levels, B, 1, H, W]`` raw KL and feature maps: ``[B, 1, H, W]``."""
    combined = []
    for level in range(kl.shape[0]):
        pixel = normaliser(kl[level], 0, level, per_position)
        semantic = normaliser(feature[level], 1, level, per_position) if normalise_features else feature[level]
        combined.append(alpha * pixel + (1 - alpha) * semantic)
    return torch.stack(combined).mean(dim=0)
