"""Data helpers: the ``MVTec`` alias and a generated MVTec-layout demo dataset."""

from .mvtec import MVTec
from .synthetic_dataset import make_synthetic_dataset

__all__ = ["MVTec", "make_synthetic_dataset"]
