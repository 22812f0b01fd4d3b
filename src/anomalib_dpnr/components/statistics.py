"""Statistics of raw anomaly-map terms over training images, and the normalisations that read them.

A model's map combines terms of different scales (a latent or KL distance, a feature distance; several noise levels),
so each term is normalised by statistics of the training images' maps under the final networks: fitted once and
stored as buffers, never statistics of the batch being scored. ``MapStatistics`` keeps three kinds for every slot
(term, level, ...) and reads them in one of three ways:

- ``minmax``: ``(s - low) / (high - low)``, the slot's minimum and maximum over all training pixels (D3AD, DDAD);
- ``standard``: ``(s - m) / d``, the slot's mean and standard deviation over all training pixels (RAN Eq. 11);
- ``position``: ``(s - m(p)) / sqrt(var(p) + shrinkage * d^2)``, the mean and variance at each pixel position ``p``
  over the training images, so a position whose score is high on normal images too (image borders, where the
  convolutions' padding shows, or the fixed structure of aligned objects) is discounted there only. Positions where
  the training maps barely vary (a constant background) would turn tiny differences into huge scores, so their
  variance is ridged with a share of the slot's variance over all pixels.

All three are fitted in one pass (``MapAccumulator``), so any reading works on the same checkpoint;
``FittedMapStatistics`` fits them when validation starts during fit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.models.components.base import DynamicBufferMixin
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import Dataset

__all__ = ["READINGS", "FittedMapStatistics", "MapAccumulator", "MapStatistics", "check_statistics_images"]

READINGS = ("minmax", "standard", "position")
STATISTICS = ("low", "high", "mean", "std", "position_mean", "position_std")


class MapStatistics(DynamicBufferMixin, nn.Module):
    """Per-slot minimum/maximum and mean/standard deviation of raw map terms (``[*slots]``), and per-position mean/
    standard deviation (``[*slots, H, W]``); identity until fitted. A checkpoint's per-position statistics load at the
    size they were fitted at (anomalib's ``DynamicBufferMixin``), so its weights also load into a model of another
    ``image_size`` that reads ``minmax`` or ``standard``.

    Args:
        slots: Shape of the slot grid, e.g. ``(2,)`` for two terms or ``(2, levels)`` for two terms per noise level.
        size: ``(H, W)`` of the maps (the model's image size).
        shrinkage: Share of the slot's variance over all pixels added to each position's variance (``position``).
    """

    def __init__(self, slots: Sequence[int], size: tuple[int, int], shrinkage: float = 0.1) -> None:
        super().__init__()
        if shrinkage < 0:
            msg = f"positional_shrinkage must be >= 0, got {shrinkage}"
            raise ValueError(msg)
        slots = tuple(int(s) for s in slots)
        self.shrinkage = shrinkage
        self.register_buffer("low", torch.zeros(slots))
        self.register_buffer("high", torch.ones(slots))
        self.register_buffer("mean", torch.zeros(slots))
        self.register_buffer("std", torch.ones(slots))
        self.register_buffer("position_mean", torch.zeros(*slots, *size))
        self.register_buffer("position_std", torch.ones(*slots, *size))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def size(self) -> tuple[int, int]:
        """Map size of the per-position statistics."""
        return tuple(self.position_mean.shape[-2:])

    def fit(self, statistics: dict[str, torch.Tensor]) -> None:
        """Store the statistics ``MapAccumulator.result`` returns."""
        missing = [name for name in STATISTICS if name not in statistics]
        if missing:
            msg = f"map statistics lack {missing}"
            raise ValueError(msg)
        for name in STATISTICS:
            value = statistics[name]
            getattr(self, name).copy_(value.clamp_min(1e-12) if name.endswith("std") else value)
        self.fitted.fill_(True)

    def forward(self, scores: torch.Tensor, slot: int | tuple[int, ...], reading: str) -> torch.Tensor:
        """``scores`` (``[B, 1, H, W]`` maps of slot ``slot``) normalised by the ``reading`` of ``READINGS``."""
        if reading == "minmax":
            return (scores - self.low[slot]) / (self.high[slot] - self.low[slot]).clamp_min(1e-12)
        if reading == "standard":
            return (scores - self.mean[slot]) / self.std[slot]
        if reading != "position":
            msg = f"map statistics are read as one of {READINGS}, got {reading!r}"
            raise ValueError(msg)
        if tuple(scores.shape[-2:]) != self.size:
            msg = (f"per-position statistics are {self.size[0]}x{self.size[1]}, the maps {scores.shape[-2]}x{scores.shape[-1]}: "
                   "score at the image_size the statistics were fitted at, or set positional_statistics false")  # fmt: skip
            raise ValueError(msg)
        variance = self.position_std[slot] ** 2 + self.shrinkage * self.std[slot] ** 2
        return (scores - self.position_mean[slot]) / variance.sqrt().clamp_min(1e-12)


class MapAccumulator:
    """Running per-slot sums (float64), squares, minima and maxima of many ``[*slots, B, 1, H, W]`` raw maps."""

    def __init__(self) -> None:
        self.images = 0
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def add(self, maps: torch.Tensor) -> None:
        """Add ``[*slots, B, 1, H, W]`` raw maps (one channel)."""
        if maps.ndim < 5 or maps.shape[-3] != 1:
            msg = f"maps must be [*slots, B, 1, H, W], got {tuple(maps.shape)}"
            raise ValueError(msg)
        maps = maps.double().flatten(-4, -3)  # [*slots, B, H, W]
        batch_dim = maps.ndim - 3
        total, squares = maps.sum(dim=batch_dim), maps.pow(2).sum(dim=batch_dim)
        low, high = maps.amin(dim=(-3, -2, -1)), maps.amax(dim=(-3, -2, -1))
        if self.total is None:
            self.total, self.squares, self.low, self.high = total, squares, low, high
        else:
            self.total, self.squares = self.total + total, self.squares + squares
            self.low, self.high = torch.minimum(self.low, low), torch.maximum(self.high, high)
        self.images += maps.shape[batch_dim]

    def result(self) -> dict[str, torch.Tensor]:
        """``low``/``high``/``mean``/``std`` over all pixels (``[*slots]``), ``position_mean``/``position_std`` per
        position (``[*slots, H, W]``), as float32."""
        if self.total is None or self.squares is None:
            msg = "no maps were added"
            raise ValueError(msg)
        position_mean, position_square = self.total / self.images, self.squares / self.images
        mean, square = position_mean.mean(dim=(-2, -1)), position_square.mean(dim=(-2, -1))  # as many pixels everywhere
        std, position_std = ((x2 - x**2).clamp_min(0).sqrt() for x, x2 in ((mean, square), (position_mean, position_square)))
        values = (self.low, self.high, mean, std, position_mean, position_std)
        return {name: value.float() for name, value in zip(STATISTICS, values, strict=True)}


def check_statistics_images(count: int) -> int:
    """``count`` if it is a positive number of images, else a clear error."""
    if count < 1:
        msg = f"statistics_images must be >= 1, got {count}"
        raise ValueError(msg)
    return count


class FittedMapStatistics:
    """Lightning-module mixin: when validation starts during fit (not the sanity check; once per global step), the
    model's ``normaliser`` (``MapStatistics``) is fitted on the raw maps of up to ``statistics_images`` training
    images under the current networks, so thresholds and a fitted map weight (``FittedTermWeight``) are read on the
    final statistics. Put it after ``FittedTermWeight`` and before ``DiffusionAnomalyModule`` in the bases (the
    statistics are then fitted first), set ``self.statistics_images`` (``check_statistics_images``) in
    ``__init__``; the torch model provides ``normaliser`` and ``statistics_maps(images) -> [*slots, B, 1, H, W]``.
    ``fits_statistics`` (default true) turns the fitting off when nothing reads the statistics.
    """

    statistics_images: int
    _statistics_step: int | None = None

    @property
    def fits_statistics(self) -> bool:
        """Whether this model reads the statistics (so fit needs them)."""
        return True

    @torch.no_grad()
    def fit_statistics(self, dataset: Dataset) -> None:
        """Every kind of ``MapStatistics`` of the raw maps of (up to ``statistics_images``) training images."""
        accumulator = MapAccumulator()
        for images in self.training_images(dataset, self.statistics_images):  # type: ignore[attr-defined]
            accumulator.add(self.model.statistics_maps(images).float())  # type: ignore[attr-defined]
        self.model.normaliser.fit(accumulator.result())  # type: ignore[attr-defined]

    def on_validation_start(self) -> None:
        """During fit: the statistics of the training images under the current networks, then the rest."""
        trainer = self.trainer  # type: ignore[attr-defined]
        fitting = self.fits_statistics and trainer.state.fn == "fit" and not trainer.sanity_checking
        if fitting and self._statistics_step != self.global_step:  # type: ignore[attr-defined]
            self.fit_statistics(self.fitting_data("the map-normalisation statistics"))  # type: ignore[attr-defined]
            self._statistics_step = self.global_step  # type: ignore[attr-defined]
        super().on_validation_start()  # type: ignore[misc]

    def on_test_start(self) -> None:
        """Warn when the statistics were never fitted (no validation ran during fit): maps are unnormalised."""
        super().on_test_start()  # type: ignore[misc]
        if self.fits_statistics and not bool(self.model.normaliser.fitted):  # type: ignore[attr-defined]
            rank_zero_warn(
                f"{type(self).__name__}: the map-normalisation statistics are not fitted (no validation ran during fit); "
                "maps are unnormalised"
            )
