"""How much an anomaly map's second term weighs, chosen on the validation split's ground-truth masks.

A map ``base + w * extra`` (e.g. pixel and feature discrepancy) has no weight ``w`` that suits every product: a
feature distance that separates defects on objects can rank a texture's normal grain above its defects. The weight
is therefore fitted like the thresholds: on the validation split, never on the scored test images.

The criterion is the sum of the two localisation metrics the evaluator reports, pixel AUROC and PRO: a weight that
gains a little pixel AUROC by washing out small defects (PRO) is not chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.metrics.aupro import _AUPRO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch.nn import functional as F  # noqa: N812
from torchmetrics.functional.classification import binary_auroc

__all__ = ["FittedTermWeight", "best_weight", "check_weights", "pixel_auroc", "pixel_pro", "weight_scores"]


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


class FittedTermWeight:
    """Lightning-module mixin: the model's map weight (``fitted_weight``: ``feature_weight`` unless a subclass names
    another, e.g. RAN's ``alpha``) is chosen from ``<fitted_weight>_choices`` on the validation split when validation
    starts (before its batches are scored), and saved in the checkpoint.

    Put it before ``DiffusionAnomalyModule`` in the bases and set ``self.<fitted_weight>_choices`` (``check_weights``)
    in ``__init__``. The torch model provides the weight as an attribute, ``scorer.blur`` and

    - ``validation_terms(images) -> (t0, t1)``: the raw term maps of ``images``;
    - ``weighted_terms(t0, t1) -> (base, extra)``: ``[B, 1, H, W]``; the map before smoothing is ``base + weight * extra``;
    - ``score_maps(t0, t1) -> InferenceBatch``: what ``forward`` returns for those terms.

    Each choice is scored by pixel AUROC + PRO on the validation masks (means over DDP ranks); the best becomes the
    model's weight. The term maps are kept by image path, so ``validation_step`` does not compute them again.
    Without validation masks (both anomalous and normal pixels) it warns and keeps the configured weight.
    """

    fitted_weight: str = "feature_weight"
    _validation_terms: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]]

    @property
    def weight_choices(self) -> tuple[float, ...] | None:
        """The weights to choose from (``<fitted_weight>_choices``; ``None``: keep the configured one)."""
        return getattr(self, f"{self.fitted_weight}_choices", None)

    @property
    def weight_key(self) -> str:
        """Checkpoint entry of the fitted weight (``dpnr_feature_weight``, ``d3ad_feature_weight``, ``ran_alpha``)."""
        return f"{type(self).__name__.lower()}_{self.fitted_weight}"

    def on_validation_start(self) -> None:
        """Choose the map weight on the validation split before it is scored (subclasses fit what the terms
        depend on first)."""
        super().on_validation_start()  # type: ignore[misc]
        self._validation_terms = {}
        if self.weight_choices and not self.trainer.sanity_checking:  # type: ignore[attr-defined]
            self.fit_weight()

    @torch.no_grad()
    def fit_weight(self) -> None:
        """Score every choice on the validation masks and keep the best as the model's weight."""
        model, name, weight = self.model, type(self).__name__, self.fitted_weight  # type: ignore[attr-defined]
        self._validation_terms = {}
        bases, extras, masks = [], [], []
        for batch in self.validation_batches():  # type: ignore[attr-defined]
            terms = model.validation_terms(batch.image)
            if batch.image_path is not None:
                self._validation_terms[tuple(batch.image_path)] = terms
            if batch.gt_mask is not None:
                base, extra = model.weighted_terms(*terms)
                bases.append(model.scorer.blur(base)), extras.append(model.scorer.blur(extra))
                masks.append(F.interpolate(batch.gt_mask.float().view(-1, 1, *batch.gt_mask.shape[-2:]), size=base.shape[-2:]) > 0.5)
        masks = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
        if not masks.any() or masks.all():
            rank_zero_warn(
                f"{name}: the validation split has no masks with both anomalous and normal pixels, so {weight} stays "
                f"{getattr(model, weight)} ({weight}_choices needs anomalous validation images with masks)"
            )
            return
        scores = weight_scores(torch.cat(bases), torch.cat(extras), masks, self.weight_choices)
        strategy = self.trainer.strategy  # type: ignore[attr-defined]
        mean = strategy.reduce(torch.tensor(list(scores.values()), device=self.device), reduce_op="mean")  # type: ignore[attr-defined]
        scores = {weight: tuple(values) for weight, values in zip(scores, mean.tolist(), strict=True)}
        setattr(model, weight, best_weight(scores))
        shown = ", ".join(f"{w:g}: {a:.4f} / {p:.4f}" for w, (a, p) in scores.items())
        rank_zero_info(f"{name}: {weight} {getattr(model, weight):g} chosen on the validation split (pixel AUROC / PRO {shown})")

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Maps and scores with the chosen weight (from the kept term maps where there are some)."""
        kept_terms = getattr(self, "_validation_terms", {})
        kept = kept_terms.pop(tuple(batch.image_path), None) if batch.image_path is not None else None
        if kept is None:
            return super().validation_step(batch, *args, **kwargs)  # type: ignore[misc]
        return batch.update(**self.model.score_maps(*kept)._asdict())  # type: ignore[attr-defined]

    def on_validation_end(self) -> None:
        """Drop term maps no batch asked for."""
        super().on_validation_end()  # type: ignore[misc]
        self._validation_terms = {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the fitted weight with the network weights."""
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        checkpoint[self.weight_key] = getattr(self.model, self.fitted_weight)  # type: ignore[attr-defined]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the fitted weight (unless the choices are null: the configured one)."""
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        if self.weight_choices and self.weight_key in checkpoint:
            setattr(self.model, self.fitted_weight, float(checkpoint[self.weight_key]))  # type: ignore[attr-defined]
