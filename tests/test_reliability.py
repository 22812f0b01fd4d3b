"""Reliability matrix (issue 6) over every plugin model in ``conftest.MODELS``.

Bad input gives an error naming the problem; checkpoints reload bit-identically, survive a
KeyboardInterrupt and refuse foreign or truncated files; the torch export matches the lightning model
(ONNX and OpenVINO, at any image size: ``test_export.py``); the same seed repeats the metrics; training
runs under DDP on 2 CPU processes (gloo).
Each model trains once (module-scoped ``run``) on the tiny generated dataset and is reused.
"""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from anomalib.data import Folder, ImageBatch, MVTecAD
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from conftest import MODELS, config_file
from diffusers import UNet2DConditionModel
from lightning.pytorch import Callback, Trainer
from torchvision.io import read_image

import anomalib_dpnr
from anomalib_dpnr import MVTec
from anomalib_dpnr.components import Denoiser
from anomalib_dpnr.components.base import DiffusionAnomalyModule
from anomalib_dpnr.components.checkpoints import CheckpointError
from anomalib_dpnr.components.distributed import fitted_state
from anomalib_dpnr.components.latent import LatentCodec
from anomalib_dpnr.components.weights import MissingWeightsError

NAMES = list(MODELS)


def build(name: str, **overrides: object) -> DiffusionAnomalyModule:
    """The tiny configuration of model ``name``."""
    return getattr(anomalib_dpnr, name)(**{**MODELS[name][1], **overrides})


def datamodule(root: Path, category: str = "woven") -> MVTecAD:
    return MVTecAD(
        root=root, category=category, train_batch_size=4, eval_batch_size=4, num_workers=0,
        val_split_mode="from_test", seed=0,
    )  # fmt: skip


def engine(root: Path, **kwargs: object) -> Engine:
    settings = {
        "default_root_dir": root, "max_epochs": 1, "accelerator": "cpu", "devices": 1, "logger": False,
        "enable_progress_bar": False, "enable_model_summary": False,
    }  # fmt: skip
    return Engine(**{**settings, **kwargs})


@dataclass
class Run:
    """One seeded training run: the model, its engine, test metrics and checkpoint."""

    module: DiffusionAnomalyModule
    engine: Engine
    metrics: dict[str, float]
    checkpoint: Path


def train(name: str, data: Path, root: Path, seed: int = 0) -> Run:
    module = build(name, seed=seed)  # seeds weights, synthetic anomalies and data order
    eng = engine(root)
    (metrics,) = eng.train(module, datamodule=datamodule(data))
    (checkpoint,) = root.glob("**/weights/lightning/model.ckpt")
    return Run(module.eval(), eng, metrics, checkpoint)


def sample_images(data: Path, count: int = 4) -> torch.Tensor:
    """``[count, 3, 64, 64]`` test images in ``[0, 1]`` (good and defective)."""
    files = sorted((data / "woven" / "test").glob("*/*.png"))[::3][:count]
    return torch.stack([read_image(str(f)).float() / 255 for f in files])


@pytest.fixture(scope="module", params=NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def run(name: str, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return train(name, tiny_dataset, tmp_path_factory.mktemp(f"run_{name}"))


# --- bad input -------------------------------------------------------------------------------------------
def test_channel_counts_are_named(run: Run) -> None:
    for channels in (2, 4):
        with pytest.raises(ValueError, match=f"RGB \\(3-channel\\) or grayscale \\(1-channel\\).*got {channels}"):
            run.module(torch.rand(1, channels, 64, 64))
    with pytest.raises(ValueError, match="3-channel images, got 1 channels.*grayscale"):
        run.module.model(torch.rand(1, 1, 64, 64))  # the torch model takes RGB only, and says how
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        run.module(torch.rand(3, 64, 64))


def test_grayscale_tensors_are_taken_as_rgb(run: Run, tiny_dataset: Path) -> None:
    gray = sample_images(tiny_dataset).mean(dim=1, keepdim=True)
    with torch.no_grad():
        out, rgb = run.module(gray), run.module(gray.expand(-1, 3, -1, -1))
    assert torch.equal(out.pred_score, rgb.pred_score) and torch.equal(out.anomaly_map, rgb.anomaly_map)


def test_image_sizes(run: Run, name: str) -> None:
    multiple = run.module.model.size_multiple
    wide = build(name, image_size=(64, 64 + multiple))  # non-square, divisible: supported
    wide.load_state_dict(run.module.state_dict())
    with torch.no_grad():
        assert wide.eval()(torch.rand(2, 3, 64, 64)).anomaly_map.shape[-2:] == (64, 64 + multiple)
        odd = run.module(torch.rand(1, 3, 77, 51))  # any input size is resized to image_size
    assert torch.isfinite(odd.pred_score).all()
    with pytest.raises(ValueError, match=f"image_size 60x64 is not divisible by {multiple}"):
        build(name, image_size=(60, 64)).setup("fit")  # before any data is touched
    with pytest.raises(ValueError, match=f"divisible by {multiple}, got 60x64"):
        run.module.model(torch.rand(1, 3, 60, 64))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_pixels_are_named(run: Run, value: float) -> None:
    images = torch.rand(2, 3, 64, 64)
    images[1, 0, 5, 5] = value
    with pytest.raises(ValueError, match="NaN or infinite"):
        run.module(images)
    with pytest.raises(ValueError, match="NaN or infinite"):
        run.module.training_step(ImageBatch(image=images * 2 - 1, gt_label=torch.zeros(2, dtype=torch.long)), 0)
    if hasattr(run.module, "build_repository"):  # data-dependent fitting sees the pixels first

        class Bad(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return 2

            def __getitem__(self, index: int) -> torch.Tensor:
                return images[index]

        Bad.collate_fn = staticmethod(lambda items: ImageBatch(image=torch.stack(items)))
        with pytest.raises(ValueError, match="NaN or infinite"):
            build(run.module.__class__.__name__).build_repository(Bad())


def test_empty_or_missing_training_folder(name: str, tiny_dataset: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_dataset / "woven", tmp_path / "woven", ignore=shutil.ignore_patterns("train"))
    (tmp_path / "woven" / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="training set of MVTecAD is empty.*train/good"):
        engine(tmp_path / "out").fit(build(name), datamodule=datamodule(tmp_path))
    missing = MVTec(root=tmp_path, category="missing", num_workers=0)  # anomalib's MVTecAD would try to download
    with pytest.raises(FileNotFoundError, match="dataset folder not found: .*missing"):
        engine(tmp_path / "out").fit(build(name), datamodule=missing)


def test_test_images_without_masks_skip_pixel_metrics(run: Run, tiny_dataset: Path) -> None:
    woven = tiny_dataset / "woven"
    folder = Folder(
        name="no_masks", root=woven, normal_dir="train/good", abnormal_dir="test/spot",
        normal_test_dir="test/good", val_split_mode="none", train_batch_size=4, eval_batch_size=4, num_workers=0,
    )  # fmt: skip
    (metrics,) = run.engine.test(run.module, datamodule=folder)
    assert 0 <= metrics["image_AUROC"] <= 1
    assert not [key for key in metrics if key.startswith("pixel_")]


def test_foreign_and_truncated_checkpoints(run: Run, name: str, tiny_dataset: Path, tmp_path: Path) -> None:
    cls = type(run.module)
    for other in (n for n in NAMES if n != name):
        trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.strategy.connect(build(other))
        foreign = tmp_path / f"{other}.ckpt"
        trainer.save_checkpoint(foreign)
        with pytest.raises(CheckpointError, match=f"saved by {other}, not {name}"):
            cls.load_from_checkpoint(foreign)
        with pytest.raises(CheckpointError, match=f"saved by {other}, not {name}"):
            engine(tmp_path).test(build(name), datamodule=datamodule(tiny_dataset), ckpt_path=foreign)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(run.checkpoint.read_bytes()[: run.checkpoint.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        cls.load_from_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        engine(tmp_path).test(build(name), datamodule=datamodule(tiny_dataset), ckpt_path=truncated)


def test_missing_offline_weights_say_which_file_and_how(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arguments = inspect.signature(getattr(anomalib_dpnr, name)).parameters
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    if "pre_trained" in arguments:
        with pytest.raises(MissingWeightsError, match=r"empty_cache/models--.*model\.safetensors.*anomalib-dpnr weights install"):
            build(name, pre_trained=True)
    if "backbone_weights" in arguments:
        with pytest.raises(MissingWeightsError, match="nope.pth"):
            build(name, pre_trained=False, backbone_weights=str(tmp_path / "nope.pth"))
    if "vae_path" in arguments:
        with pytest.raises(MissingWeightsError, match="VAE folder not found"):
            build(name, vae_path=str(tmp_path / "no_vae"))
    build(name)  # the tiny configuration needs no weights at all


# --- checkpoints ------------------------------------------------------------------------------------------
def test_checkpoint_reload_is_bit_identical(run: Run, tiny_dataset: Path) -> None:
    reloaded = type(run.module).load_from_checkpoint(run.checkpoint).eval()
    expected, got = run.module.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[key], value) for key, value in expected.items())
    assert all(value.numel() for value in fitted_state(reloaded).values())  # data-dependent buffers came back
    images = sample_images(tiny_dataset)
    with torch.no_grad():
        a, b = run.module(images), reloaded(images)
    for field in ("pred_score", "pred_label", "anomaly_map", "pred_mask"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


class Interrupt(Callback):
    """Ctrl-C (``KeyboardInterrupt``) or a real SIGTERM after the first batch of the first epoch."""

    def __init__(self, how: str) -> None:
        self.how = how

    def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
        if self.how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler stops before the next batch
        else:
            raise KeyboardInterrupt


@pytest.mark.parametrize("how", ["ctrl_c", "sigterm"])
def test_interrupted_training_leaves_a_loadable_checkpoint(name: str, how: str, tiny_dataset: Path, tmp_path: Path) -> None:
    module = build(name)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning shuts down gracefully and exits (SIGTERMException is a SystemExit)
            engine(tmp_path, callbacks=[Interrupt(how)]).fit(module, datamodule=datamodule(tiny_dataset))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C after the first
    (path,) = tmp_path.glob("**/weights/lightning/interrupted.ckpt")
    assert not list(tmp_path.glob("**/weights/lightning/model.ckpt"))  # nothing else would have been saved
    assert torch.load(path, weights_only=False)["global_step"] == 1
    reloaded = type(module).load_from_checkpoint(path).eval()
    for key, value in module.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.isfinite(reloaded(torch.rand(1, 3, 64, 64)).pred_score).all()
    if how == "sigterm":
        return
    resumed = engine(tmp_path / "resumed")
    resumed.fit(build(name), datamodule=datamodule(tiny_dataset), ckpt_path=path)  # and training resumes from it
    assert resumed.trainer.global_step == 2  # the epoch's second (last) batch ran, the first was not repeated


# --- export -----------------------------------------------------------------------------------------------
def test_torch_export_matches(run: Run, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from anomalib.deploy import TorchInferencer

    path = run.engine.export(run.module, ExportType.TORCH, export_root=tmp_path)
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    inferencer = TorchInferencer(path=path, device="cpu")
    images = sample_images(tiny_dataset)
    with torch.no_grad():
        expected = run.module(images)
    got = inferencer.predict(images)
    torch.testing.assert_close(got.pred_score.reshape(-1), expected.pred_score, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.anomaly_map.reshape(expected.anomaly_map.shape), expected.anomaly_map, atol=1e-5, rtol=0)


# --- determinism ------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_metrics(run: Run, name: str, tiny_dataset: Path, tmp_path: Path) -> None:
    again = train(name, tiny_dataset, tmp_path)
    assert again.metrics == run.metrics
    assert all(torch.equal(again.module.state_dict()[k], v) for k, v in run.module.state_dict().items())


# --- multi-device -----------------------------------------------------------------------------------------
def test_ddp_training_on_two_cpu_processes(name: str, tiny_dataset: Path, tmp_path: Path) -> None:
    """``anomalib fit --trainer.strategy ddp --trainer.devices 2`` (gloo); fitted state agrees across ranks."""
    folder, tiny = MODELS[name]
    config = config_file(folder)
    config["trainer"].update(max_epochs=1, check_val_every_n_epoch=1, logger=False, enable_progress_bar=False)
    config["model"]["init_args"].update(tiny, seed=0)  # every rank builds the same random-init backbone
    config["data"]["init_args"].update(root=str(tiny_dataset), category="woven", num_workers=0, train_batch_size=2, eval_batch_size=4)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    anomalib = str(Path(sys.executable).with_name("anomalib"))
    command = [
        sys.executable, anomalib, "fit", "--config", "tiny.yaml",
        "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "max_epochs=1` reached" in output
    assert "differs on ranks" not in output
    if fitted_state(build(name).model):  # models whose fit builds state from data (Dpnr's repository)
        assert f"{name}: fitted state" in output and "agrees on all 2 ranks" in output, output[-3000:]
    (checkpoint,) = tmp_path.glob("results/**/weights/lightning/model.ckpt")
    reloaded = getattr(anomalib_dpnr, name).load_from_checkpoint(checkpoint)
    assert all(value.numel() for value in fitted_state(reloaded).values())


# --- CPU speed ---------------------------------------------------------------------------------------------
def test_cpu_runs_put_the_networks_in_channels_last_without_changing_the_output(tiny_dataset: Path, tmp_path: Path) -> None:
    module = build("DiffusionAD", seed=0).eval()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = module.model(images)
    module.setup("test")  # no trainer: nothing changes
    assert all(p.is_contiguous() for p in module.parameters())
    engine(tmp_path).test(module, datamodule=datamodule(tiny_dataset))  # Trainer.test runs setup on the CPU accelerator
    convs = [m.weight for m in module.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    with torch.no_grad():
        got = module.eval().model(images)
    torch.testing.assert_close(got.anomaly_map, expected.anomaly_map, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.pred_score, expected.pred_score, atol=1e-5, rtol=0)




# --- inference precision -----------------------------------------------------------------------------------
def test_inference_dtype_names_are_checked() -> None:
    with pytest.raises(ValueError, match="inference_dtype must be one of"):
        build("Dpnr", inference_dtype="int8")


def test_bfloat16_inference_runs_the_denoiser_in_bfloat16_and_keeps_maps_float32_and_close(run: Run, tiny_dataset: Path) -> None:
    cls = type(run.module)
    images = run.module.pre_processor.transform(sample_images(tiny_dataset))
    module = cls.load_from_checkpoint(run.checkpoint, inference_dtype="bfloat16").eval()  # as `--model.inference_dtype`
    dtypes: list[torch.dtype] = []
    denoisers = [m for m in module.model.modules() if isinstance(m, Denoiser | UNet2DConditionModel)]  # DiAD's: conditioned
    for denoiser in denoisers:
        denoiser.conv_in.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    with torch.no_grad():
        expected, got = run.module.model(images), module.model(images)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert got.anomaly_map.dtype == torch.float32 and got.pred_score.dtype == torch.float32
    assert not torch.equal(got.anomaly_map, expected.anomaly_map)  # the option changes the computation ...
    assert (got.anomaly_map - expected.anomaly_map).abs().max() <= 0.1 * expected.anomaly_map.abs().max()  # ... not the result
    dtypes.clear()
    module.model.train()
    with torch.no_grad():
        if isinstance(module.model.denoiser, Denoiser):
            module.model.denoiser(images, torch.zeros(len(images), dtype=torch.long))
        else:  # DiAD's training step: SG-guided noise prediction
            module.model(images)
    assert dtypes and set(dtypes) == {torch.float32}  # training is unaffected


def test_a_model_without_a_denoiser_refuses_a_lower_inference_dtype() -> None:
    module = build("D3AD")
    module.model = torch.nn.Sequential(LatentCodec())  # no denoiser left, only a pixel-space codec
    with pytest.raises(ValueError, match="no denoiser that can run in a lower precision"):
        module.set_inference_dtype(torch.bfloat16)


def test_exports_are_float32_whatever_the_inference_dtype(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    module = build("DiffusionAD", inference_dtype="bfloat16")
    module.setup("test")
    seen: list[torch.dtype | None] = []
    monkeypatch.setattr("anomalib.models.components.AnomalibModule.to_onnx", lambda self, *a, **k: seen.append(self.model.denoiser.autocast_dtype))
    module.to_onnx(tmp_path, input_size=(64, 64))
    assert seen == [None]  # the graph is traced in float32 ...
    assert module.model.denoiser.autocast_dtype == torch.bfloat16  # ... and the module keeps its inference dtype
