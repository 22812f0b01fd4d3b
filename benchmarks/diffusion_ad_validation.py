"""Choose DiffusionAD's CPU settings on the validation half: train a config variant, score the validation half only.

Each call trains ``configs/diffusion_ad/cpu.yaml`` with the given ``--model.*`` overrides on one sample dataset
(same data, 128 px pre-processing and ``from_test`` split, seed 42, as ``anomalib-dpnr compare``) and appends,
for each inference mode (``norm_guided``, ``average``), the image AUROC, pixel AUROC and pixel AUPRO on the
*validation* half to ``--csv``. The scored test half is never read. Pick by validation pixel AUROC + AUPRO.

    nice python benchmarks/diffusion_ad_validation.py --csv benchmarks/results/diffusion_ad_validation.csv \\
        -- --model.learning_rate 0.0002 --model.segmentation_width 32
    python benchmarks/diffusion_ad_validation.py --csv benchmarks/results/diffusion_ad_validation.csv --render \\
        --readme src/anomalib_dpnr/models/diffusion_ad/README.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from validation import add_run_arguments, raw_metrics, report, update_csv

from anomalib_dpnr.compare import DATASETS, TEXTURE_ARGS
from anomalib_dpnr.config_files import config_path

CONFIG = config_path("diffusion_ad/cpu")
COLUMNS = ["dataset", "overrides", "inference_mode", "split", "image_AUROC", "pixel_AUROC", "pixel_AUPRO",
           "train_seconds"]  # fmt: skip


def train_and_score(dataset: str, data_root: Path, overrides: list[str]) -> list[dict]:
    """Fit the CPU config with ``overrides`` and score the validation half in both inference modes."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from anomalib.cli import AnomalibCLI
    from lightning.pytorch import seed_everything

    sub, category, texture = DATASETS[dataset]
    seed_everything(42, workers=True)
    args = ["fit", "--config", str(CONFIG), "--trainer.enable_progress_bar", "false",
            "--data.root", str(data_root / sub), "--data.category", category, *(TEXTURE_ARGS if texture else [])]  # fmt: skip
    cli = AnomalibCLI(args=[*args, *overrides], run=False)
    start = time.perf_counter()
    cli.engine.fit(model=cli.model, datamodule=cli.datamodule)
    seconds = round(time.perf_counter() - start, 1)
    model = cli.model.cpu().eval()
    rows = []
    for mode in ("norm_guided", "average"):
        model.model.inference_mode = mode
        metrics = raw_metrics(model, cli.datamodule.val_dataloader())
        rows.append({"dataset": dataset, "overrides": shlex.join(overrides) or "(config)", "inference_mode": mode,
                     "split": "val", **metrics, "train_seconds": seconds})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    """Markdown table of the rows, best validation pixel AUROC + AUPRO first."""
    key = lambda row: -(float(row["pixel_AUROC"]) + float(row["pixel_AUPRO"]))  # noqa: E731
    lines = ["| dataset | overrides | inference mode | image AUROC | pixel AUROC | pixel AUPRO | train s |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=key):
        lines.append(f"| {r['dataset']} | `{r['overrides']}` | {r['inference_mode']} | {r['image_AUROC']} | {r['pixel_AUROC']} "
                     f"| {r['pixel_AUPRO']} | {r['train_seconds']} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, "diffusion_ad_validation")
    args = parser.parse_args(argv)
    rows = update_csv(args.csv, [] if args.render else train_and_score(args.dataset, args.data_root, args.overrides), COLUMNS)
    report(rows, summary(rows), args, "diffusion_ad_validation.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
