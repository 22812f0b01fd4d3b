"""Spatial-aware Feature Fusion (SFF) block of DiAD (He et al., Sec. "Spatial-aware Feature Fusion Block", Fig. 3).

Each output ``P_i`` of the SG network's deepest encoder level (SGEB4; reference: input-block outputs 9-11) receives
every output ``H_j`` of the level above (SGEB3; outputs 6-8), brought to its grid by a convolutional block ``F``:
``Q_i = SiLU(P_i + sum_j F_ij(H_j))`` (Eq. 8, with the reference's final SiLU). ``F_ij`` = 3x3 stride-2 convolution
without bias, zero-initialised, + InstanceNorm + SiLU (the paper's IN+SiLU ablation winner, Table 7).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

__all__ = ["SpatialFeatureFusion"]


def fusion_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """``F``: zero-initialised 3x3 stride-2 convolution (no bias) + InstanceNorm + SiLU."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False)
    nn.init.zeros_(conv.weight)
    return nn.Sequential(conv, nn.InstanceNorm2d(out_channels), nn.SiLU())


class SpatialFeatureFusion(nn.Module):
    """``Q_i = SiLU(P_i + sum_j F_ij(H_j))`` over the encoder outputs at ``targets`` from those at ``sources``.

    Args:
        sources: Indices (into the list of encoder outputs) of the higher-resolution level ``H_j``.
        targets: Indices of the level below ``P_i`` (half the resolution).
        channels: Channels of every encoder output (all indices).
    """

    def __init__(self, sources: Sequence[int], targets: Sequence[int], channels: Sequence[int]) -> None:
        super().__init__()
        if not sources or not targets:
            msg = f"SFF needs source and target outputs, got sources={list(sources)}, targets={list(targets)}"
            raise ValueError(msg)
        self.sources = [int(j) for j in sources]
        self.targets = [int(i) for i in targets]
        self.blocks = nn.ModuleList(
            nn.ModuleList(fusion_block(channels[j], channels[i]) for j in self.sources) for i in self.targets
        )

    def forward(self, outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The encoder outputs with each target ``P_i`` replaced by ``Q_i``."""
        fused = list(outputs)
        for i, blocks in zip(self.targets, self.blocks, strict=True):
            extra = sum(block(outputs[j]) for j, block in zip(self.sources, blocks, strict=True))
            fused[i] = F.silu(outputs[i] + extra)
        return fused
