"""DiffusionAD training loss: ``L_noise + SmoothL1(M, M_hat) + gamma * L_focal(M, M_hat)`` (Eqs. 6-8)."""

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
        focal_gamma: Focusing parameter of the focal loss itself (Lin et al. default: 2).
        focal_alpha: Class-balance weight of the focal loss; negative disables it.
    """

    def __init__(self, focal_weight: float = 5.0, focal_gamma: float = 2.0, focal_alpha: float = -1.0) -> None:
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
        """Return the total loss and its terms (``loss``, ``noise``, ``smooth_l1``, ``focal``)."""
        noise_loss = F.mse_loss(predicted_noise, noise)  # Eq. 6
        smooth_l1 = F.smooth_l1_loss(torch.sigmoid(mask_logits), mask)
        focal = sigmoid_focal_loss(mask_logits, mask, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="mean")
        total = noise_loss + smooth_l1 + self.focal_weight * focal  # Eqs. 7-8
        return {"loss": total, "noise": noise_loss, "smooth_l1": smooth_l1, "focal": focal}
