"""D3AD / DDAD training objectives."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

__all__ = ["DenoisingLoss", "DomainAdaptationLoss", "cosine_distance"]


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over batch and positions of ``1 - cos`` along channels of two ``[B, C, H, W]`` feature maps."""
    return (1 - F.cosine_similarity(a, b, dim=1)).mean()


class DenoisingLoss(nn.Module):
    """``||eps - eps_theta(x_t, t)||^2`` (DDPM simple loss; D3AD and DDAD train the denoiser with it)."""

    def forward(self, noise: torch.Tensor, predicted: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{"loss": mse}``."""
        return {"loss": F.mse_loss(predicted, noise)}


class DomainAdaptationLoss(nn.Module):
    """Feature consistency for the backbone copy ``F`` (D3AD; DDAD Eq. 8).

    ``sum_l 1 - cos(F_l(x_hat), F_l(x))`` makes reconstruction and input look alike to ``F``; with
    ``frozen_weight > 0`` DDAD's term ``lambda * sum_l [(1 - cos(F_l(x), F0_l(x))) + (1 - cos(F_l(x_hat),
    F0_l(x_hat)))]`` keeps ``F`` close to the frozen copy ``F0`` (DDAD: lambda = 0.1; D3AD: off).

    Args:
        frozen_weight: ``lambda`` of the frozen-copy term (0 disables it).
    """

    def __init__(self, frozen_weight: float = 0.0) -> None:
        super().__init__()
        if frozen_weight < 0:
            msg = f"frozen_weight must be >= 0, got {frozen_weight}"
            raise ValueError(msg)
        self.frozen_weight = frozen_weight

    def forward(
        self,
        adapted_input: list[torch.Tensor],
        adapted_reconstruction: list[torch.Tensor],
        frozen_input: list[torch.Tensor] | None = None,
        frozen_reconstruction: list[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-layer feature lists of input and reconstruction; the frozen ones are needed when ``frozen_weight > 0``."""
        pairs = zip(adapted_reconstruction, adapted_input, strict=True)
        consistency = torch.stack([cosine_distance(r, x) for r, x in pairs]).sum()
        losses = {"consistency": consistency}
        total = consistency
        if self.frozen_weight > 0:
            if frozen_input is None or frozen_reconstruction is None:
                msg = "DomainAdaptationLoss with frozen_weight > 0 needs the frozen backbone's features"
                raise ValueError(msg)
            frozen = sum(
                cosine_distance(a, f)
                for a, f in zip([*adapted_input, *adapted_reconstruction], [*frozen_input, *frozen_reconstruction], strict=True)
            )
            losses["frozen"] = frozen
            total = total + self.frozen_weight * frozen
        return {**losses, "loss": total}
