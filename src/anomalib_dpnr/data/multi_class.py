"""``MVTecMultiClass``: one datamodule over several MVTec-layout categories (DiAD's multi-class / unified setting).

One model trains on the normal images of every category at once; validation and test hold each category's own
split (made per category, so every category keeps its share of normal and defective images), and the test reports,
besides the usual metrics over all categories, the model's own test metrics per category (``<category>/<metric>``).
Works with any anomalib model (the plugin's, PatchCore, PaDiM): the per-category metrics come from a callback the
datamodule adds to its trainer.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from anomalib.data import MVTecAD
from anomalib.data.datasets.image.mvtecad import MVTecADDataset
from anomalib.data.utils import Split
from lightning.pytorch import Callback, LightningModule, Trainer
from torchvision.transforms.v2 import Transform

__all__ = ["CategoryMetrics", "MVTecMultiClass"]


class CategoryMetrics(Callback):
    """The model's test metrics (its evaluator's ``test_metrics``) computed per category and logged as
    ``<category>/<metric name>``; an image belongs to the category whose folder holds it.

    Args:
        folders: Category name -> its folder.
    """

    def __init__(self, folders: dict[str, Path]) -> None:
        super().__init__()
        self.folders = {name: Path(folder).resolve() for name, folder in folders.items()}
        self.metrics: dict[str, list[Any]] = {}

    def category(self, image_path: str) -> str | None:
        """The category whose folder holds ``image_path``."""
        path = Path(image_path).resolve()
        return next((name for name, folder in self.folders.items() if path.is_relative_to(folder)), None)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fresh copies of the model's test metrics for every category."""
        del trainer
        evaluator = getattr(pl_module, "evaluator", None)
        templates = list(getattr(evaluator, "test_metrics", []))
        self.metrics = {name: [copy.deepcopy(metric).cpu() for metric in templates] for name in self.folders}
        for metrics in self.metrics.values():
            for metric in metrics:
                metric.reset()

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:  # noqa: ANN401
        """Update each category's metrics with its images of the (post-processed) batch."""
        del trainer, pl_module, batch_idx, dataloader_idx
        batch = outputs if outputs is not None and hasattr(outputs, "image_path") else batch
        owners = [self.category(path) for path in batch.image_path]
        for name, metrics in self.metrics.items():
            index = torch.tensor([i for i, owner in enumerate(owners) if owner == name], dtype=torch.long)
            if not len(index):
                continue
            for metric in metrics:
                values = {field: _select(getattr(batch, field, None), index) for field in metric.fields}
                metric.update(SimpleNamespace(**values))

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log ``<category>/<metric>`` for every metric that could be computed (pixel metrics need masks)."""
        del trainer
        for name, metrics in self.metrics.items():
            for metric in metrics:
                if getattr(metric, "_update_count", 0) == 0:
                    continue
                value = metric.compute()
                if value is not None:
                    pl_module.log(f"{name}/{metric.name}", value)


def _select(value: Any, index: torch.Tensor) -> Any:  # noqa: ANN401
    if isinstance(value, torch.Tensor):
        return value.detach()[index.to(value.device)].cpu()
    return value


class MVTecMultiClass(MVTecAD):
    """Several MVTec-layout categories as one dataset; arguments as anomalib's ``MVTecAD`` except ``categories``.

    Args:
        root: Folder holding the categories.
        categories: Category folders under ``root`` (a nested path such as ``mvtec_ad/bottle`` is allowed; the
            category's name is its last part, which must be unique).
        train_batch_size, eval_batch_size, num_workers, *_augmentations, test_split_mode, test_split_ratio,
        val_split_mode, val_split_ratio, seed: As ``MVTecAD``; splits are made per category with the same seed.

    Example (the configs' ``data:`` section; ``anomalib train --data anomalib_dpnr.data.MVTecMultiClass``)::

        class_path: anomalib_dpnr.data.MVTecMultiClass
        init_args: {root: ../shared/data, categories: [mvtec_ad/bottle, magnetic_tile], val_split_mode: from_test}
    """

    def __init__(
        self,
        root: Path | str = "./datasets/MVTecAD",
        categories: Sequence[str] = ("bottle",),
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        test_split_mode: str = "from_dir",
        test_split_ratio: float = 0.2,
        val_split_mode: str = "same_as_test",
        val_split_ratio: float = 0.5,
        seed: int | None = None,
    ) -> None:
        categories = [str(c) for c in categories]
        names = [Path(c).name for c in categories]
        if not categories or len(set(names)) != len(names):
            msg = f"categories must be a non-empty list with unique names (last path part), got {categories}"
            raise ValueError(msg)
        super().__init__(
            root=root, category=categories[0], train_batch_size=train_batch_size, eval_batch_size=eval_batch_size,
            num_workers=num_workers, train_augmentations=train_augmentations, val_augmentations=val_augmentations,
            test_augmentations=test_augmentations, augmentations=augmentations, test_split_mode=test_split_mode,
            test_split_ratio=test_split_ratio, val_split_mode=val_split_mode, val_split_ratio=val_split_ratio, seed=seed,
        )  # fmt: skip
        self.categories = categories
        self.category = "+".join(names)  # names the results folder

    @property
    def folders(self) -> dict[str, Path]:
        """Category name -> folder."""
        return {Path(c).name: self.root / c for c in self.categories}

    def prepare_data(self) -> None:
        """Check every category folder exists (never downloads)."""
        missing = [str(folder) for folder in self.folders.values() if not folder.is_dir()]
        if missing:
            msg = f"dataset folder(s) not found: {missing} (expected MVTec layout <root>/<category>/train/good/*.png)"
            raise FileNotFoundError(msg)

    def _setup(self, _stage: str | None = None) -> None:
        """Each category's train/test data, split as ``MVTecAD`` splits one category, then concatenated."""
        splits: dict[str, list] = {"train_data": [], "test_data": [], "val_data": []}
        for category in self.categories:
            self.train_data = MVTecADDataset(split=Split.TRAIN, root=self.root, category=category)
            self.test_data = MVTecADDataset(split=Split.TEST, root=self.root, category=category)
            super()._create_test_split()
            super()._create_val_split()
            for name, parts in splits.items():
                if hasattr(self, name):
                    parts.append(getattr(self, name))
            if hasattr(self, "val_data"):
                del self.val_data
        for name, parts in splits.items():
            if parts:
                combined = parts[0]
                for part in parts[1:]:
                    combined = combined + part
                setattr(self, name, combined)

    def _create_test_split(self) -> None:
        """Done per category in :meth:`_setup`."""

    def _create_val_split(self) -> None:
        """Done per category in :meth:`_setup`."""

    def setup(self, stage: str | None = None) -> None:
        """Set up the data and give the trainer the per-category test metrics, as its last callback: after the
        model's post-processor (which adds predicted labels and masks), whose callbacks Lightning attaches first."""
        super().setup(stage)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            trainer.callbacks[:] = [cb for cb in trainer.callbacks if not isinstance(cb, CategoryMetrics)]
            trainer.callbacks.append(CategoryMetrics(self.folders))
