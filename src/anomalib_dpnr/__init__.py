"""anomalib-dpnr: diffusion-based anomaly detection models for anomalib 2.x."""

from .data import MVTec
from .models import DiffusionAD, Dpnr

__all__ = ["DiffusionAD", "Dpnr", "MVTec"]
__version__ = "0.1.0"
