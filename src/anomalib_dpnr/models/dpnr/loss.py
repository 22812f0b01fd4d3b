"""Region-adaptive Hybrid Noise loss, RHN-Loss (DPNR Eqs. 22-28), and the standard epsilon loss."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

__all__ = ["EpsilonLoss", "InjectionLoss", "RHNLoss"]


class RHNLoss(nn.Module):
    """``E[clamp(w(t)) * mean((s(a) L_struct + (1 - s(a)) L_eps) * (s(b) M + c (1 - M)))]`` (Eq. 28).

    * ``L_eps = ||eps_theta - eps||^2`` (Eq. 22), ``eps`` = the ideal noise (see ``DpnrModel``);
    * ``L_struct = ||eps_theta - eps_s||^2 / (2 Var(eps_s))`` (Eq. 23), variance per sample;
    * ``s(alpha)`` learnable blend (Eq. 24); ``s(beta) M + c (1 - M)`` learnable spatial weight
      with ``M`` the defect mask; ``w(t) = SNR(t)`` clamped at ``snr_clamp`` (Eqs. 26-27).

    Args:
        alpha: Initial blend logit ``alpha`` (0 = equal blend).
        beta: Initial foreground-weight logit ``beta``.
        background_weight: ``c``, weight of the region outside ``M``.
        snr_clamp: Upper bound of ``w(t)``.
        learnable: Train ``alpha`` and ``beta`` (paper) or keep them fixed.
    """

    def __init__(
        self,
        alpha: float = 0.0,
        beta: float = 0.0,
        background_weight: float = 4.0,
        snr_clamp: float = 5.0,
        learnable: bool = True,
    ) -> None:
        super().__init__()
        if snr_clamp <= 0 or background_weight < 0:
            msg = f"need snr_clamp > 0 and background_weight >= 0, got {snr_clamp}, {background_weight}"
            raise ValueError(msg)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)), requires_grad=learnable)
        self.beta = nn.Parameter(torch.tensor(float(beta)), requires_grad=learnable)
        self.background_weight = background_weight
        self.snr_clamp = snr_clamp

    def timestep_weight(self, snr: torch.Tensor) -> torch.Tensor:
        """``clamp(w(t))`` with ``w(t) = SNR(t)`` (Eqs. 26-27)."""
        return snr.clamp(max=self.snr_clamp)

    def forward(
        self,
        predicted: torch.Tensor,
        structured: torch.Tensor,
        ideal: torch.Tensor,
        mask: torch.Tensor,
        snr: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for ``[B, C, H, W]`` predictions, targets, ``[B, 1, H, W]`` mask and ``[B]`` SNR."""
        variance = structured.detach().flatten(1).var(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
        struct = (predicted - structured).pow(2) / (2 * variance)
        eps = (predicted - ideal).pow(2)
        blend = torch.sigmoid(self.alpha)
        hybrid = blend * struct + (1 - blend) * eps
        spatial = torch.sigmoid(self.beta) * mask + self.background_weight * (1 - mask)
        per_sample = (hybrid * spatial).mean(dim=(1, 2, 3))
        loss = (self.timestep_weight(snr) * per_sample).mean()
        return {
            "loss": loss,
            "struct": struct.mean().detach(),
            "eps": eps.mean().detach(),
            "blend": blend.detach(),
            "foreground_weight": torch.sigmoid(self.beta).detach(),
        }


class EpsilonLoss(nn.Module):
    """The standard diffusion loss ``||eps_theta - eta||^2`` on the injected noise (Table 2 ablation)."""

    def forward(
        self,
        predicted: torch.Tensor,
        structured: torch.Tensor,
        ideal: torch.Tensor,
        mask: torch.Tensor,
        snr: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Same signature as ``RHNLoss``; only ``predicted`` and ``structured`` are used."""
        del ideal, mask, snr
        loss = (predicted - structured).pow(2).mean()
        return {"loss": loss, "eps": loss.detach()}


class InjectionLoss(nn.Module):
    """What trains DP-SNI once the denoiser's loss no longer reaches it (``detach_noise``).

    * ``kl_weight * KL(N(mu, sigma^2) || N(0, 1))`` of the noise parameterizers: the reparameterised
      bases (Eqs. 15-18) stay noise instead of collapsing to a predictable constant;
    * ``mask_weight * BCE(A_fg, M)``: the matcher's foreground attention (Eq. 14) learns where the
      synthetic defect ``M`` is, so foreground prototypes mark defect-like regions.

    Args:
        kl_weight: Weight of the KL term.
        mask_weight: Weight of the foreground-attention term.
    """

    def __init__(self, kl_weight: float = 1.0, mask_weight: float = 1.0) -> None:
        super().__init__()
        if kl_weight < 0 or mask_weight < 0:
            msg = f"need kl_weight >= 0 and mask_weight >= 0, got {kl_weight}, {mask_weight}"
            raise ValueError(msg)
        self.kl_weight = kl_weight
        self.mask_weight = mask_weight

    def forward(self, foreground_attention: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, 1, h, w]`` attention in ``[0, 1]``, ``[B]`` KL, ``[B, 1, H, W]`` defect mask (pooled to ``h, w``)."""
        target = F.adaptive_avg_pool2d(mask.float(), foreground_attention.shape[-2:])
        attention = foreground_attention.clamp(1e-6, 1 - 1e-6)
        bce = F.binary_cross_entropy(attention, target)
        kl = kl.mean()
        return {"loss": self.kl_weight * kl + self.mask_weight * bce, "kl": kl.detach(), "mask_bce": bce.detach()}
