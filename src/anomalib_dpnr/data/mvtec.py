"""``MVTec``: the short name users type, as a subclass of anomalib 2.7's ``MVTecAD``."""

from __future__ import annotations

from pathlib import Path

from anomalib.data import MVTecAD

__all__ = ["MVTec"]


class MVTec(MVTecAD):
    """Alias of :class:`anomalib.data.MVTecAD` so ``--data MVTec`` resolves once this package is imported.

    jsonargparse resolves short names among classes already imported, so ``--model anomalib_dpnr.X``
    must come before ``--data MVTec`` on the command line. Unlike ``MVTecAD`` it never downloads: a
    missing ``<root>/<category>`` folder is an error naming it (``MVTecAD`` would try the network).
    """

    def prepare_data(self) -> None:
        """Check the category folder exists instead of downloading MVTec AD."""
        folder = Path(self.root) / self.category
        if not folder.is_dir():
            msg = (
                f"dataset folder not found: {folder} (expected MVTec layout <root>/<category>/train/good/*.png; "
                "check --data.root and --data.category)"
            )
            raise FileNotFoundError(msg)
