"""Dual-Prototype guided Structured Noise Injection, DP-SNI (DPNR Sec. 3, Eqs. 13-21)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_dpnr.components.diffusion import gaussian_noise
from anomalib_dpnr.components.processing import gaussian_blur
from anomalib_dpnr.components.prototypes import DynamicShapeMixin

__all__ = ["DPSNI", "MatchOutput", "NoiseParameterizer", "NoiseParameters", "PrototypeMatcher", "StructuredNoise"]


class MatchOutput(NamedTuple):
    """Prototype matcher outputs (Eq. 14), all per patch on the feature grid."""

    background: torch.Tensor  # f_bg [B, D, h, w]
    foreground: torch.Tensor  # f_fg [B, D, h, w]
    background_attention: torch.Tensor  # A_bg [B, 1, h, w]
    foreground_attention: torch.Tensor  # A_fg [B, 1, h, w]


class NoiseParameters(NamedTuple):
    """What DP-SNI computes from an image before sampling (Eqs. 14-16), on the feature grid ``h, w``."""

    foreground_attention: torch.Tensor  # A_fg [B, 1, h, w]
    background: tuple[torch.Tensor, torch.Tensor]  # (mu_bg, log sigma_bg^2) [B, C, h, w]
    foreground: tuple[torch.Tensor, torch.Tensor]  # (mu_fg, log sigma_fg^2) [B, C, h, w]


class StructuredNoise(NamedTuple):
    """DP-SNI output: the noise ``eps_s``, the smoothed foreground mask used to blend it, and what trains it."""

    noise: torch.Tensor  # [B, C, H, W]
    mask: torch.Tensor  # M_smooth [B, 1, H, W]
    parameters: NoiseParameters
    kl: torch.Tensor  # [B] mean KL(N(mu, sigma^2) || N(0, 1)) of both parameterizers (Eqs. 15-18)

    @property
    def foreground_attention(self) -> torch.Tensor:
        """``A_fg`` ``[B, 1, h, w]``."""
        return self.parameters.foreground_attention


class PrototypeMatcher(DynamicShapeMixin, nn.Module):
    """``H(F, P_bg, P_fg)`` (Eq. 14): attention of every patch feature over both prototype sets.

    Learnable prototypes ``P_bg``/``P_fg`` are initialised from the repository (their number is
    data-dependent; checkpoints resize them on load). Each patch attends jointly over all
    prototypes; ``A_fg`` is its attention mass on foreground prototypes and ``f_bg``/``f_fg`` are
    the attention-weighted prototypes of each set.

    Args:
        feature_dim: Feature width ``D``.
        attention_dim: Query/key width.
    """

    def __init__(self, feature_dim: int, attention_dim: int = 64) -> None:
        super().__init__()
        self.query = nn.Conv2d(feature_dim, attention_dim, 1)
        self.key = nn.Linear(feature_dim, attention_dim)
        self.background_prototypes = nn.Parameter(torch.empty(0, feature_dim))
        self.foreground_prototypes = nn.Parameter(torch.empty(0, feature_dim))

    @property
    def is_initialised(self) -> bool:
        """Whether both prototype sets are non-empty."""
        return self.background_prototypes.numel() > 0 and self.foreground_prototypes.numel() > 0

    def initialise(self, background: torch.Tensor, foreground: torch.Tensor) -> None:
        """Start the learnable prototypes from the repository's ``M_bg`` and ``M_fg``."""
        for parameter, value in ((self.background_prototypes, background), (self.foreground_prototypes, foreground)):
            parameter.data = value.detach().clone().to(parameter.device, parameter.dtype)

    def forward(self, features: torch.Tensor) -> MatchOutput:
        """Match ``[B, D, h, w]`` patch features against ``P_bg`` and ``P_fg``."""
        if not self.is_initialised:
            msg = "DPNR prototype matcher has no prototypes: build the repository first (Dpnr does this at fit start)"
            raise RuntimeError(msg)
        batch, _, height, width = features.shape
        prototypes = torch.cat([self.background_prototypes, self.foreground_prototypes])
        queries = self.query(features).flatten(2).transpose(1, 2)  # [B, N, d]
        keys = self.key(prototypes)  # [M, d]
        attention = torch.softmax(queries @ keys.T / math.sqrt(keys.shape[1]), dim=-1)  # [B, N, M]
        split = self.background_prototypes.shape[0]
        maps = []
        for part, bank in ((attention[..., :split], self.background_prototypes), (attention[..., split:], self.foreground_prototypes)):
            mass = part.sum(-1, keepdim=True)
            feature = (part / mass.clamp_min(1e-8)) @ bank  # [B, N, D]
            maps.append((feature, mass))
        (f_bg, a_bg), (f_fg, a_fg) = maps

        def grid(values: torch.Tensor) -> torch.Tensor:
            return values.transpose(1, 2).reshape(batch, -1, height, width)

        return MatchOutput(grid(f_bg), grid(f_fg), grid(a_bg), grid(a_fg))


class NoiseParameterizer(nn.Module):
    """``Psi``: features to ``(mu, log sigma^2)`` of a per-position Gaussian (Eqs. 15-16).

    The last layer starts small (std ``1e-2``, zero bias), so training begins near ``mu = 0, sigma = 1``
    while every layer already receives gradient.

    Args:
        feature_dim: Input width ``D``.
        channels: Noise channels (latent channels).
        hidden: Hidden width.
    """

    def __init__(self, feature_dim: int, channels: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(feature_dim, hidden, 3, padding=1), nn.SiLU(), nn.Conv2d(hidden, 2 * channels, 1))
        nn.init.normal_(self.net[-1].weight, std=1e-2)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mu, log_variance)``, each ``[B, C, h, w]``."""
        mean, log_variance = self.net(features).chunk(2, dim=1)
        return mean, log_variance


class DPSNI(nn.Module):
    """Content-aware structured noise ``eps_s`` from a normal image's features (Eqs. 14-21).

    Args:
        feature_dim: Feature width ``D`` of ``Phi``.
        channels: Noise channels (latent channels).
        attention_dim: Prototype-matcher query/key width.
        hidden: Noise-parameterizer hidden width.
        noise_scale: ``C`` in ``eps_base = C tanh(mu + z sigma)`` (Eq. 19).
        foreground_weight: ``w_fg``, intensity of the foreground noise (Eq. 21).
        mask_sigma: Gaussian sigma of ``G_blur`` on the foreground mask, in latent pixels (Eq. 20).
    """

    def __init__(
        self,
        feature_dim: int,
        channels: int,
        attention_dim: int = 64,
        hidden: int = 64,
        noise_scale: float = 1.6,
        foreground_weight: float = 1.0,
        mask_sigma: float = 2.0,
    ) -> None:
        super().__init__()
        self.matcher = PrototypeMatcher(feature_dim, attention_dim)
        self.background_parameterizer = NoiseParameterizer(feature_dim, channels, hidden)
        self.foreground_parameterizer = NoiseParameterizer(feature_dim, channels, hidden)
        self.channels = channels
        self.noise_scale = noise_scale
        self.foreground_weight = foreground_weight
        self.mask_blur = gaussian_blur(mask_sigma)

    @staticmethod
    def kl_divergence(mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
        """Per-sample mean ``KL(N(mu, sigma^2) || N(0, 1))``: keeps the reparameterised bases (Eq. 18) noise."""
        return 0.5 * (mean.pow(2) + log_variance.exp() - 1 - log_variance).flatten(1).mean(dim=1)

    def noise_base(self, mean: torch.Tensor, log_variance: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
        """``eps_base = C tanh(mu + z sigma)`` with ``sigma = exp(0.5 log sigma^2)`` (Eqs. 17-19)."""
        return self.noise_scale * torch.tanh(mean + normal * torch.exp(0.5 * log_variance))

    def blend(self, background: torch.Tensor, foreground: torch.Tensor, foreground_attention: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Spatially-aware blending (Eqs. 20-21): bicubic bases mixed by the smoothed foreground mask."""
        mask = self.mask_blur(F.interpolate(foreground_attention, size=size, mode="bilinear", align_corners=False))
        up_bg = F.interpolate(background, size=size, mode="bicubic", align_corners=False)
        up_fg = F.interpolate(foreground, size=size, mode="bicubic", align_corners=False)
        return (1 - mask) * up_bg + self.foreground_weight * mask * up_fg, mask

    def parameterize(self, features: torch.Tensor) -> NoiseParameters:
        """Match the features against the prototypes (Eq. 14) and parameterise both noise bases (Eqs. 15-16)."""
        match = self.matcher(features)
        return NoiseParameters(
            match.foreground_attention,
            self.background_parameterizer(match.background),
            self.foreground_parameterizer(match.foreground),
        )

    def sample(self, parameters: NoiseParameters, size: tuple[int, int], generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised bases (Eqs. 17-19) blended at latent ``size`` (Eqs. 20-21): ``(eps_s, M_smooth)``.

        With a ``generator``, ``z`` is drawn once and shared by the batch (reproducible, batch-independent).
        """
        bases = [self.noise_base(mean, log_variance, gaussian_noise(mean, generator)) for mean, log_variance in (parameters.background, parameters.foreground)]
        return self.blend(bases[0], bases[1], parameters.foreground_attention, size)

    def forward(self, features: torch.Tensor, size: tuple[int, int], generator: torch.Generator | None = None) -> StructuredNoise:
        """Structured noise at latent ``size`` for the images whose ``Phi`` features are ``features``."""
        parameters = self.parameterize(features)
        noise, mask = self.sample(parameters, size, generator)
        kl = sum(self.kl_divergence(*pair) for pair in (parameters.background, parameters.foreground)) / 2
        return StructuredNoise(noise, mask, parameters, kl)
