"""``DiffusionAnomalyModule``: what every anomalib-dpnr lightning model shares."""

from __future__ import annotations

from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from lightning.pytorch.utilities.types import STEP_OUTPUT

from .processing import diffusion_evaluator, diffusion_pre_processor

__all__ = ["DiffusionAnomalyModule"]


class DiffusionAnomalyModule(AnomalibModule):
    """One-class anomalib model on ``[-1, 1]`` images, with the shared evaluator and input checks.

    Subclasses call ``super().__init__(image_size=..., pre_processor=..., ...)``.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 256,
        pre_processor: PreProcessor | bool = True,
        post_processor: Any = True,
        evaluator: Evaluator | bool = True,
        visualizer: Any = True,
    ) -> None:
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(image_size)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )

    @classmethod
    def configure_pre_processor(cls, image_size: int | tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (default 256) and scale to ``[-1, 1]``."""
        return diffusion_pre_processor(image_size or 256)

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Image AUROC/F1 and pixel AUROC/F1/AUPRO."""
        return diffusion_evaluator()

    def setup(self, stage: str | None = None) -> None:
        """Fail clearly on an empty training set instead of deep inside the data loader."""
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        train_data = getattr(datamodule, "train_data", None)
        if stage == "fit" and train_data is not None and len(train_data) == 0:
            where = ", ".join(f"{key}={getattr(datamodule, key)}" for key in ("root", "category") if hasattr(datamodule, key))
            msg = (
                f"{type(self).__name__}: the training set of {type(datamodule).__name__} is empty ({where}); "
                "it needs normal images (MVTec layout: <root>/<category>/train/good/*.png)"
            )
            raise ValueError(msg)

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict maps and scores so anomalib can fit thresholds and normalisation."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    def log_losses(self, losses: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
        """Log every loss term as ``train_<name>`` and return the total ``loss``."""
        self.log_dict({f"train_{name}": value for name, value in losses.items()}, prog_bar=True, on_epoch=True, batch_size=batch_size)
        return losses["loss"]

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Nothing is forced: epochs and the rest come from the trainer config or the command line."""
        return {}

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images only."""
        return LearningType.ONE_CLASS
