"""The README's demo and clear errors at the anomalib level, at toy scale (benchmarks: test_benchmark.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from test_cli import anomalib

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("model", "name"), [("dpnr", "Dpnr"), ("diffusion_ad", "DiffusionAD"), ("d3ad", "D3AD"), ("diad", "DiAD"), ("ran", "Ran")]
)
def test_demo_quick_on_generated_data(tmp_path: Path, model: str, name: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "anomalib_dpnr.cli", "demo", "--model", model, "--quick", "--generated", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "image_AUROC" in done.stdout and "pixel_AUROC" in done.stdout
    heatmaps = tmp_path / "results" / name / "MVTecAD" / "woven"
    assert any(heatmaps.rglob("images/*/*.png"))
    assert any(heatmaps.rglob("model.ckpt"))


def test_empty_training_folder_is_named(tmp_path: Path, tiny_dataset: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset / "woven", root / "woven")
    for image in (root / "woven" / "train" / "good").iterdir():
        image.unlink()
    with pytest.raises(AssertionError, match="training set of MVTecAD is empty"):
        anomalib(
            "fit", "--model", "anomalib_dpnr.DiffusionAD", "--model.image_size", "64", "--data", "anomalib.data.MVTecAD",
            "--data.root", str(root), "--data.category", "woven", "--data.num_workers", "0", cwd=tmp_path,
        )  # fmt: skip
