"""RAN: Removing Anomalies as Noises (Lu et al., ICCV 2023)."""

from .lightning_model import Ran
from .torch_model import RanModel

__all__ = ["Ran", "RanModel"]
