"""The README's demo, the benchmark script and clear errors at the anomalib level, at toy scale."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from test_cli import anomalib

pytestmark = pytest.mark.slow


def test_demo_quick_on_generated_data(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "anomalib_dpnr.cli", "demo", "--quick", "--generated", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "image_AUROC" in done.stdout and "pixel_AUROC" in done.stdout
    heatmaps = tmp_path / "results" / "DiffusionAD" / "MVTecAD" / "woven"
    assert any(heatmaps.rglob("images/*/*.png"))
    assert any(heatmaps.rglob("model.ckpt"))


def test_benchmark_quick_writes_csv_and_readme_table(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:diffusion_ad -->\nold\n<!-- /bench:diffusion_ad -->\nend\n")
    out = tmp_path / "quick.csv"
    earlier = {"model": "Padim", "config": "x.yaml", "dataset": "woven", "image_AUROC": "0.5"}
    with out.open("w", newline="") as handle:  # a row from an earlier run, kept by --append
        writer = csv.DictWriter(handle, fieldnames=list(earlier))
        writer.writeheader()
        writer.writerow(earlier)
    configs = ["--config", "configs/diffusion_ad/cpu.yaml", "--config", "configs/dpnr/cpu.yaml"]
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", *configs, "--csv", str(out), "--append",
         "--readme", str(readme)],
        capture_output=True, text=True, timeout=600, check=False, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = list(csv.DictReader(out.open()))
    assert [row["model"] for row in rows] == ["Padim", "DiffusionAD", "Dpnr"]
    for row in rows[1:]:
        for column in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "image_F1Score"):
            assert 0.0 <= float(row[column]) <= 1.0
        assert float(row["train_seconds"]) > 0 and float(row["infer_ms_per_image"]) > 0 and int(row["peak_rss_mb"]) > 100
    text = readme.read_text()
    assert "old" not in text and "| DiffusionAD | configs/diffusion_ad/cpu.yaml | woven |" in text
    assert "| Dpnr | configs/dpnr/cpu.yaml | woven |" in text
    assert text.startswith("intro\n") and text.endswith("end\n")


def test_benchmark_fails_loudly_when_a_job_fails(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "configs" / "diffusion_ad" / "cpu.yaml").read_text())
    config["model"]["init_args"]["inference_timesteps"] = [100, 5000]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--config", str(bad), "--csv", str(tmp_path / "x.csv")],
        capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1
    assert "FAILED" in done.stderr
    assert "timesteps must lie in [0, 999]" in " ".join(done.stderr.split())
    assert not (tmp_path / "x.csv").exists()


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
