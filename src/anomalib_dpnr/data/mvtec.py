"""``MVTec``: the short name users type, as a subclass of anomalib 2.7's ``MVTecAD``."""

from __future__ import annotations

from anomalib.data import MVTecAD

__all__ = ["MVTec"]


class MVTec(MVTecAD):
    """Alias of :class:`anomalib.data.MVTecAD` so ``--data MVTec`` resolves once this package is imported.

    jsonargparse resolves short names among classes already imported, so ``--model anomalib_dpnr.X``
    must come before ``--data MVTec`` on the command line.
    """
