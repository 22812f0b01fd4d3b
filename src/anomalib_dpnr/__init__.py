"""anomalib-dpnr: diffusion-based anomaly detection models for anomalib 2.x."""

from .data import MVTec
from .models import D3AD, DiAD, DiffusionAD, Dpnr, Ran

__all__ = ["D3AD", "DiAD", "DiffusionAD", "Dpnr", "MVTec", "Ran"]
__version__ = "0.1.0"
