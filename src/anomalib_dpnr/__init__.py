"""anomalib-dpnr: diffusion-based anomaly detection models for anomalib 2.x."""

from .data import MVTec
from .models import D3AD, DiffusionAD, Dpnr, Ran

__all__ = ["D3AD", "DiffusionAD", "Dpnr", "MVTec", "Ran"]
__version__ = "0.1.0"
