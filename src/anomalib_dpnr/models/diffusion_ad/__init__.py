"""DiffusionAD."""

from .lightning_model import DiffusionAD
from .torch_model import DiffusionADModel

__all__ = ["DiffusionAD", "DiffusionADModel"]
