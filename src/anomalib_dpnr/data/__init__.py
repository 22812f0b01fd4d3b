"""Data helpers: the ``MVTec`` alias, the multi-category ``MVTecMultiClass`` and a generated demo dataset."""

from .multi_class import CategoryMetrics, MVTecMultiClass
from .mvtec import MVTec
from .synthetic_dataset import make_synthetic_dataset

__all__ = ["CategoryMetrics", "MVTec", "MVTecMultiClass", "make_synthetic_dataset"]
