"""RAN's training objective: improved DDPM's hybrid loss plus the feature loss (Lu et al., Eq. 10).

``L = ||eps - eps_theta(x_t, t)||^2 + vb_weight * T/1000 * L_vb + feature_weight * ||f(x_0) - f_theta(x_t)||^2``.
``L_vb`` is the per-step variational-bound term in bits (``kl_score.variational_terms``) computed with the predicted
mean frozen, so it trains only the variance channels (improved DDPM Sec. 3.1, ``L_hybrid = L_simple + lambda L_vb``
with lambda = 0.001 over the T-term sum, i.e. ``T/1000`` times the one sampled term).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from anomalib_dpnr.components import NoiseSchedule

from .kl_score import variational_terms
from .torch_model import RanOutput

__all__ = ["RanLoss"]


class RanLoss(nn.Module):
    """Hybrid eps-MSE + VB loss and feature MSE.

    Args:
        vb_weight: Weight of the VB term (1 = improved DDPM's hybrid loss).
        feature_weight: Weight of the feature MSE (reference: 1).
    """

    def __init__(self, vb_weight: float = 1.0, feature_weight: float = 1.0) -> None:
        super().__init__()
        if vb_weight < 0 or feature_weight < 0:
            msg = f"loss weights must be >= 0, got vb_weight={vb_weight}, feature_weight={feature_weight}"
            raise ValueError(msg)
        self.vb_weight = vb_weight
        self.feature_weight = feature_weight

    def forward(self, output: RanOutput, schedule: NoiseSchedule) -> dict[str, torch.Tensor]:
        """``{"mse", "vb", "feature", "loss"}`` of one training step."""
        mse = F.mse_loss(output.eps.float(), output.noise.float())
        vb = variational_terms(schedule, output.eps.detach(), output.variance, output.images, output.noisy, output.timesteps)
        vb = vb.flatten(1).mean(dim=1).mean() * (schedule.num_timesteps / 1000)
        feature = F.mse_loss(output.features.float(), output.target_features.float())
        return {"mse": mse, "vb": vb, "feature": feature, "loss": mse + self.vb_weight * vb + self.feature_weight * feature}
