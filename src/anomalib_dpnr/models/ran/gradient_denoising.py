"""RAN's gradient denoising reconstruction (Lu et al., Sec. 3.3, Algorithm 1, Eqs. 12-13).

A PaDiM Gaussian ``N(mu, Sigma)`` per feature location, fitted on the training images' backbone features (anomalib's
PaDiM blocks: the layer embedding with a random channel subset, ``MultiVariateGaussian`` with ``+0.01 I``), gives the
Mahalanobis loss ``L = (f - mu)^T Sigma^-1 (f - mu)`` (Eq. 12). Algorithm 1 moves the image along the normalised
negative gradient as if it were forward-process noise, ``x <- sqrt(1 - beta) x + sqrt(beta) g``, and every ``N_d``
iterations takes one reverse step of the diffusion model, which removes the noise the gradient brings in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from anomalib.models.components import MultiVariateGaussian
from anomalib.models.image.padim.torch_model import PadimModel
from torch import nn

__all__ = ["MahalanobisGuide", "gradient_denoise"]


class MahalanobisGuide(nn.Module):
    """PaDiM's Gaussian over ``layers`` of a backbone, reduced to ``n_features`` random channels.

    Args:
        layers: Backbone layers of the embedding (the first sets the grid; reference: WRN50-2 layers 1-3).
        channels: Channels of each layer.
        n_features: Random channels kept (reference: 500 of WRN50-2's 1792).
        seed: Seed of the random channel choice.
    """

    def __init__(self, layers: Sequence[str], channels: Sequence[int], n_features: int, seed: int = 0) -> None:
        super().__init__()
        total = int(sum(channels))
        if not 0 < n_features <= total:
            msg = f"guidance_features must lie in [1, {total}] (the guidance layers' channels), got {n_features}"
            raise ValueError(msg)
        self.layers = list(layers)
        self.register_buffer("idx", torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n_features])
        self.gaussian = MultiVariateGaussian()  # mean [C, HW], inv_covariance [HW, C, C]: shapes from data

    @property
    def is_fitted(self) -> bool:
        """Whether the Gaussian has been fitted."""
        return self.gaussian.mean.numel() > 0

    def embedding(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """PaDiM embedding ``[B, n_features, h, w]`` of the guidance layers' maps (anomalib's ``generate_embedding``)."""
        return PadimModel.generate_embedding(self, dict(zip(self.layers, maps, strict=True)))  # type: ignore[arg-type]

    def fit(self, embeddings: torch.Tensor) -> None:
        """Fit the Gaussian to ``[N, n_features, h, w]`` training embeddings."""
        if embeddings.shape[0] < 2:
            msg = f"the guidance Gaussian needs at least 2 training images, got {embeddings.shape[0]}"
            raise ValueError(msg)
        self.gaussian.fit(embeddings.float())

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance per location (Eq. 12): ``[B, h, w]``."""
        if not self.is_fitted:
            msg = "Ran: the gradient-denoising Gaussian is not fitted; fit the model or load a checkpoint"
            raise RuntimeError(msg)
        batch, channels, height, width = embedding.shape
        delta = (embedding.float().reshape(batch, channels, height * width) - self.gaussian.mean).permute(2, 0, 1)
        distances = (torch.matmul(delta, self.gaussian.inv_covariance) * delta).sum(dim=2)  # [hw, B]
        return distances.transpose(0, 1).reshape(batch, height, width)


def gradient_denoise(
    images: torch.Tensor,
    loss: Callable[[torch.Tensor], torch.Tensor],
    denoise: Callable[[torch.Tensor], torch.Tensor],
    iterations: int,
    beta: float,
    denoise_every: int,
) -> torch.Tensor:
    """Algorithm 1: ``iterations`` gradient updates of ``images`` with a reverse diffusion step every ``denoise_every``.

    Args:
        images: ``[B, 3, H, W]`` images in ``[-1, 1]``.
        loss: Per-image loss ``[B]`` to descend (the mean Mahalanobis distance, Eq. 12), differentiable in the images.
        denoise: One sample of ``p_theta(x_{t-1} | x_t)`` at the guidance step.
        iterations: ``N``.
        beta: ``beta_hat`` of the guidance step.
        denoise_every: ``N_d``.

    Returns:
        The reconstruction ``x_N``, clamped to ``[-1, 1]``, without gradient.
    """
    x = images.detach().clone()
    for step in range(1, iterations + 1):
        x.requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss(x).sum(), x)
        gradient = -gradient
        gradient = gradient / gradient.flatten(1).std(dim=1).clamp_min(1e-12).reshape(-1, 1, 1, 1)
        x = ((1 - beta) ** 0.5 * x + beta**0.5 * gradient).detach()  # the normalised gradient as forward noise
        if step % denoise_every == 0:
            x = denoise(x).detach()
    return x.clamp(-1, 1)
