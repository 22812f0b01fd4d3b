"""RAN's multi-scale noise ensemble (Lu et al., Eq. 11).

Each score level ``t_i`` gives a pixel (KL) map ``s_{t_i}`` and a feature map ``s^f_{t_i}``; the KL maps vary in scale
with ``t``, so each is standardised, ``s_hat = (s - m_i) / d_i``, with the mean ``m_i`` and standard deviation ``d_i``
of that level's map over training images (stored buffers, fitted once: never statistics of the batch being scored).
``A = 1/n sum_i [alpha s_hat_{t_i} + (1 - alpha) s^f_{t_i}]`` (the feature maps standardised too when asked).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LevelNormaliser", "StatisticsAccumulator", "ensemble"]

TERMS = ("kl", "feature")


class LevelNormaliser(nn.Module):
    """Per-term, per-level mean and standard deviation of the raw maps; identity until fitted.

    Args:
        levels: Number of score levels.
    """

    def __init__(self, levels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(len(TERMS), levels))
        self.register_buffer("std", torch.ones(len(TERMS), levels))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def fit(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store ``[2, levels]`` statistics (row 0: KL, row 1: feature)."""
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-12))
        self.fitted.fill_(True)

    def forward(self, scores: torch.Tensor, term: int, level: int) -> torch.Tensor:
        """``(scores - mean) / std`` of term ``term`` (0 KL, 1 feature) at level ``level``."""
        return (scores - self.mean[term, level]) / self.std[term, level]


class StatisticsAccumulator:
    """Running per-term, per-level mean and standard deviation over every pixel of many maps (float64 sums)."""

    def __init__(self, levels: int, device: torch.device) -> None:
        self.count = torch.zeros(len(TERMS), levels, dtype=torch.float64, device=device)
        self.total = torch.zeros_like(self.count)
        self.squares = torch.zeros_like(self.count)

    def add(self, kl: torch.Tensor, feature: torch.Tensor) -> None:
        """Add ``[levels, B, 1, H, W]`` raw maps of both terms."""
        for term, maps in enumerate((kl, feature)):
            flat = maps.double().flatten(1)
            self.count[term] += flat.shape[1]
            self.total[term] += flat.sum(dim=1)
            self.squares[term] += flat.pow(2).sum(dim=1)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)``, each ``[2, levels]``."""
        mean = self.total / self.count
        variance = (self.squares / self.count - mean**2).clamp_min(0)
        return mean.float(), variance.sqrt().float()


def ensemble(
    kl: torch.Tensor,
    feature: torch.Tensor,
    normaliser: LevelNormaliser,
    alpha: float,
    normalise_features: bool,
) -> torch.Tensor:
    """Eq. 11 (averaged over levels) from ``[levels, B, 1, H, W]`` raw KL and feature maps: ``[B, 1, H, W]``."""
    combined = []
    for level in range(kl.shape[0]):
        pixel = normaliser(kl[level], 0, level)
        semantic = normaliser(feature[level], 1, level) if normalise_features else feature[level]
        combined.append(alpha * pixel + (1 - alpha) * semantic)
    return torch.stack(combined).mean(dim=0)
