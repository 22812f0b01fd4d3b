"""D3AD's dynamic noise step (Tebbe & Tayyub, Sec. 3: initial anomaly estimate -> forward-process step).

A test image's backbone features are compared with a bank of training features by k-nearest-neighbour L1
distance; a histogram of the *training* images' own kNN distances (leave-one-out: a training image never
counts itself) maps that distance to a bin, and the bin to the step ``t`` the reconstruction starts from:
``t = round(max(bin, min_bin) / num_bins * max_step, step_rounding)``, ``bin`` in ``1..num_bins`` (values
beyond the training range fall into the first or last bin). Per image (``image``) or per feature-grid
region (``region``: each location compared with the same location of the training images).

Bank, training distances and bin edges depend on the data, so they are buffers that start empty and take
the checkpoint's shape on load (anomalib's ``DynamicBufferMixin``).
"""

from __future__ import annotations

import torch
from anomalib.models.components.base import DynamicBufferMixin
from torch import nn

__all__ = ["DynamicStep", "knn_distances", "pairwise_l1"]


def pairwise_l1(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Per-region L1 distances ``[B, N, L]`` between ``[B, L, C]`` query and ``[N, L, C]`` bank features."""
    return (queries.unsqueeze(1) - bank.unsqueeze(0)).abs().sum(dim=-1)


def knn_distances(distances: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` smallest distances along dim 1 (the bank): ``[B, N, ...]`` to ``[B, ...]``."""
    return distances.topk(min(k, distances.shape[1]), dim=1, largest=False).values.mean(dim=1)


class DynamicStep(DynamicBufferMixin, nn.Module):
    """kNN anomaly estimate and histogram step rule.

    Args:
        k: Neighbours averaged into the kNN distance (reference: 20).
        num_bins: Histogram bins over the training distances (reference: 10).
        min_bin: Bins below this one use it (reference: 2, so the smallest step is ``0.2 * max_step``).
        max_step: Step of the last bin (reference: 80).
        step_rounding: Steps are rounded to a multiple of this (reference: 10).
        mode: ``image`` (one step per image) or ``region`` (one per feature-grid location).
        chunk: Bank images compared at once (bounds memory; results do not depend on it).
    """

    def __init__(
        self,
        k: int = 20,
        num_bins: int = 10,
        min_bin: int = 2,
        max_step: int = 80,
        step_rounding: int = 10,
        mode: str = "image",
        chunk: int = 64,
    ) -> None:
        super().__init__()
        if mode not in {"image", "region"}:
            msg = f"dynamic step mode must be 'image' or 'region', got {mode!r}"
            raise ValueError(msg)
        if k < 1 or num_bins < 1 or not 1 <= min_bin <= num_bins or max_step < 1 or step_rounding < 1:
            msg = (
                "need k >= 1, num_bins >= 1, 1 <= min_bin <= num_bins, max_step >= 1 and step_rounding >= 1, got "
                f"k={k}, num_bins={num_bins}, min_bin={min_bin}, max_step={max_step}, step_rounding={step_rounding}"
            )
            raise ValueError(msg)
        self.k, self.num_bins, self.min_bin = k, num_bins, min_bin
        self.max_step, self.step_rounding, self.mode, self.chunk = max_step, step_rounding, mode, chunk
        self.register_buffer("bank", torch.empty(0, 0, 0))  # [N, L, C] training features
        self.register_buffer("train_distances", torch.empty(0))  # leave-one-out kNN distances, [N] or [N * L]
        self.register_buffer("edges", torch.empty(0))  # [num_bins + 1] histogram bin edges

    @property
    def is_fitted(self) -> bool:
        """Whether the bank and the bins are built."""
        return self.bank.numel() > 0 and self.edges.numel() > 0

    @property
    def levels(self) -> list[int]:
        """Every step the rule can choose, ascending."""
        return sorted({self.bin_step(b) for b in range(1, self.num_bins + 1)})

    def bin_step(self, bin_index: int) -> int:
        """``round(max(bin, min_bin) / num_bins * max_step)`` to a multiple of ``step_rounding`` (at least one)."""
        raw = max(bin_index, self.min_bin) / self.num_bins * self.max_step
        return max(self.step_rounding, int(round(raw / self.step_rounding)) * self.step_rounding)

    def _pairwise(self, queries: torch.Tensor) -> torch.Tensor:
        """L1 distances to every bank image: ``[B, N]`` (image mode) or ``[B, N, L]`` (region mode), the bank taken
        ``chunk`` images at a time (the batch dimension stays symbolic for export)."""
        parts = [pairwise_l1(queries, self.bank[start : start + self.chunk]) for start in range(0, self.bank.shape[0], self.chunk)]
        distances = torch.cat(parts, dim=1)
        return distances.sum(dim=-1) if self.mode == "image" else distances  # image: L1 over the flattened pooled map

    def _distances(self, queries: torch.Tensor, exclude_self: bool) -> torch.Tensor:
        """kNN distance per image ``[B]`` or per region ``[B, L]``; ``exclude_self``: queries are the bank, in order."""
        if not exclude_self:
            return knn_distances(self._pairwise(queries), self.k)
        parts = []
        for start in range(0, queries.shape[0], self.chunk):
            block = self._pairwise(queries[start : start + self.chunk])
            rows = torch.arange(block.shape[0], device=block.device)
            block[rows, rows + start] = float("inf")  # a training image must not be its own nearest neighbour
            parts.append(knn_distances(block, min(self.k, self.bank.shape[0] - 1)))
        return torch.cat(parts)

    def fit(self, features: torch.Tensor) -> None:
        """Store ``[N, L, C]`` training features, their leave-one-out distances and the histogram edges."""
        if features.ndim != 3 or features.shape[0] < 2:
            msg = f"the kNN bank needs at least 2 training images ([N, L, C] features), got shape {tuple(features.shape)}"
            raise ValueError(msg)
        self.bank = features.detach().float()
        distances = self._distances(self.bank, exclude_self=True).reshape(-1)
        self.train_distances = distances
        low, high = distances.min(), distances.max()
        edges = low + (high - low) * torch.arange(self.num_bins + 1, device=distances.device) / self.num_bins
        edges[0], edges[-1] = low, high  # exact ends
        self.edges = edges

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """kNN distance of ``[B, L, C]`` features: ``[B]`` (image mode) or ``[B, L]`` (region mode)."""
        if not self.is_fitted:
            msg = "D3AD: the kNN feature bank is empty; fit the model (the bank is built when fit starts) or load a checkpoint"
            raise RuntimeError(msg)
        return self._distances(features.float(), exclude_self=False)

    def bins(self, distances: torch.Tensor) -> torch.Tensor:
        """Histogram bin ``1..num_bins`` of each distance (counting inner edges below it: export-friendly)."""
        inner = self.edges[1:-1]
        return (distances.unsqueeze(-1) >= inner).sum(dim=-1) + 1

    def steps(self, distances: torch.Tensor) -> torch.Tensor:
        """Start step of each distance (long tensor of the same shape)."""
        table = torch.tensor([self.bin_step(b) for b in range(self.num_bins + 1)], device=distances.device)
        return table[self.bins(distances)]
