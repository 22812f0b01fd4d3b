"""DPNR: dual-prototype noise repository."""

from .lightning_model import Dpnr
from .torch_model import DpnrModel

__all__ = ["Dpnr", "DpnrModel"]
