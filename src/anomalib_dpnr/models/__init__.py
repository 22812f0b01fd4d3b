"""Models of anomalib-dpnr."""

from .diffusion_ad import DiffusionAD

__all__ = ["DiffusionAD"]
