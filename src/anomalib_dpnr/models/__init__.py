"""Models of anomalib-dpnr."""

from .d3ad import D3AD
from .diad import DiAD
from .diffusion_ad import DiffusionAD
from .dpnr import Dpnr
from .ran import Ran

__all__ = ["D3AD", "DiAD", "DiffusionAD", "Dpnr", "Ran"]
