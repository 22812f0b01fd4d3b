"""Checkpoint safety: clear errors for unreadable or foreign checkpoints, and a save on interrupt.

* ``check_checkpoint_file``: a missing, empty or truncated file is named as such instead of torch's
  ``PytorchStreamReader failed reading zip archive``.
* ``check_checkpoint_model``: a checkpoint written by another model is named (with the model that wrote
  it) instead of a ``size mismatch`` / ``Missing key(s)`` dump, or a constructor fed the other model's arguments.
* ``CheckedCheckpointIO``: Lightning's checkpoint IO with the file check in front, so ``--ckpt_path``
  fails the same way.
* ``SaveOnInterrupt``: Lightning saves nothing on Ctrl-C (``KeyboardInterrupt``) or SIGTERM, and
  anomalib's ``ModelCheckpoint`` only saves after validation; this callback writes
  ``interrupted.ckpt`` next to the regular checkpoints so an interrupted run keeps its work.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.io import CheckpointIO

__all__ = [
    "MODEL_KEY",
    "CheckedCheckpointIO",
    "CheckpointError",
    "SaveOnInterrupt",
    "check_checkpoint_file",
    "check_checkpoint_model",
]

logger = logging.getLogger(__name__)

# Checkpoint entry naming the anomalib-dpnr model class that wrote it.
MODEL_KEY = "anomalib_dpnr_model"
INTERRUPTED = "interrupted.ckpt"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used by this model; the message says why."""


def check_checkpoint_file(path: str | Path) -> None:
    """Fail clearly on a missing, empty or truncated (not a complete zip archive) ``torch.save`` file."""
    path = Path(path)
    if not path.is_file():
        msg = f"checkpoint file not found: {path}"
        raise CheckpointError(msg)
    if not zipfile.is_zipfile(path):
        msg = (
            f"checkpoint {path} is truncated or corrupt ({path.stat().st_size} bytes, not a complete torch.save "
            "archive); was the run killed while saving? Use an earlier checkpoint or retrain"
        )
        raise CheckpointError(msg)


def check_checkpoint_model(checkpoint: dict[str, Any], expected: str, own_keys: set[str] | None = None) -> None:
    """Fail clearly when ``checkpoint`` was written by another model than ``expected``.

    Checkpoints of this package name their model (``MODEL_KEY``); for others (anomalib's own models,
    older files) the weight names are compared with ``own_keys``.
    """
    saved = checkpoint.get(MODEL_KEY)
    if saved is not None and saved != expected:
        msg = (
            f"this checkpoint was saved by {saved}, not {expected}: load it with anomalib_dpnr.{saved} "
            f"(--model anomalib_dpnr.{saved})"
        )
        raise CheckpointError(msg)
    state = checkpoint.get("state_dict")
    if saved is None and state is not None and own_keys is not None:
        missing = sorted(own_keys - set(state))
        if missing:
            msg = (
                f"this checkpoint does not fit {expected} (saved by another model?): {len(missing)} of its "
                f"{len(own_keys)} weights are missing, e.g. {missing[:3]}"
            )
            raise CheckpointError(msg)


class CheckedCheckpointIO(CheckpointIO):
    """Delegates to ``inner``; loading checks the file first (``check_checkpoint_file``)."""

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:  # noqa: ANN401
        """Save with the wrapped IO."""
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:  # noqa: ANN401
        """Check ``path``, then load with the wrapped IO."""
        check_checkpoint_file(path)
        return self.inner.load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:  # noqa: ANN401
        """Remove with the wrapped IO."""
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        """Tear down the wrapped IO."""
        self.inner.teardown()


class SaveOnInterrupt(Callback):
    """On ``KeyboardInterrupt`` or SIGTERM during ``fit``, save ``interrupted.ckpt`` beside the checkpoints.

    The file is a full Lightning checkpoint (weights, fitted buffers, optimiser, epoch and step):
    ``load_from_checkpoint``, ``test --ckpt_path`` and resuming ``fit --ckpt_path`` all take it.
    """

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Save when the run was interrupted (not on ordinary errors: those states may be broken)."""
        del pl_module
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, KeyboardInterrupt | SIGTERMException) or trainer.state.fn != "fit":
            return
        checkpoint = trainer.checkpoint_callback
        folder = Path(getattr(checkpoint, "dirpath", None) or trainer.default_root_dir)
        path = folder / INTERRUPTED
        # trainer.save_checkpoint ends with a barrier that other DDP ranks may never reach after an interrupt
        trainer.strategy.save_checkpoint(trainer._checkpoint_connector.dump_checkpoint(), path)  # noqa: SLF001
        logger.warning("Interrupted: saved %s (epoch %d, step %d)", path, trainer.current_epoch, trainer.global_step)
