"""The Dual-Prototype Noise Repository (DPNR Sec. 3, Eqs. 6-9).

Where noise patches come from is not specified by the paper; our (swappable) sources:

* foreground noise ``D_fg``: the structure a synthetic defect adds to a normal image
  (``x_anomalous - x``, Perlin-shaped, from ``SyntheticAnomalyGenerator``), patches inside the mask;
* background noise ``D_bg``: high-frequency residuals of normal images (``x - blur(x)``), patches
  outside any synthetic defect.

Each patch is embedded by ``Phi`` (Eq. 6), clustered into ``K`` K-Means prototypes (Eq. 7) and
near-duplicates above cosine ``tau`` are merged (Eqs. 8-9), separately per set.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_dpnr.components.processing import gaussian_blur
from anomalib_dpnr.components.prototypes import PrototypeMemory

__all__ = ["DualPrototypeRepository", "NoisePatches", "extract_patches", "high_frequency_residual"]


class NoisePatches(NamedTuple):
    """Foreground and background noise patches ``[N, C, p, p]``."""

    foreground: torch.Tensor
    background: torch.Tensor


def high_frequency_residual(images: torch.Tensor, blur: nn.Module) -> torch.Tensor:
    """``x - G(x)``: the fine texture and sensor noise of an image."""
    return images - blur(images)


def extract_patches(images: torch.Tensor, masks: torch.Tensor, patch_size: int, min_coverage: float, inside: bool) -> torch.Tensor:
    """Non-overlapping ``patch_size`` patches whose mask coverage is ``>= min_coverage`` (``inside``) or zero."""
    if images.shape[-1] < patch_size or images.shape[-2] < patch_size:
        msg = f"patch_size {patch_size} is larger than the images ({tuple(images.shape[-2:])})"
        raise ValueError(msg)
    channels = images.shape[1]
    patches = F.unfold(images, patch_size, stride=patch_size).transpose(1, 2).reshape(-1, channels, patch_size, patch_size)
    coverage = F.avg_pool2d(masks.float(), patch_size, stride=patch_size).flatten()
    keep = coverage >= min_coverage if inside else coverage == 0
    return patches[keep]


class DualPrototypeRepository(nn.Module):
    """Foreground and background prototype memories ``M_fg`` and ``M_bg``.

    Args:
        num_prototypes: ``K`` initial K-Means prototypes per set.
        merge_threshold: Cosine similarity ``tau`` above which prototypes merge.
        patch_size: Side of a noise patch in pixels.
        min_coverage: Share of a foreground patch the synthetic defect must cover.
        residual_sigma: Gaussian sigma of the blur whose residual is background noise.
        seed: K-Means seed.
    """

    def __init__(
        self,
        num_prototypes: int = 16,
        merge_threshold: float = 0.95,
        patch_size: int = 32,
        min_coverage: float = 0.25,
        residual_sigma: float = 2.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.foreground = PrototypeMemory(num_prototypes, merge_threshold, seed)
        self.background = PrototypeMemory(num_prototypes, merge_threshold, seed)
        self.patch_size = patch_size
        self.min_coverage = min_coverage
        self.blur = gaussian_blur(residual_sigma, channels=3)

    @property
    def is_fitted(self) -> bool:
        """Whether both memories hold prototypes."""
        return self.foreground.is_fitted and self.background.is_fitted

    def noise_patches(self, images: torch.Tensor, anomalous: torch.Tensor, masks: torch.Tensor) -> NoisePatches:
        """Noise patches of a batch of ``[-1, 1]`` normal images and their synthetic-anomaly versions."""
        masks = masks.reshape(images.shape[0], 1, *images.shape[-2:])
        foreground = extract_patches(anomalous - images, masks, self.patch_size, self.min_coverage, inside=True)
        residual = high_frequency_residual(images, self.blur)
        background = extract_patches(residual, masks, self.patch_size, self.min_coverage, inside=False)
        return NoisePatches(foreground, background)

    def fit(self, foreground_features: torch.Tensor, background_features: torch.Tensor) -> None:
        """Build both memories from embedded patches ``[N, D]``."""
        for name, features in (("foreground", foreground_features), ("background", background_features)):
            if features.shape[0] == 0:
                msg = (
                    f"DPNR repository: no {name} noise patches were found; use more training images, "
                    "a smaller repository_patch_size or a lower repository_min_coverage"
                )
                raise ValueError(msg)
        self.foreground.fit(foreground_features)
        self.background.fit(background_features)
