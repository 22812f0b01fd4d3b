"""Prototype memories: K-Means prototypes merged by cosine similarity (DPNR Eqs. 7-9).

The memory's size depends on the data, so it lives in buffers that start empty and are resized
when a checkpoint is loaded (anomalib's ``DynamicBufferMixin``); ``DynamicShapeMixin`` does the
same for learnable parameters initialised from such a memory.
"""

from __future__ import annotations

import numpy as np
import torch
from anomalib.models.components.base import DynamicBufferMixin
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import KMeans
from torch import nn

__all__ = ["DynamicShapeMixin", "PrototypeMemory", "kmeans_prototypes", "merge_prototypes"]


def kmeans_prototypes(features: torch.Tensor, num_prototypes: int, seed: int = 0) -> torch.Tensor:
    """K-Means centroids of ``[N, D]`` features (Eq. 7); ``min(K, N)`` of them, deterministic for a seed."""
    if features.ndim != 2 or features.shape[0] == 0:
        msg = f"need a non-empty [N, D] feature matrix to cluster, got shape {tuple(features.shape)}"
        raise ValueError(msg)
    if num_prototypes < 1:
        msg = f"num_prototypes must be >= 1, got {num_prototypes}"
        raise ValueError(msg)
    data = features.detach().double().cpu().numpy()
    clusters = min(num_prototypes, len(np.unique(data, axis=0)))
    kmeans = KMeans(n_clusters=clusters, n_init=4, random_state=seed).fit(data)
    return torch.from_numpy(kmeans.cluster_centers_).to(features.dtype)


def merge_prototypes(prototypes: torch.Tensor, threshold: float) -> torch.Tensor:
    """Merge prototypes whose cosine similarity exceeds ``threshold`` (Eqs. 8-9).

    The relation ``S(c_i, c_j) > tau`` is closed transitively into equivalence classes (connected
    components of the similarity graph); each class becomes the mean of its members.
    """
    normed = nn.functional.normalize(prototypes.double(), dim=1)
    similar = (normed @ normed.T > threshold).cpu().numpy()
    count, labels = connected_components(similar, directed=False)
    labels_t = torch.from_numpy(labels).to(prototypes.device)
    merged = torch.zeros(count, prototypes.shape[1], dtype=prototypes.dtype, device=prototypes.device)
    merged.index_add_(0, labels_t, prototypes)
    return merged / torch.bincount(labels_t, minlength=count).unsqueeze(1).to(prototypes.dtype)


class PrototypeMemory(DynamicBufferMixin, nn.Module):
    """A compact memory ``M = {eta_1..eta_M}`` of refined prototypes (Eqs. 6-9).

    Args:
        num_prototypes: Initial prototypes ``K`` from K-Means.
        merge_threshold: Cosine-similarity threshold ``tau`` above which prototypes merge.
        seed: K-Means seed.
    """

    def __init__(self, num_prototypes: int = 16, merge_threshold: float = 0.95, seed: int = 0) -> None:
        super().__init__()
        if not -1.0 <= merge_threshold <= 1.0:
            msg = f"merge_threshold is a cosine similarity in [-1, 1], got {merge_threshold}"
            raise ValueError(msg)
        self.num_prototypes = num_prototypes
        self.merge_threshold = merge_threshold
        self.seed = seed
        self.register_buffer("prototypes", torch.empty(0, 0))
        self.register_buffer("initial_count", torch.zeros((), dtype=torch.long))

    @property
    def is_fitted(self) -> bool:
        """Whether the memory holds prototypes."""
        return self.prototypes.numel() > 0

    def fit(self, features: torch.Tensor) -> torch.Tensor:
        """Cluster ``[N, D]`` features into ``K`` prototypes, merge near-duplicates, store and return them."""
        initial = kmeans_prototypes(features, self.num_prototypes, self.seed)
        merged = merge_prototypes(initial, self.merge_threshold)
        self.prototypes = merged.to(self.prototypes.device, torch.float32)
        self.initial_count = torch.tensor(initial.shape[0], device=self.prototypes.device)
        return self.prototypes


class DynamicShapeMixin:
    """Resize parameters and buffers to the checkpoint's shapes before loading.

    For modules whose parameter shapes are set from data (e.g. prototypes initialised from a
    ``PrototypeMemory``); the parameter objects are kept, so optimisers stay attached.
    """

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:  # noqa: ANN002
        tensors = {**self._parameters, **self._buffers}  # type: ignore[attr-defined]
        for name, tensor in tensors.items():
            key = prefix + name
            if tensor is not None and key in state_dict and state_dict[key].shape != tensor.shape:
                tensor.data = torch.empty_like(state_dict[key], device=tensor.device, dtype=tensor.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]
