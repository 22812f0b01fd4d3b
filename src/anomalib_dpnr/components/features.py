"""A frozen ImageNet backbone ``Phi`` as a fused multi-layer feature map (DPNR Eqs. 6 and 13).

Built on anomalib's ``TimmFeatureExtractor``; weights come from the offline HF cache
(``anomalib-dpnr weights install efficientnet_lite0``) or a local file, never from the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.models.components import TimmFeatureExtractor
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .weights import load_backbone_file, require_pretrained

__all__ = ["FeatureEmbedder", "feature_distance_map"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureEmbedder(nn.Module):
    """``Phi``: ``[-1, 1]`` images to ImageNet features, fused as ``F = sum_l w_l Phi_l(x)`` (Eq. 13).

    Layers have different widths, so the weighted layers are resized to the first layer's grid and
    concatenated (``D = sum_l C_l``); the backbone is frozen so prototypes embedded once (Eq. 6)
    stay comparable with image features for the whole run.

    Args:
        backbone: timm model name.
        layers: Backbone layers to fuse (for ``efficientnet_lite0``: ``blocks.1`` /4, ``blocks.2`` /8, ...).
        layer_weights: Fusion weights ``w_l``, one per layer.
        pre_trained: Load ImageNet weights from the offline HF cache.
        weights_path: Local state-dict file to load instead (any timm backbone).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] = ("blocks.1", "blocks.2"),
        layer_weights: Sequence[float] | None = None,
        pre_trained: bool = True,
        weights_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        layers = list(layers)
        weights = [1.0] * len(layers) if layer_weights is None else [float(w) for w in layer_weights]
        if not layers or len(weights) != len(layers):
            msg = f"need one fusion weight per backbone layer, got layers={layers} and layer_weights={weights}"
            raise ValueError(msg)
        if pre_trained and weights_path is None:
            require_pretrained(backbone)
        self.extractor = TimmFeatureExtractor(backbone, list(layers), pre_trained=pre_trained and weights_path is None)
        if self.extractor.layers != layers:  # TimmFeatureExtractor drops unknown names with a warning only
            missing = sorted(set(layers) - set(self.extractor.layers))
            msg = f"backbone {backbone!r} has no layer(s) {missing}"
            raise ValueError(msg)
        if weights_path is not None:
            load_backbone_file(self.extractor.feature_extractor, weights_path)
        self.extractor.requires_grad_(False)
        # timm returns the layers shallow to deep whatever order they were named in (TimmFeatureExtractor keys them,
        # and lists out_dims/reductions, in the order named): relabel by depth
        depth = dict(zip(layers, self.extractor.idx, strict=True))
        self._order = sorted(layers, key=depth.__getitem__)
        self.channels = dict(zip(layers, self.extractor.out_dims, strict=True))
        self.strides = dict(zip(layers, self.extractor.reductions, strict=True))
        self.layers = layers
        self.layer_weights = weights
        self.dim = int(sum(self.extractor.out_dims))
        self.reduction = int(min(self.extractor.reductions))
        self.size_multiple = int(max(self.extractor.reductions))
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def layer_maps(self, images: torch.Tensor, differentiable: bool = False) -> list[torch.Tensor]:
        """Per-layer feature maps of ``[-1, 1]`` images. The backbone is frozen; ``differentiable`` keeps the graph
        from the images to the features (for gradients with respect to the image)."""
        inputs = ((images + 1) / 2 - self.mean) / self.std
        requires_grad = self.extractor.requires_grad
        if differentiable:
            self.extractor.feature_extractor.eval()
            self.extractor.requires_grad = True  # TimmFeatureExtractor runs under no_grad otherwise
        try:
            features = self.extractor(inputs)
        finally:
            self.extractor.requires_grad = requires_grad
        by_name = dict(zip(self._order, features.values(), strict=True))  # keyed in the order named: relabel
        return [by_name[layer] for layer in self.layers]

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """Side of the fused map of ``size`` images: ``(H / r, W / r)``, ``r`` = the finest layer's stride."""
        return size[0] // self.reduction, size[1] // self.reduction

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Fused dense feature map ``[B, D, H / r, W / r]`` (Eq. 13), ``r`` = the finest layer's stride."""
        maps = self.layer_maps(images)
        size = self.grid(images.shape[-2:])
        return torch.cat(
            [w * F.interpolate(m, size=size, mode="bilinear", align_corners=False) for w, m in zip(self.layer_weights, maps, strict=True)],
            dim=1,
        )

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """One vector ``f_i = Phi(p_i)`` per patch ``[N, 3, p, p]`` (Eq. 6): the fused map, average-pooled."""
        return self(patches).mean(dim=(2, 3))


def feature_distance_map(
    embedder: FeatureEmbedder,
    images: torch.Tensor,
    reconstruction: torch.Tensor,
    image_maps: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean over layers of ``1 - cos(Phi_l(x), Phi_l(x_hat))``, upsampled to ``[B, 1, H, W]``.

    ``image_maps``: ``Phi``'s layer maps of the inputs, computed once; a reconstruction batch that is ``n``
    times longer (several noise levels of the same images, level-major) is compared with ``n`` copies.
    """
    size = images.shape[-2:]
    if image_maps is None:
        image_maps = embedder.layer_maps(images)
    copies = reconstruction.shape[0] // image_maps[0].shape[0]
    distances = [
        F.interpolate(1 - F.cosine_similarity(a.repeat(copies, 1, 1, 1), b, dim=1).unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        for a, b in zip(image_maps, embedder.layer_maps(reconstruction), strict=True)
    ]
    return torch.stack(distances).mean(dim=0)
