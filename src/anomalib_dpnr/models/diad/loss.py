"""DiAD training objective."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

__all__ = ["DiADLoss"]


class DiADLoss(nn.Module):
    """``L_DiAD = ||eps - eps_theta(z_t, t, c, x_0)||^2`` (Eq. 6), the LDM loss with the SG network's input."""

    def forward(self, noise: torch.Tensor, predicted: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{"loss": mse}``."""
        return {"loss": F.mse_loss(predicted.float(), noise.float())}
