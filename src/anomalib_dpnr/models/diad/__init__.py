"""DiAD: latent diffusion with the Semantic-Guided network and the Spatial-aware Feature Fusion block."""

from .lightning_model import DiAD
from .torch_model import DiADModel

__all__ = ["DiAD", "DiADModel"]
