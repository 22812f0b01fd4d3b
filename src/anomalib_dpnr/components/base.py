"""``DiffusionAnomalyModule``: what every anomalib-dpnr lightning model shares."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch, InferenceBatch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from anomalib.utils.serialization import anomalib_safe_globals
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from lightning_utilities.core.imports import module_available
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .checkpoints import MODEL_KEY, CheckedCheckpointIO, SaveOnInterrupt, check_checkpoint_file, check_checkpoint_model
from .distributed import sync_fitted_state
from .latent import LatentCodec
from .processing import diffusion_evaluator, diffusion_pre_processor
from .unet import parse_inference_dtype
from .validation import as_rgb, check_image_size, check_images

__all__ = ["DiffusionAnomalyModule"]


def is_channels_last(value: object) -> bool:
    """A 4-D tensor laid out channels-last (and not also contiguous, as 1x1 kernels are either way)."""
    return (
        isinstance(value, torch.Tensor) and value.dim() == 4 and not value.is_contiguous()
        and value.is_contiguous(memory_format=torch.channels_last)
    )  # fmt: skip


def non_persistent_buffers(module: nn.Module) -> set[str]:
    """Full names of ``module``'s non-persistent buffers (older checkpoints may hold them)."""
    return {
        f"{name}.{buffer}" if name else buffer
        for name, child in module.named_modules()
        for buffer in child._non_persistent_buffers_set  # noqa: SLF001 (torch keeps the set on each module)
    }


class DiffusionAnomalyModule(AnomalibModule):
    """One-class anomalib model on ``[-1, 1]`` images, with the shared evaluator and input checks.

    Subclasses call ``super().__init__(image_size=..., seed=..., pre_processor=..., ...)`` before building
    their networks, so ``seed`` also fixes the weight initialisation. ``inference_dtype`` (``"float32"``,
    ``"bfloat16"``, ``"float16"``) is the precision of the denoisers (``components.Denoiser``, DiAD's guided passes) at inference.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 256,
        seed: int | None = None,
        pre_processor: PreProcessor | bool = True,
        post_processor: Any = True,
        evaluator: Evaluator | bool = True,
        visualizer: Any = True,
        inference_dtype: str = "float32",
    ) -> None:
        autocast_dtype = parse_inference_dtype(inference_dtype, type(self).__name__)
        if seed is not None:  # the anomalib CLI declares seed_everything but never applies it
            seed_everything(seed, workers=True)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(image_size)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.autocast_dtype = autocast_dtype

    @classmethod
    def configure_pre_processor(cls, image_size: int | tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (default 256) and scale to ``[-1, 1]``."""
        return diffusion_pre_processor(image_size or 256)

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Image AUROC/F1 and pixel AUROC/F1/AUPRO."""
        return diffusion_evaluator()

    def forward(self, batch: torch.Tensor, *args, **kwargs) -> InferenceBatch:
        """Pre-process, predict, post-process; grayscale ``[B, 1, H, W]`` input is taken as RGB (``as_rgb``)."""
        return super().forward(as_rgb(batch, type(self).__name__), *args, **kwargs)

    def setup(self, stage: str | None = None) -> None:
        """Channels-last weights on CPU. Fail clearly on an image size the model cannot take, an unreadable ``--ckpt_path`` file or an
        empty training set, instead of deep inside torch or the data loader."""
        super().setup(stage)
        self.set_inference_dtype(self.autocast_dtype)
        if self._trainer is not None and isinstance(self.trainer.accelerator, CPUAccelerator):
            self.model.to(memory_format=torch.channels_last)  # oneDNN's convolutions: ~1.5x faster, equal up to float rounding
        check_image_size(self.input_size, getattr(self.model, "size_multiple", 1), type(self).__name__)
        if self._trainer is not None and not isinstance(self.trainer.strategy.checkpoint_io, CheckedCheckpointIO):
            self.trainer.strategy.checkpoint_io = CheckedCheckpointIO(self.trainer.strategy.checkpoint_io)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        train_data = getattr(datamodule, "train_data", None)
        if stage == "fit" and train_data is not None and len(train_data) == 0:
            where = ", ".join(f"{key}={getattr(datamodule, key)}" for key in ("root", "category") if hasattr(datamodule, key))
            msg = (
                f"{type(self).__name__}: the training set of {type(datamodule).__name__} is empty ({where}); "
                "it needs normal images (MVTec layout: <root>/<category>/train/good/*.png)"
            )
            raise ValueError(msg)

    def set_inference_dtype(self, dtype: torch.dtype | None) -> None:
        """Run every denoiser of the model (a ``Denoiser``, or a model that declares ``autocast_dtype`` for its own
        denoising passes, as DiAD's), and the VAE of its ``LatentCodec``, under autocast to ``dtype`` at inference
        (``None``: float32)."""
        networks = [
            m for m in self.model.modules() if hasattr(m, "autocast_dtype") and not (isinstance(m, LatentCodec) and m.vae is None)
        ]
        if dtype is not None and all(isinstance(m, LatentCodec) for m in networks):
            msg = f"{type(self).__name__} has no denoiser that can run in a lower precision; use inference_dtype float32"
            raise ValueError(msg)
        for network in networks:
            network.autocast_dtype = dtype

    def configure_model(self) -> None:
        """Under DDP, after ``setup`` fitted data-dependent state on each rank: check the ranks agree, use rank 0's."""
        super().configure_model()
        if self._trainer is not None and self.trainer.world_size > 1 and self.trainer.state.fn == "fit":
            sync_fitted_state(self, self.trainer.strategy, type(self).__name__)

    def configure_callbacks(self) -> list[Callback]:
        """``SaveOnInterrupt``: Ctrl-C / SIGTERM during ``fit`` leaves a loadable ``interrupted.ckpt``."""
        return [*super().configure_callbacks(), SaveOnInterrupt()]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record which model wrote the checkpoint."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[MODEL_KEY] = type(self).__name__

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model by name (``check_checkpoint_model``). Weights saved channels-last (a
        CPU run) load channels-last, so the reloaded model reproduces the saved one bit for bit."""
        check_checkpoint_model(checkpoint, type(self).__name__, set(self.state_dict()))
        if "state_dict" in checkpoint:  # buffers derived from arguments (blur kernels) are rebuilt, not loaded
            derived = non_persistent_buffers(self)
            checkpoint["state_dict"] = {key: value for key, value in checkpoint["state_dict"].items() if key not in derived}
        super().on_load_checkpoint(checkpoint)
        self.set_inference_dtype(self.autocast_dtype)
        if any(is_channels_last(value) for value in checkpoint.get("state_dict", {}).values()):
            self.model.to(memory_format=torch.channels_last)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args, **kwargs) -> DiffusionAnomalyModule:  # type: ignore[override]
        """anomalib's loader, after checking the file is complete and was written by this model."""
        check_checkpoint_file(checkpoint_path)
        with anomalib_safe_globals(extra=cls.checkpoint_safe_globals()):  # tensors are mapped, not read
            peek = torch.load(checkpoint_path, map_location="cpu", mmap=True, weights_only=True)
        check_checkpoint_model(peek, cls.__name__)  # before the constructor sees another model's arguments
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def to_onnx(self, export_root: Path | str, model_file_name: str = "model", input_size: tuple[int, int] | None = None, **kwargs: Any) -> Path:
        """anomalib's ONNX export at opset 18; batch, height and width stay dynamic unless ``input_size`` fixes them.

        The embedded pre-processor resizes every image to ``image_size`` and the seeded inference noise is drawn
        at that size, so any image size works. Opset 18 is what torch's exporter writes (anomalib asks for 14,
        which fails to convert) and what antialiased resizing needs.
        """
        if input_size is None and self.input_size is None:
            msg = (
                f"{type(self).__name__} cannot be exported with dynamic height and width without a Resize in its "
                "pre-processor: the seeded inference noise needs a fixed image size. Keep the default pre-processor "
                "or pass input_size=(H, W) (anomalib export --input_size '[H, W]')"
            )
            raise ValueError(msg)
        kwargs.setdefault("opset_version", 18)
        self.set_inference_dtype(None)  # exported graphs are float32 (the runtime chooses its own precision)
        try:
            with torch.no_grad():  # no grad-mode regions in the graph: decomposing it takes half the time
                return super().to_onnx(export_root, model_file_name, input_size=input_size, **kwargs)
        finally:
            self.set_inference_dtype(self.autocast_dtype)

    def to_openvino(self, export_root: Path | str, *args: Any, **kwargs: Any) -> Path:
        """anomalib's OpenVINO export (through :meth:`to_onnx`), after checking OpenVINO is installed."""
        if not module_available("openvino"):
            msg = f"{type(self).__name__}: OpenVINO export needs the openvino package: pip install 'anomalib-dpnr[openvino]'"
            raise ModuleNotFoundError(msg, name="openvino")
        return super().to_openvino(export_root, *args, **kwargs)

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict maps and scores so anomalib can fit thresholds and normalisation."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    def training_images(self, dataset: Dataset, limit: int | None = None, batch_size: int = 16) -> Iterator[torch.Tensor]:
        """Pre-processed ``[-1, 1]`` images of (the first ``limit`` of) ``dataset``, in order, on the model's device
        (for state fitted from the training images)."""
        name = type(self).__name__
        if len(dataset) == 0:
            msg = f"{name}: cannot fit from an empty training set"
            raise ValueError(msg)
        indices = list(range(min(len(dataset), limit or len(dataset))))
        loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, collate_fn=getattr(dataset, "collate_fn", None))
        for batch in loader:
            images = batch.image.to(self.device)
            images = self.pre_processor.transform(images) if self.pre_processor else images
            check_images(images, 3, getattr(self.model, "size_multiple", 1), f"{name} (fitting from the training images)")
            yield images

    def validation_batches(self) -> Iterator[Batch]:
        """The running validation's batches, on the model's device and pre-processed exactly as ``validation_step``
        receives them (for a reading fitted on the validation split before its batches are scored)."""
        loaders = self.trainer.val_dataloaders
        for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
            for batch in loader:
                batch.image = batch.image.to(self.device)
                batch.gt_mask = None if batch.gt_mask is None else batch.gt_mask.to(self.device)
                if self.pre_processor and self.pre_processor.transform:
                    batch.image, batch.gt_mask = self.pre_processor.transform(batch.image, batch.gt_mask)
                yield batch

    def fitting_data(self, what: str) -> Dataset:
        """The fitting datamodule's ``train_data``, or a clear error naming ``what`` needs it."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "train_data", None) is None:
            msg = f"{type(self).__name__} fits {what} from the datamodule's train_data; fit with a datamodule"
            raise RuntimeError(msg)
        return datamodule.train_data

    def log_losses(self, losses: dict[str, torch.Tensor], batch_size: int, phase: str = "") -> torch.Tensor:
        """Log every loss term as ``train_<name>`` (``train_<phase>_<name>`` for the terms besides the total, when a
        training phase is named) and return the total ``loss``."""
        names = {name: f"{phase}_{name}" if phase and name != "loss" else name for name in losses}
        self.log_dict({f"train_{names[name]}": value for name, value in losses.items()}, prog_bar=True, on_epoch=True, batch_size=batch_size)
        return losses["loss"]

    # --- a latent autoencoder trained first (``LatentCodec`` with ``autoencoder_channels``) --------------------------
    autoencoder_epochs: int = 0

    def configure_autoencoder_phase(
        self, channels: Sequence[int] | None, epochs: int, learning_rate: float, kl_weight: float, scale_images: int | None = None
    ) -> None:
        """Train ``self.model.codec``'s autoencoder (built from ``channels``) in the first ``epochs`` epochs (L1 +
        ``kl_weight`` x KL, AdamW at ``learning_rate``); at the next epoch fit its latent scale on (the first
        ``scale_images``) training images, after which it stays frozen and the denoiser trains in its latent."""
        if bool(channels) != (epochs > 0) or epochs < 0:
            msg = (
                f"a trained autoencoder needs both autoencoder_channels and autoencoder_epochs >= 1 (got {channels} "
                f"and {epochs}); set neither for pixel space or a pretrained vae_path"
            )
            raise ValueError(msg)
        self.autoencoder_epochs = epochs
        self.autoencoder_learning_rate = learning_rate
        self.autoencoder_kl_weight = kl_weight
        self.latent_scale_images = scale_images

    @property
    def training_autoencoder(self) -> bool:
        """Whether this epoch trains the latent autoencoder (the first ``autoencoder_epochs``)."""
        return self._trainer is not None and self.trainer.current_epoch < self.autoencoder_epochs

    def check_denoiser_epochs(self, later: dict[str, int] | None = None, hint: str = "") -> None:
        """At ``setup("fit")``: ``max_epochs`` must leave the denoiser an epoch besides ``autoencoder_epochs`` and
        the ``later`` phases' epochs (name -> epochs); a run bounded by steps only gets a warning."""
        reserved = {"autoencoder_epochs": self.autoencoder_epochs, **(later or {})}
        reserved = {name: epochs for name, epochs in reserved.items() if epochs}
        if not reserved:
            return
        name, max_epochs = type(self).__name__, self.trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            rank_zero_warn(f"{name}: training is bounded by steps, not epochs: the phases set by {', '.join(reserved)} may not all run")
        elif max_epochs <= sum(reserved.values()):
            phases = " and ".join(f"{key}={value}" for key, value in reserved.items())
            msg = f"{name}: max_epochs={max_epochs} leaves no epoch for the denoiser besides {phases}; raise max_epochs{hint}"
            raise ValueError(msg)

    def on_train_epoch_start(self) -> None:
        """At the first epoch after the autoencoder's: fit its latent scale on the training images."""
        super().on_train_epoch_start()
        if self.autoencoder_epochs and self.trainer.current_epoch == self.autoencoder_epochs:
            data = self.fitting_data("the latent scale")
            scale = self.model.codec.fit_scale(self.training_images(data, self.latent_scale_images))
            self.log("latent_scale", scale)

    def autoencoder_step(self, images: torch.Tensor) -> torch.Tensor:
        """The autoencoder epochs' training step: its reconstruction loss, logged as ``train_autoencoder_*``."""
        losses = self.model.codec.reconstruction_loss(images, self.autoencoder_kl_weight)
        return self.log_losses(losses, images.shape[0], "autoencoder")

    def autoencoder_parameters(self) -> list[dict[str, Any]]:
        """The trained autoencoder's AdamW parameter group (none for pixel space or a pretrained VAE); its loss
        reaches it in its own epochs only, and AdamW skips parameters without gradient."""
        if not self.model.codec.trainable:
            return []
        return [{"params": list(self.model.codec.vae.parameters()), "lr": self.autoencoder_learning_rate}]

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Nothing is forced: epochs and the rest come from the trainer config or the command line."""
        return {}

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images only."""
        return LearningType.ONE_CLASS
