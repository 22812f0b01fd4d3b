"""End to end through the stock ``anomalib`` CLI on a tiny generated dataset."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import MODELS, config_file

pytestmark = pytest.mark.slow

METRIC_ROW = re.compile(r"│\s+((?:image|pixel)_\w+)\s+│\s+([-\d.e]+|nan)\s+│")


def anomalib(*args: str, cwd: Path) -> str:
    """Run ``anomalib`` in a subprocess, fail with its output if it fails, return stdout+stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRUST_REMOTE_CODE": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-c", "from anomalib.cli.cli import main; main()", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"anomalib {' '.join(args)} failed:\n{output[-4000:]}"
    return output


def metrics(output: str) -> dict[str, float]:
    return {name: float(value) for name, value in METRIC_ROW.findall(output)}


@pytest.fixture(scope="module", params=list(MODELS))
def model_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path, model_name: str) -> Path:
    """The model's CPU config with the model shrunk and the data pointed at the tiny dataset."""
    folder, tiny = MODELS[model_name]
    config = config_file(folder)
    config["trainer"].update(max_epochs=2, check_val_every_n_epoch=1, logger=False)
    config["model"]["init_args"].update(tiny)
    config["data"]["init_args"].update(
        root=str(tiny_dataset), category="woven", num_workers=0, train_batch_size=4, eval_batch_size=4
    )
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path, tiny_dataset: Path, model_name: str) -> tuple[Path, str]:
    """``anomalib train`` as the README shows it; returns the work dir and its output."""
    workdir = tmp_path_factory.mktemp("run")
    output = anomalib(
        "train", "--model", f"anomalib_dpnr.{model_name}", "--data", "anomalib.data.MVTecAD",
        "--data.root", str(tiny_dataset), "--data.category", "woven", "--config", str(tiny_config),
        "--trainer.max_epochs", "1", cwd=workdir,
    )  # fmt: skip
    return workdir, output


def checkpoint(workdir: Path, model_name: str) -> Path:
    (path,) = workdir.glob(f"results/{model_name}/MVTecAD/woven/latest/weights/lightning/model.ckpt")
    return path


def test_train_prints_test_metrics_and_honours_cli_epochs(trained: tuple[Path, str], model_name: str) -> None:
    workdir, output = trained
    found = metrics(output)
    for name in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "image_F1Score"):
        assert 0.0 <= found[name] <= 1.0, name
    # the config says 2 epochs, the command line 1: the command line wins and nothing overrides it
    assert "max_epochs=1` reached" in output
    assert "Overriding" not in output
    assert checkpoint(workdir, model_name).is_file()


def test_test_predict_export_round_trip(trained: tuple[Path, str], tiny_config: Path, tiny_dataset: Path, model_name: str) -> None:
    workdir, train_output = trained
    ckpt = str(checkpoint(workdir, model_name))
    test_output = anomalib("test", "--config", str(tiny_config), "--ckpt_path", ckpt, cwd=workdir)
    assert metrics(test_output) == pytest.approx(metrics(train_output), abs=1e-6)

    started = time.time()
    anomalib("predict", "--config", str(tiny_config), "--ckpt_path", ckpt, cwd=workdir)
    images = workdir / "results" / model_name / "MVTecAD" / "woven" / "latest" / "images"
    written = [p for p in images.rglob("*.png") if p.stat().st_mtime >= started]
    assert len(written) == 6  # the half of the 12 test images that is not the validation split

    anomalib("export", "--config", str(tiny_config), "--export_type", "torch", "--ckpt_path", ckpt, cwd=workdir)
    (exported,) = workdir.glob("results/**/weights/torch/model.pt")

    os.environ["TRUST_REMOTE_CODE"] = "1"
    from anomalib.deploy import TorchInferencer

    import anomalib_dpnr

    inferencer = TorchInferencer(path=exported, device="cpu")
    module = getattr(anomalib_dpnr, model_name).load_from_checkpoint(ckpt).eval()
    image = tiny_dataset / "woven" / "test" / "spot" / "000.png"
    from torchvision.io import read_image

    with torch.no_grad():
        expected = module(read_image(str(image))[None].float() / 255)
    got = inferencer.predict(image)
    torch.testing.assert_close(got.pred_score.detach(), expected.pred_score, atol=1e-5, rtol=0)
    # normalised maps: float round-off between the two call paths stays far below 1e-4
    torch.testing.assert_close(got.anomaly_map.detach().reshape(-1), expected.anomaly_map.reshape(-1), atol=1e-4, rtol=0)


# Short-name resolution depends on the plugin's import, not on the model: one model covers it.
@pytest.mark.only_models("Dpnr")
def test_mvtec_short_name_after_the_model(tmp_path: Path, tiny_config: Path, tiny_dataset: Path, model_name: str) -> None:
    config = yaml.safe_load(tiny_config.read_text())
    del config["data"]  # the data comes from the command line alone
    config["trainer"]["max_epochs"] = 1
    path = tmp_path / "no_data.yaml"
    path.write_text(yaml.safe_dump(config))
    output = anomalib(
        "fit", "--config", str(path), "--model", f"anomalib_dpnr.{model_name}", "--data", "MVTec",
        "--data.root", str(tiny_dataset), "--data.category", "woven", "--data.num_workers", "0",
        "--data.train_batch_size", "4", "--data.val_split_mode", "from_test", cwd=tmp_path,
    )  # fmt: skip
    assert "max_epochs=1` reached" in output
