"""D3AD's domain adaptation (Tebbe & Tayyub, Sec. 3; DDAD Sec. 3.3): a trainable copy of the backbone.

The copy starts from the frozen ImageNet backbone and is fine-tuned on the nominal training images so that
features of reconstructions match features of their inputs (``DomainAdaptationLoss``); the anomaly map's
feature term then uses the copy. Its BatchNorm statistics stay those of the pretrained backbone (the copy is
always in eval mode; only weights are fine-tuned), so small training batches cannot shift them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from anomalib_dpnr.components.features import FeatureEmbedder

__all__ = ["AdaptedBackbone"]


class AdaptedBackbone(nn.Module):
    """Fine-tunable copy of a frozen ``FeatureEmbedder``.

    Args:
        embedder: The frozen backbone to copy.
    """

    def __init__(self, embedder: FeatureEmbedder) -> None:
        super().__init__()
        self.embedder = copy.deepcopy(embedder)
        self.embedder.extractor.requires_grad = True  # TimmFeatureExtractor runs under no_grad otherwise
        self.embedder.requires_grad_(True)
        self.train(False)

    def train(self, mode: bool = True) -> AdaptedBackbone:
        """Stays in eval mode (frozen BatchNorm statistics) whatever ``mode`` is."""
        del mode
        return super().train(False)

    def layer_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer feature maps of ``[-1, 1]`` images, with gradient to the copy's weights."""
        return self.embedder.layer_maps(images)
