"""How much an anomaly map's second term weighs, chosen on the validation split's ground-truth masks.

A map ``base + w * extra`` (e.g. pixel and feature discrepancy) has no weight ``w`` that suits every product: a
feature distance that separates defects on objects can rank a texture's normal grain above its defects. The weight
is therefore fitted like the thresholds: on the validation split, never on the scored test images.

The criterion is the sum of the two localisation metrics the evaluator reports, pixel AUROC and PRO: a weight that
gains a little pixel AUROC by washing out small defects (PRO) is not chosen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.metrics.aupro import _AUPRO
from torchmetrics.functional.classification import binary_auroc

__all__ = ["best_weight", "check_weights", "pixel_auroc", "pixel_pro", "weight_scores"]


def check_weights(weights: Sequence[float] | None, name: str) -> tuple[float, ...] | None:
    """``weights`` as a tuple of distinct non-negative numbers (``None``: nothing to choose), or a clear error."""
    if weights is None:
        return None
    values = tuple(float(w) for w in weights)
    if len(values) < 2 or len(set(values)) != len(values) or min(values) < 0:
        msg = f"{name} must list at least two distinct weights >= 0 to choose from (or be null), got {list(weights)}"
        raise ValueError(msg)
    return values


def pixel_auroc(maps: torch.Tensor, masks: torch.Tensor, max_pixels: int = 4_000_000) -> float:
    """Pixel AUROC of ``maps`` against boolean ``masks`` of the same shape (every ``n``-th pixel past ``max_pixels``)."""
    scores, labels = maps.flatten().float(), masks.flatten().long()
    step = max(1, -(-scores.numel() // max_pixels))
    return float(binary_auroc(scores[::step], labels[::step]))


def pixel_pro(maps: torch.Tensor, masks: torch.Tensor) -> float:
    """PRO (area under the per-region overlap curve up to 30% false positives) of ``[N, 1, H, W]`` maps, as
    anomalib's evaluator computes it."""
    metric = _AUPRO()
    metric.update(maps[:, 0].float().cpu(), masks[:, 0].int().cpu())
    return float(metric.compute())


def weight_scores(
    base: torch.Tensor, extra: torch.Tensor, masks: torch.Tensor, weights: Sequence[float]
) -> dict[float, tuple[float, float]]:
    """Pixel AUROC and PRO on ``masks`` of the map ``base + w * extra`` for every ``w`` in ``weights``.

    ``base``/``extra``: smoothed term maps ``[N, 1, H, W]`` (smoothing is linear, so smoothing each term once equals
    smoothing every combination); ``masks``: ``[N, 1, H, W]`` booleans with anomalous and normal pixels.
    """
    if base.shape != extra.shape or base.shape != masks.shape:
        msg = f"term maps and masks must have one shape, got {tuple(base.shape)}, {tuple(extra.shape)}, {tuple(masks.shape)}"
        raise ValueError(msg)
    if not masks.any() or masks.all():
        msg = "choosing a map weight needs validation masks with both anomalous and normal pixels"
        raise ValueError(msg)
    maps = {float(w): base + w * extra for w in weights}
    return {w: (pixel_auroc(m, masks), pixel_pro(m, masks)) for w, m in maps.items()}


def best_weight(scores: dict[float, tuple[float, float]]) -> float:
    """The weight with the highest pixel AUROC + PRO (the two localisation metrics); ties go to the one listed first."""
    order = list(scores)
    return max(order, key=lambda w: (sum(scores[w]), -order.index(w)))
