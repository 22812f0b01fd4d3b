"""Region-adaptive Hybrid Noise loss, RHN-Loss (DPNR Eqs. 22-28), and the standard epsilon loss."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .dp_sni import NoiseParameters

__all__ = ["EpsilonLoss", "InjectionLoss", "RHNLoss", "gaussian_nll"]


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


def gaussian_nll(mean: torch.Tensor, log_variance: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean of ``0.5 (log sigma^2 + (u - mu)^2 / sigma^2)`` (the Gaussian NLL without its constant).

    ``mean``/``log_variance`` on a coarse grid are upsampled bilinearly to the target's ``[B, C, H, W]``;
    ``weight`` ``[B, 1, H, W]`` selects the pixels that count (0 when none does).
    """
    size = target.shape[-2:]
    mean = F.interpolate(mean, size=size, mode="bilinear", align_corners=False)
    log_variance = F.interpolate(log_variance, size=size, mode="bilinear", align_corners=False)
    nll = 0.5 * (log_variance + (target - mean).pow(2) * torch.exp(-log_variance))
    total = (weight * nll).sum()
    return total / (weight.sum() * target.shape[1]).clamp_min(1.0)


class InjectionLoss(nn.Module):
    """What trains DP-SNI once the denoiser's loss no longer reaches it (``detach_noise``).

    * ``nll_weight * NLL``: each parameterizer is the Gaussian whose reparameterised, ``C tanh``-squashed
      sample (Eqs. 15-19) imitates real noise of the image it sees: ``Psi_bg`` the latent's high-frequency
      residual outside the synthetic defect, ``Psi_fg`` the defect's structure ``z_a - z_s`` inside it (the
      noise the repository's background and foreground prototypes were built from), each scaled to unit
      variance per image and mapped back through the squashing, ``u = atanh(r / C)``;
    * ``mask_weight * BCE(A_fg, M)``: the matcher's foreground attention (Eq. 14), computed on the image
      that carries the synthetic defect, learns where the defect ``M`` is;
    * ``kl_weight * KL(N(mu, sigma^2) || N(0, 1))``: a prior that keeps the bases close to the paper's
      ``C tanh(z)`` noise (``Dpnr``'s default weight 1, chosen on validation data) and against collapse when
      DP-SNI is trained end to end (``detach_noise: false``).

    Args:
        noise_scale: ``C`` of Eq. 19 (the model's ``noise_scale``).
        nll_weight: Weight of the NLL term.
        mask_weight: Weight of the foreground-attention term.
        kl_weight: Weight of the KL term.
        max_ratio: ``|r / C|`` is clipped here before ``atanh``.
    """

    def __init__(self, noise_scale: float = 1.6, nll_weight: float = 1.0, mask_weight: float = 1.0, kl_weight: float = 0.0, max_ratio: float = 0.99) -> None:
        super().__init__()
        if min(nll_weight, kl_weight, mask_weight) < 0 or noise_scale <= 0 or not 0 < max_ratio < 1:
            msg = (
                "need noise_scale > 0, nll_weight, kl_weight, mask_weight >= 0 and 0 < max_ratio < 1, got "
                f"{noise_scale}, {nll_weight}, {kl_weight}, {mask_weight}, {max_ratio}"
            )
            raise ValueError(msg)
        self.noise_scale = noise_scale
        self.nll_weight = nll_weight
        self.mask_weight = mask_weight
        self.kl_weight = kl_weight
        self.max_ratio = max_ratio

    def squashed(self, noise: torch.Tensor) -> torch.Tensor:
        """``atanh(r / C)``: real noise in the space where Eq. 19 samples its Gaussian."""
        return torch.atanh((noise / self.noise_scale).clamp(-self.max_ratio, self.max_ratio))

    def forward(
        self,
        parameters: NoiseParameters,
        kl: torch.Tensor,
        background_noise: torch.Tensor,
        foreground_noise: torch.Tensor,
        mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """DP-SNI's ``parameters`` and ``[B]`` KL, real noise ``[B, C, H, W]`` and the defect mask ``[B, 1, H, W]``."""
        attention = parameters.foreground_attention
        target = F.adaptive_avg_pool2d(mask.float(), attention.shape[-2:])
        bce = F.binary_cross_entropy(attention.clamp(1e-6, 1 - 1e-6), target)
        nll = (
            gaussian_nll(*parameters.background, self.squashed(background_noise), 1 - mask)
            + gaussian_nll(*parameters.foreground, self.squashed(foreground_noise), mask)
        )
        kl = kl.mean()
        loss = self.nll_weight * nll + self.mask_weight * bce + self.kl_weight * kl
        return {"loss": loss, "nll": nll.detach(), "mask_bce": bce.detach(), "kl": kl.detach()}
