"""``benchmarks/gpu_check.sh`` end to end at toy scale on CPU (``--quick --accelerator cpu``, generated data)."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

from conftest import MODELS, REPO


def test_gpu_check_writes_a_row_per_paper_config(tmp_path: Path) -> None:
    table = tmp_path / "gpu_check.csv"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty_cache"), "GPU_CHECK_TIMEOUT": "400"}  # no VAE there
    command = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--quick", "--accelerator", "cpu", "--steps", "3",
               "--warmup", "1", "--csv", str(table)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    for step in ("step 1/3: building", "step 2/3: training 3 steps", "step 3/3: inference", "generated 64 px"):
        assert step in output, step
    rows = {row["model"]: row for row in csv.DictReader(table.open())}
    assert set(rows) == set(MODELS)  # one row per paper config, every model
    for row in rows.values():
        assert row["status"] == "ok" and row["device"] == "cpu", row
        assert int(row["train_steps_timed"]) == 2 and float(row["train_images_per_s"]) > 0, row
        assert float(row["infer_images_per_s"]) > 0 and row["train_peak_gpu_mb"] == "", row  # no GPU memory on CPU
    assert rows["DiffusionAD"]["variant"] == "paper"
    assert rows["Dpnr"]["variant"].startswith("pixel space (--model.vae_path null)")  # the VAE is not cached
    assert "MissingWeightsError: could not load the AutoencoderKL" in output
