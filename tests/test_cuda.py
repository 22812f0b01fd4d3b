"""Every model of ``conftest.MODELS`` on a CUDA GPU, in float32 and bf16 mixed precision (issue 18).

A few training steps, test, predict twice (the seeded inference noise must repeat bit for bit on the
same device) and torch/ONNX export, all on the device Lightning picks for ``accelerator``: the models
never name a device. Skipped without CUDA. ``ANOMALIB_DPNR_TEST_ACCELERATOR=cpu`` runs the same
tests on CPU (bf16-mixed is CPU autocast there), a dry run of the logic on a machine without a GPU.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from anomalib.data import InferenceBatch
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from conftest import MODELS
from lightning.pytorch import Callback, LightningModule, Trainer
from test_export import unit_normalisation
from test_reliability import build, datamodule, sample_images
from torch import nn

from anomalib_dpnr.components.base import DiffusionAnomalyModule

ACCELERATOR = os.environ.get("ANOMALIB_DPNR_TEST_ACCELERATOR", "cuda")
DEVICE_TYPE = {"cuda": "cuda", "gpu": "cuda", "cpu": "cpu"}.get(ACCELERATOR)
if DEVICE_TYPE is None:
    msg = f"ANOMALIB_DPNR_TEST_ACCELERATOR must be cuda, gpu or cpu, got {ACCELERATOR!r}"
    raise ValueError(msg)

pytestmark = pytest.mark.skipif(
    DEVICE_TYPE == "cuda" and not torch.cuda.is_available(),
    reason="no CUDA device (set ANOMALIB_DPNR_TEST_ACCELERATOR=cpu for a dry run on CPU)",
)

PRECISIONS = ["32", "bf16-mixed"]
STEPS = 3  # training steps: 8 images in batches of 4, two epochs


class DeviceLog(Callback):
    """Device type and dtype of the first convolution's output, per mode (``train`` / ``eval``), as it ran,
    and the training losses."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, torch.dtype]] = {}
        self.losses: list[torch.Tensor] = []

    def _record(self, conv: nn.Module, args: object, out: torch.Tensor) -> None:
        self.seen["train" if conv.training else "eval"] = (out.device.type, out.dtype)

    def on_fit_start(self, trainer: Trainer, module: LightningModule) -> None:
        conv = next(m for m in module.model.modules() if isinstance(m, nn.Conv2d))
        self.handle = conv.register_forward_hook(self._record)  # removed at the end: exports pickle the model

    on_predict_start = on_fit_start

    def on_fit_end(self, trainer: Trainer, module: LightningModule) -> None:
        self.handle.remove()

    on_predict_end = on_fit_end

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, outputs: dict, *args: object) -> None:
        self.losses.append(outputs["loss"].detach())


@dataclass
class Trained:
    """A tiny model trained on the device, its engine and test metrics."""

    module: DiffusionAnomalyModule
    engine: Engine
    metrics: dict[str, float]
    log: DeviceLog
    precision: str


@pytest.fixture(scope="module", params=[(n, p) for n in MODELS for p in PRECISIONS], ids=lambda c: f"{c[0]}-{c[1]}")
def trained(request: pytest.FixtureRequest, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    name, precision = request.param
    log = DeviceLog()
    engine = Engine(
        default_root_dir=tmp_path_factory.mktemp(f"cuda_{name}"), accelerator=ACCELERATOR, devices=1,
        precision=precision, max_steps=STEPS, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[log],
    )  # fmt: skip
    module = build(name, seed=0)
    (metrics,) = engine.train(module, datamodule=datamodule(tiny_dataset))
    return Trained(module, engine, metrics, log, precision)


def predict(run: Trained, data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and maps of the test split, predicted through Lightning (device and precision of the run)."""
    batches = run.engine.predict(run.module, datamodule=datamodule(data), return_predictions=True)
    return torch.cat([b.pred_score for b in batches]), torch.cat([b.anomaly_map for b in batches])


def root_device(run: Trained) -> torch.device:
    return run.engine.trainer.strategy.root_device


def compute_dtype(run: Trained) -> torch.dtype:
    """What convolutions compute in under the run's precision (bf16 under autocast)."""
    return torch.bfloat16 if run.precision == "bf16-mixed" else torch.float32


def test_training_ran_on_the_device(trained: Trained) -> None:
    trainer = trained.engine.trainer
    assert root_device(trained).type == DEVICE_TYPE
    assert trainer.global_step == STEPS
    assert trained.log.seen["train"] == (DEVICE_TYPE, compute_dtype(trained))
    assert len(trained.log.losses) == STEPS and torch.isfinite(torch.stack(trained.log.losses)).all()
    assert all(torch.isfinite(p).all() for p in trained.module.parameters()), "non-finite weights after training"
    assert all(0 <= trained.metrics[k] <= 1 for k in ("image_AUROC", "pixel_AUROC")), trained.metrics


def test_predict_repeats_on_the_device(trained: Trained, tiny_dataset: Path) -> None:
    scores, maps = predict(trained, tiny_dataset)
    assert trained.log.seen["eval"] == (DEVICE_TYPE, compute_dtype(trained))
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all()
    again_scores, again_maps = predict(trained, tiny_dataset)
    assert torch.equal(scores, again_scores), (scores, again_scores)
    assert torch.equal(maps, again_maps), "anomaly maps differ between two predict runs on the same device"


def on_device(module: DiffusionAnomalyModule, run: Trained) -> DiffusionAnomalyModule:
    """An eval copy of ``module`` on the run's device (Lightning moves the model back to CPU after fit)."""
    return copy.deepcopy(module).to(root_device(run)).eval()


@torch.no_grad()
def reference(module: DiffusionAnomalyModule, images: torch.Tensor) -> InferenceBatch:
    """The lightning model's output, in float32: exports run outside autocast whatever the training precision."""
    return module(images.to(module.device))


def test_torch_export_on_the_device(
    trained: Trained, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalib.deploy import TorchInferencer

    images = sample_images(tiny_dataset)
    module = on_device(trained.module, trained)
    expected = reference(module, images)
    path = trained.engine.export(module, ExportType.TORCH, export_root=tmp_path)
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    got = TorchInferencer(path=path, device=DEVICE_TYPE).predict(images)
    assert got.pred_score.device.type == DEVICE_TYPE
    torch.testing.assert_close(got.pred_score.reshape(-1), expected.pred_score, atol=1e-5, rtol=0)
    got_map = got.anomaly_map.reshape(expected.anomaly_map.shape)
    torch.testing.assert_close(got_map, expected.anomaly_map, atol=1e-5, rtol=0)


def test_onnx_export_on_the_device(trained: Trained, tiny_dataset: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    if trained.precision != "32":  # export traces float32 weights outside autocast either way
        pytest.skip("ONNX export does not depend on the training precision: checked once, after the '32' run")
    images = sample_images(tiny_dataset)
    module = on_device(trained.module, trained)
    if hasattr(module.model, "inference_timesteps"):  # one noise level: half the export time
        module.model.inference_timesteps = module.model.inference_timesteps[:1]
    unit_normalisation(module)
    expected = reference(module, images)
    path = trained.engine.export(module, ExportType.ONNX, export_root=tmp_path)  # traced on the device
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(str(path), providers=providers)
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"input": images.numpy()}), strict=True))
    torch.testing.assert_close(torch.from_numpy(outputs["pred_score"]), expected.pred_score.cpu(), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(outputs["anomaly_map"]), expected.anomaly_map.cpu(), atol=1e-4, rtol=0)
