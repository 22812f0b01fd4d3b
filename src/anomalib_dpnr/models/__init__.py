"""Models of anomalib-dpnr."""

from .diffusion_ad import DiffusionAD
from .dpnr import Dpnr

__all__ = ["DiffusionAD", "Dpnr"]
