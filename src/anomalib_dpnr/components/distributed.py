"""Multi-device (DDP) safety for state fitted from data (prototype memories, memory banks).

Every rank fits such state itself from the full training set (``setup("fit")``). DDP then
broadcasts rank 0's parameters and buffers, which fails (or hangs) when a data-dependent shape
differs between ranks and silently hides a rank that fitted something else. ``sync_fitted_state``
compares a digest of that state across ranks, reports the result, and makes every rank use rank 0's.
"""

from __future__ import annotations

import hashlib

import torch
from anomalib.models.components.base import DynamicBufferMixin
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from .prototypes import DynamicShapeMixin

__all__ = ["fitted_state", "sync_fitted_state"]


def fitted_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors held directly by modules whose shapes come from data (``DynamicBufferMixin``/``DynamicShapeMixin``)."""
    owners = {name for name, m in module.named_modules() if isinstance(m, DynamicBufferMixin | DynamicShapeMixin)}
    return {key: value for key, value in module.state_dict().items() if key.rpartition(".")[0] in owners}


def _digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(state.items()):
        digest.update(f"{key}{tuple(value.shape)}{value.dtype}".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sync_fitted_state(module: nn.Module, strategy: Strategy, name: str) -> bool:
    """Check that every rank fitted the same ``fitted_state``; load rank 0's everywhere. Returns whether they agreed."""
    state = fitted_state(module)
    if strategy.world_size < 2 or not state or not torch.distributed.is_initialized():
        return True
    digests: list[str | None] = [None] * strategy.world_size
    torch.distributed.all_gather_object(digests, _digest(state))
    agreed = len(set(digests)) == 1
    if agreed:
        rank_zero_info(f"{name}: fitted state ({len(state)} tensors) agrees on all {strategy.world_size} ranks")
    else:
        differing = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
        rank_zero_warn(f"{name}: fitted state differs on ranks {differing}; every rank now uses rank 0's")
    root = strategy.broadcast({key: value.cpu() for key, value in state.items()}, src=0)
    module.load_state_dict(root, strict=False)
    return agreed
