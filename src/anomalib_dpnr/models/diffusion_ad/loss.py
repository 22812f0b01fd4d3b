"""DiffusionAD training loss: ``L_noise + SmoothL1(M, M_hat) + gamma * L_focal(M, M_hat)`` (Eqs. 6-8).

As in the reference code, ``L_noise`` counts only the anomaly-free images of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torchvision.ops import sigmoid_focal_loss

__all__ = ["DiffusionADLoss"]


class DiffusionADLoss(nn.Module):
    """Joint denoising + segmentation loss.

    Args:
        focal_weight: ``gamma`` of Eq. 7 weighting the focal term (paper: 5).
        focal_gamma: Focusing parameter of the focal loss itself (reference code: 4).
        focal_alpha: Class-balance weight of the focal loss (reference code: 0.5); negative disables it.
    """

    def __init__(self, focal_weight: float = 5.0, focal_gamma: float = 4.0, focal_alpha: float = 0.5) -> None:
        super().__init__()
        self.focal_weight = focal_weight
        self.focal_gamma = focal_gamma
        self.focal_alpha = focal_alpha

    def forward(
        self,
        noise: torch.Tensor,
        predicted_noise: torch.Tensor,
        mask: torch.Tensor,
        mask_logits: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Return the total loss and its terms (``loss``, ``noise``, ``smooth_l1``, ``focal``).

        ``noise``/``predicted_noise`` are ``[B, L, ...]`` (``L`` noise levels per image): each image's noise
        term is the sum over its levels of the MSE (Eq. 6), averaged over the images whose ``mask`` is all zero
        (anomaly-free); it is 0 for a batch without one.
        """
        if noise.ndim < 3 or noise.shape != predicted_noise.shape or mask.shape[0] != noise.shape[0]:
            msg = f"expected noise and predicted noise [B, L, ...] and masks [B, ...], got {tuple(noise.shape)}, "
            msg += f"{tuple(predicted_noise.shape)} and {tuple(mask.shape)}"
            raise ValueError(msg)
        per_image = (predicted_noise - noise).square().flatten(2).mean(dim=2).sum(dim=1)
        normal = (mask.flatten(1) == 0).all(dim=1).to(per_image.dtype)
        noise_loss = (per_image * normal).sum() / normal.sum().clamp(min=1)  # Eq. 6 on normal images
        smooth_l1 = F.smooth_l1_loss(torch.sigmoid(mask_logits), mask)
        focal = sigmoid_focal_loss(mask_logits, mask, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="mean")
        total = noise_loss + smooth_l1 + self.focal_weight * focal  # Eqs. 7-8
        return {"loss": total, "noise": noise_loss, "smooth_l1": smooth_l1, "focal": focal}
