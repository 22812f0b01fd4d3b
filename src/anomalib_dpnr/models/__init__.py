"""Models of anomalib-dpnr."""

from .d3ad import D3AD
from .diffusion_ad import DiffusionAD
from .dpnr import Dpnr
from .ran import Ran

__all__ = ["D3AD", "DiffusionAD", "Dpnr", "Ran"]
