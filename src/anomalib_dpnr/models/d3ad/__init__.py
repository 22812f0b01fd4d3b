"""D3AD: dynamic addition of noise (with DDAD as its fixed-step configuration)."""

from .lightning_model import D3AD
from .torch_model import D3ADModel

__all__ = ["D3AD", "D3ADModel"]
