"""RAN's multi-scale noise ensemble (Lu et al., Eq. 11).

Each score level ``t_i`` gives a pixel (KL) map ``s_{t_i}`` and a feature map ``s^f_{t_i}``; the KL maps vary in scale
with ``t``, so each is standardised, ``s_hat = (s - m_i) / d_i``, with the mean ``m_i`` and standard deviation ``d_i``
of that level's map over training images (``MapStatistics`` with one slot per term and level, reading ``standard``).
``A = 1/n sum_i [alpha s_hat_{t_i} + (1 - alpha) s^f_{t_i}]`` (the feature maps standardised too when asked).

With ``positional_statistics`` (reading ``position``), ``m_i`` and ``d_i`` are maps instead: the mean and standard
deviation at each pixel position over the training images, ridged with a share (``positional_shrinkage``) of the
level's variance over all pixels (see ``anomalib_dpnr.components.statistics``).
"""

from __future__ import annotations

import torch

from anomalib_dpnr.components.statistics import MapStatistics

__all__ = ["TERMS", "ensemble", "standardised_terms"]

TERMS = ("kl", "feature")  # the first slot axis of RAN's MapStatistics


def standardised_terms(
    kl: torch.Tensor,
    feature: torch.Tensor,
    statistics: MapStatistics,
    normalise_features: bool,
    reading: str = "standard",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The level means of the standardised KL maps ``s_hat_{t_i}`` and of the feature maps ``s^f_{t_i}`` (standardised
    too with ``normalise_features``) from ``[levels, B, 1, H, W]`` raw maps: two ``[B, 1, H, W]`` maps.

    ``statistics`` has slots ``[2, levels]`` (KL, feature) and is read as ``reading`` (``standard`` or ``position``).
    """

    def standardised_mean(maps: torch.Tensor, term: int) -> torch.Tensor:
        return torch.stack([statistics(maps[level], (term, level), reading) for level in range(maps.shape[0])]).mean(dim=0)

    return standardised_mean(kl, 0), standardised_mean(feature, 1) if normalise_features else feature.mean(dim=0)


def ensemble(
    kl: torch.Tensor,
    feature: torch.Tensor,
    statistics: MapStatistics,
    alpha: float,
    normalise_features: bool,
    reading: str = "standard",
) -> torch.Tensor:
    """Eq. 11 (averaged over levels) from ``[levels, B, 1, H, W]`` raw KL and feature maps: ``[B, 1, H, W]``."""
    pixel, semantic = standardised_terms(kl, feature, statistics, normalise_features, reading)
    return alpha * pixel + (1 - alpha) * semantic
