"""``anomalib-dpnr compare``: train and test models side by side on one dataset split; CSV, plot, markdown table.

Every (seed, config, dataset) job runs in its own Python process through anomalib's CLI classes, so its peak
RSS is its own. All jobs share the data, the configs' input size, the validation split (``from_test``: half of
the test images, stratified, with a fixed ``--split-seed``, fit thresholds and normalisation; metrics come from
the other, disjoint half) and, per seed, the model seed. A run always includes PatchCore as the speed
reference: ``train_x_patchcore``/``infer_x_patchcore`` divide a row's times by PatchCore's on the same dataset
in the same run, with the same seed (``run_id``). ``--seeds 0 1 2`` runs every model once per seed; the table
gives mean and standard deviation over the seeds.

    anomalib-dpnr compare --mvtec ~/data/mvtec_ad bottle --models dpnr Patchcore Padim --seeds 0 1 2 --csv out.csv
    anomalib-dpnr compare --folder ~/data/parts good defect masks --models dpnr Padim --csv parts.csv
    anomalib-dpnr compare --sample bottle magnetic_tile --csv out.csv --readme README.md   # the sample data
    anomalib-dpnr compare --render --csv out.csv                                           # table from a CSV
"""

from __future__ import annotations

import argparse
import collections
import csv
import inspect
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

from anomalib_dpnr.config_files import config_names, config_path, display_name

__all__ = [
    "COLUMNS", "DATASETS", "METRICS", "REFERENCE", "TEXTURE_ARGS", "add_ratios", "default_configs", "label", "main",
    "markdown", "merge_rows", "model_class", "plan", "plot", "read_csv", "run_job", "seed_args", "summarise", "texture_args",
    "update_readme", "write_csv",
]  # fmt: skip

COLUMNS = [
    "model", "config", "dataset", "image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_AUPRO",
    "train_seconds", "infer_ms_per_image", "peak_rss_mb", "train_x_patchcore", "infer_x_patchcore",
    "epochs", "seed", "run_id",
]  # fmt: skip
TABLE = COLUMNS[:12]  # markdown columns (plus ``seeds`` when a row averages several)
METRICS = COLUMNS[3:7]
NUMERIC = COLUMNS[3:12]
# Sample data (``--sample``): name -> (root relative to the sample data folder, category, is_texture).
DATASETS = {"bottle": ("mvtec_ad", "bottle", False), "magnetic_tile": (".", "magnetic_tile", True)}
# Synthetic anomalies anywhere on texture images (no object foreground); given to every model with this argument.
TEXTURE_ARGS = ["--model.use_foreground", "false"]
BASELINES = ["configs/baselines/padim_cpu.yaml", "configs/baselines/patchcore_cpu.yaml"]
REFERENCE = "Patchcore"  # speed ratios are relative to this model
# CPU greedy coreset: ~200 s on bottle at 0.01; magnetic_tile has ~4x the patches, so 0.001 there.
DATASET_ARGS = {("magnetic_tile", "Patchcore"): ["--model.coreset_sampling_ratio", "0.001"]}
DATA_KEYS = ("train_batch_size", "eval_batch_size", "num_workers", "val_split_mode", "val_split_ratio")


class Progress(Callback):
    """Prints ``PROGRESS`` lines (epoch, elapsed, estimated time left in the job) for the parent to relay."""

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001, D102
        self.start = time.perf_counter()
        print(f"PROGRESS training {type(pl_module).__name__} for {trainer.max_epochs} epoch(s)", flush=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001, D102
        done, total = trainer.current_epoch + 1, trainer.max_epochs
        elapsed = time.perf_counter() - self.start
        left = elapsed / done * max(total - done, 0)
        print(f"PROGRESS epoch {done}/{total}, {elapsed:.0f} s so far, about {left:.0f} s of training left", flush=True)

    def on_test_start(self, trainer, pl_module) -> None:  # noqa: ANN001, D102
        print("PROGRESS testing", flush=True)


def run_job(
    config: str, data: dict, extra: list[str], seed: int, split_seed: int, label: str | None = None, retest: list[str] | None = None
) -> list[dict]:
    """Fit then test one config on one dataset in this process; return its result row, then one row per ``retest``.

    ``retest``: inference-only overrides (``"--model.inference_dtype bfloat16"``, ``"--model.smoothing_sigma 6"``)
    tested again on the same trained weights (checkpoint reloaded with them), for models that take every overridden
    argument. The reloaded model is validated first, so its normalisation and thresholds are fitted on the validation
    split with the overrides, as after training.

    ``data`` is ``{"kind": "mvtec", "root", "category"}`` or ``{"kind": "folder", "root", "name", "normal_dir",
    "abnormal_dir", "mask_dir"}``; batch sizes, workers and the validation split come from the config's ``data:``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from anomalib.cli import AnomalibCLI
    from lightning.pytorch import seed_everything

    seed_everything(seed, workers=True)  # the anomalib CLI declares but does not apply seed_everything
    args = ["fit", "--config", config, "--trainer.enable_progress_bar", "false", "--data.seed", str(split_seed)]
    if data["kind"] == "mvtec":
        args += ["--data.root", data["root"], "--data.category", data["category"]]
    args += seed_args(model_class(config), seed)
    cli = AnomalibCLI(args=[*args, *extra], run=False)
    engine, model, datamodule = cli.engine, cli.model, cli.datamodule
    if data["kind"] == "folder":
        from anomalib.data import Folder

        given = (_yaml(config).get("data") or {}).get("init_args") or {}
        datamodule = Folder(
            name=data["name"], root=data["root"], normal_dir=data["normal_dir"], abnormal_dir=data["abnormal_dir"],
            mask_dir=data.get("mask_dir"), seed=split_seed, **{key: given[key] for key in DATA_KEYS if key in given},
        )  # fmt: skip
    engine._cache.args["callbacks"].append(Progress())  # noqa: SLF001 (the Engine builds its Trainer lazily)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    train_seconds = time.perf_counter() - start
    (metrics,) = engine.test(model=model, datamodule=datamodule)
    label = label or display_name(config)

    def row(config_label: str, metrics: dict, model) -> dict:  # noqa: ANN001
        return {
            "model": type(model).__name__,
            "config": config_label,
            "dataset": data.get("category") or data["name"],
            **{name: round(float(metrics[name]), 4) for name in METRICS if name in metrics},
            "train_seconds": round(train_seconds, 1),
            "infer_ms_per_image": round(inference_ms_per_image(model, datamodule), 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "epochs": engine.trainer.current_epoch,
            "seed": seed,
        }

    rows = [row(label, metrics, model)]
    for text in retest or []:
        overrides = model_overrides(text)
        if not set(overrides) <= set(inspect.signature(type(model)).parameters):
            continue
        checkpoint = engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
        again = type(model).load_from_checkpoint(checkpoint, **overrides)
        engine.validate(model=again, datamodule=datamodule)  # normalisation and thresholds of this reading
        (metrics,) = engine.test(model=again, datamodule=datamodule)
        rows.append(row(f"{label} {text}", metrics, again))
    return rows


def model_overrides(text: str) -> dict[str, Any]:
    """``"--model.a 1 --model.b x"`` -> ``{"a": 1, "b": "x"}`` (values read as YAML); a clear error otherwise."""
    import yaml

    tokens = shlex.split(text)
    keys, values = tokens[::2], tokens[1::2]
    if not tokens or len(keys) != len(values) or not all(key.startswith("--model.") for key in keys):
        msg = f"--retest takes '--model.<argument> <value>' pairs, got {text!r}"
        raise ValueError(msg)
    return {key.removeprefix("--model."): yaml.safe_load(value) for key, value in zip(keys, values, strict=True)}


def inference_ms_per_image(model, datamodule, passes: int = 3) -> float:  # noqa: ANN001
    """Wall time of the deployable forward (pre-process, model, post-process) per test image, data loading excluded.

    The test batches are loaded first (loader workers would otherwise decode images while the model is timed);
    after a warm-up batch, the fastest of ``passes`` timed passes over them is kept (other processes on a shared
    machine only ever add time).
    """
    import torch

    model.eval()
    device = next(model.parameters()).device
    batches = [batch.image.to(device) for batch in datamodule.test_dataloader()]
    count = sum(images.shape[0] for images in batches)
    best = float("inf")
    with torch.no_grad():
        model(batches[0])  # warm-up
        for _ in range(passes):
            start = time.perf_counter()
            for images in batches:
                model(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return 1000 * best / max(count, 1)


def _yaml(config: str) -> dict:
    import yaml

    return yaml.safe_load(Path(config).read_text())


def texture_args(model: type, texture: bool) -> list[str]:
    """``TEXTURE_ARGS`` for a texture dataset when ``model`` takes them (models without synthetic anomalies do not)."""
    return list(TEXTURE_ARGS) if texture and "use_foreground" in inspect.signature(model).parameters else []


def seed_args(model: type, seed: int) -> list[str]:
    """``--model.seed`` for a model that takes a seed (the plugin models; PaDiM and PatchCore do not)."""
    return ["--model.seed", str(seed)] if "seed" in inspect.signature(model).parameters else []


def model_class(config: str) -> type:
    """The model class a config names (imported, to inspect its arguments)."""
    import importlib

    module, name = _yaml(config)["model"]["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _spec(text: str) -> tuple[str, list[str]]:
    """``"name-or-path [--model.x v ...]"`` -> (config file, extra CLI arguments)."""
    name, *extra = shlex.split(text)
    return str(config_path(name)), extra


def default_configs() -> list[str]:
    """The baselines, then every plugin model's CPU config."""
    plugins = [f"configs/{name}.yaml" for name in config_names() if name.endswith("/cpu") and not name.startswith("baselines/")]
    return [*BASELINES, *plugins]


def add_ratios(rows: list[dict]) -> None:
    """``train_x_patchcore``/``infer_x_patchcore``: times over PatchCore's in the same run, dataset and seed."""
    refs = {(r["run_id"], r["dataset"], str(r.get("seed"))): r for r in rows if r["model"] == REFERENCE}
    for row in rows:
        if (ref := refs.get((row["run_id"], row["dataset"], str(row.get("seed"))))) is None:
            continue
        for column, base in (("train_x_patchcore", "train_seconds"), ("infer_x_patchcore", "infer_ms_per_image")):
            row[column] = round(float(row[base]) / max(float(ref[base]), 1e-9), 2)


def label(row: dict) -> str:
    """``Dpnr`` or, for a variant, ``Dpnr dp_sni=false``."""
    tokens = shlex.split(row["config"])[1:]
    pairs = [f"{k.split('.')[-1]}={v}" for k, v in zip(tokens[::2], tokens[1::2], strict=False)]
    return " ".join([row["model"], *pairs])


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def summarise(rows: list[dict]) -> list[dict]:
    """One row per model/config/dataset, in first-seen order: each numeric column's mean, its sample standard
    deviation over seeds (``<column>_std``, 0 for one seed) and ``seeds`` (how many rows were averaged)."""
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for row in rows:
        groups[(row["model"], row["config"], row["dataset"])].append(row)
    summary = []
    for (model, config, dataset), members in groups.items():
        out: dict[str, Any] = {"model": model, "config": config, "dataset": dataset, "seeds": len(members)}
        for column in NUMERIC:
            values = [v for v in (_number(m.get(column)) for m in members) if v is not None]
            if values:
                out[column] = statistics.fmean(values)
                out[f"{column}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(out)
    return summary


def _cell(row: dict, column: str) -> str:
    if column not in NUMERIC or column not in row:
        return str(row.get(column, ""))
    digits = 4 if column in METRICS else (2 if column.endswith("_x_patchcore") else 1)
    value = f"{row[column]:.{digits}f}" if column != "peak_rss_mb" else f"{row[column]:.0f}"
    if row["seeds"] > 1 and column in METRICS:
        value += f" ± {row[column + '_std']:.{digits}f}"
    return value


def markdown(rows: list[dict]) -> str:
    """A markdown table of the rows; several seeds of a model become one row with mean ± standard deviation."""
    summary = summarise(rows)
    columns = [*TABLE, "seeds"] if any(row["seeds"] > 1 for row in summary) else TABLE
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row, c) for c in columns) + " |" for row in summary]
    return "\n".join(lines)


def plot(rows: list[dict], png: Path) -> None:
    """Bars of the metrics per model for each dataset (mean, with the seeds' spread as error bars), and
    inference time against pixel AUROC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.DataFrame(summarise(rows))
    frame["label"] = [label(row) for row in frame.to_dict("records")]
    for column in [*METRICS, *(f"{m}_std" for m in METRICS), "infer_ms_per_image", "infer_x_patchcore"]:
        frame[column] = pd.to_numeric(frame[column], errors="coerce") if column in frame else float("nan")
    datasets = list(dict.fromkeys(frame["dataset"]))
    fig, axes = plt.subplots(1, len(datasets) + 1, figsize=(5.5 * (len(datasets) + 1), 4.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=False):
        part = frame[frame["dataset"] == dataset].set_index("label")
        errors = part[[f"{m}_std" for m in METRICS]].fillna(0).T.to_numpy()
        part[METRICS].plot.bar(ax=ax, ylim=(0, 1.2), rot=30, title=dataset, width=0.8, yerr=errors, capsize=2)
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
    """``--append``: each new row replaces the old row of the same model/config/dataset/seed where it stood;
    others go last."""
    key = lambda row: (row["model"], row["config"], row["dataset"], str(row.get("seed", "")))  # noqa: E731
    fresh = {key(row): row for row in new}
    merged = [fresh.pop(key(row), row) for row in old]
    return merged + [row for row in new if key(row) in fresh]


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """``rows`` as CSV: the comparison's ``COLUMNS`` (other keys left out), or exactly ``columns`` (other keys an error)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns or COLUMNS, extrasaction="raise" if columns else "ignore")
        writer.writeheader()
        writer.writerows(rows)


def _datasets(args: argparse.Namespace) -> list[tuple[str, dict, bool]]:
    """(name, data spec, is_texture) for every dataset the arguments name; variants run on the first ``--sample``."""
    from anomalib_dpnr.data import make_synthetic_dataset

    if args.quick and not (args.mvtec or args.folder or args.sample):
        root = make_synthetic_dataset(Path(tempfile.mkdtemp()), image_size=64, num_train=8, num_test_good=4, num_test_defect=4)
        return [("woven", {"kind": "mvtec", "root": str(root), "category": "woven"}, True)]
    places = []
    for root, category in args.mvtec:
        if not (Path(root) / category / "train" / "good").is_dir():
            msg = f"--mvtec {root} {category}: no {Path(root) / category / 'train' / 'good'} folder (MVTec layout)"
            raise FileNotFoundError(msg)
        places.append((category, {"kind": "mvtec", "root": str(Path(root).resolve()), "category": category}, args.texture))
    for spec in args.folder:
        if len(spec) not in (3, 4):
            msg = f"--folder takes ROOT NORMAL_DIR ABNORMAL_DIR [MASK_DIR], got {len(spec)} values: {spec}"
            raise ValueError(msg)
        root, normal, abnormal, mask = [*spec, None][:4]
        for sub in filter(None, (normal, abnormal, mask)):
            if not (Path(root) / sub).is_dir():
                msg = f"--folder {' '.join(spec)}: {Path(root) / sub} is not a folder"
                raise FileNotFoundError(msg)
        name = Path(root).resolve().name
        data = {"kind": "folder", "root": str(Path(root).resolve()), "name": name, "normal_dir": normal,
                "abnormal_dir": abnormal, "mask_dir": mask}  # fmt: skip
        places.append((name, data, args.texture))
    if args.sample or not places:
        from anomalib_dpnr.cli import find_shared_data

        shared = args.data_root or find_shared_data()
        if shared is None:
            msg = "no dataset: give --mvtec ROOT CATEGORY or --folder ROOT NORMAL ABNORMAL [MASK] (or --data-root for --sample)"
            raise FileNotFoundError(msg)
        for name in args.sample or list(DATASETS):
            sub, category, texture = DATASETS[name]
            places.append((name, {"kind": "mvtec", "root": str((Path(shared) / sub).resolve()), "category": category}, texture))
    return places


def plan(args: argparse.Namespace) -> list[dict]:
    """The jobs of a run, seed by seed: every config on every dataset, variants on the first dataset only
    (``--variant-datasets`` for sample data), PatchCore included."""
    from anomalib_dpnr.cli import quick_args

    for text in args.retest:
        model_overrides(text)  # a malformed --retest fails before any training
    places = _datasets(args)
    names = [name for name, _, _ in places]
    variant_names = [n for n in names if n in args.variant_datasets] or names[:1]
    specs = [(_spec(s), names) for s in [*args.models, *(args.config or [])] or default_configs()]
    specs += [(_spec(s), variant_names) for s in args.variant]
    if args.reference and not any(model_class(path).__name__ == REFERENCE for (path, _), _ in specs):
        print(f"compare: adding {BASELINES[1]} as the speed reference", flush=True)
        specs.insert(0, ((str(config_path(BASELINES[1])), []), names))
    jobs = []
    for seed in args.seeds:
        for (config, extra), datasets in specs:
            model = model_class(config)
            for name, data, texture in places:
                if name not in datasets:
                    continue
                given = [*DATASET_ARGS.get((name, model.__name__), []), *texture_args(model, texture)]
                if args.quick:
                    given += quick_args(config)
                elif args.max_epochs is not None and "max_epochs" in (_yaml(config).get("trainer") or {}):
                    # only configs that set epochs: PaDiM/PatchCore fix their own (1) and would skip validation
                    given += ["--trainer.max_epochs", str(args.max_epochs), "--trainer.check_val_every_n_epoch", str(args.max_epochs)]
                shown = " ".join([display_name(config), *map(shlex.quote, extra)])
                jobs.append({"config": config, "data": data, "extra": [*given, *extra], "seed": seed, "split_seed": args.split_seed,
                             "label": shown, "retest": args.retest, "_model": model.__name__})  # fmt: skip
    return jobs


def _time_left(jobs: list[dict], took: dict[tuple, float]) -> str:
    """Estimate for ``jobs`` from earlier seeds' times of the same config and dataset."""
    timed = [took[key] for job in jobs if (key := (job["label"], str(job["data"]))) in took]
    total = sum(timed)
    took_text = f"{total / 60:.0f} min" if total >= 120 else f"{total:.0f} s"
    text = f"about {took_text} for {len(timed)} job(s) timed on an earlier seed" if timed else ""
    if untimed := len(jobs) - len(timed):
        text += (", " if text else "") + f"{untimed} job(s) not timed yet"
    return text


def run_jobs(jobs: list[dict], run_id: str) -> tuple[list[dict], list[str]]:
    """Run every job in its own process, relaying its progress; return the rows and the failures."""
    rows, failed, took = [], [], {}
    for index, job in enumerate(jobs):
        job.pop("_model")  # the model class name: for building and ordering jobs, not an argument of the job
        dataset = job["data"].get("category") or job["data"]["name"]
        title = f"job {index + 1}/{len(jobs)}: {job['label']} on {dataset}, seed {job['seed']}"
        print(f"compare: {title} (left, this one included: {_time_left(jobs[index:], took)})", flush=True)
        start = time.perf_counter()
        with tempfile.TemporaryFile("w+") as errors:
            child = subprocess.Popen(
                [sys.executable, "-m", "anomalib_dpnr.compare", "--job", json.dumps(job)], stdout=subprocess.PIPE,
                stderr=errors, text=True,
            )  # fmt: skip
            tail: collections.deque[str] = collections.deque(maxlen=60)
            found = []
            for line in child.stdout:
                if line.startswith("PROGRESS "):
                    print(f"compare: job {index + 1}/{len(jobs)}: {line.removeprefix('PROGRESS ').strip()}", flush=True)
                elif line.startswith("BENCHMARK_ROW "):
                    found.append(line)
                else:
                    tail.append(line)
            child.wait()
            errors.seek(0)
            stderr = errors.read()
        took[(job["label"], str(job["data"]))] = time.perf_counter() - start
        if child.returncode != 0 or not found:
            print("".join(tail), stderr[-5000:], sep="\n", file=sys.stderr)
            failed.append(f"{job['label']} on {dataset}, seed {job['seed']} (exit {child.returncode})")
            print(f"compare: job {failed[-1]} FAILED", file=sys.stderr, flush=True)
            continue
        for line in found:
            rows.append({**json.loads(line.removeprefix("BENCHMARK_ROW ")), "run_id": run_id})
            print("compare: " + json.dumps(rows[-1]), flush=True)
    return rows, failed


def parser() -> argparse.ArgumentParser:
    """The ``compare`` arguments (also used by ``anomalib-dpnr compare``)."""
    p = argparse.ArgumentParser(prog="anomalib-dpnr compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``compare`` arguments to ``p``."""
    data = p.add_argument_group("data (any mix; default: the sample data)")
    data.add_argument("--mvtec", nargs=2, action="append", default=[], metavar=("ROOT", "CATEGORY"),
                      help="an MVTec-layout dataset: ROOT/CATEGORY/{train/good,test/*,ground_truth/*} (repeatable)")  # fmt: skip
    data.add_argument("--folder", nargs="+", action="append", default=[], metavar="DIR",
                      help="anomalib Folder data: ROOT NORMAL_DIR ABNORMAL_DIR [MASK_DIR] (dirs relative to ROOT; 20%% of "
                           "the normal images become test images; repeatable)")  # fmt: skip
    data.add_argument("--texture", action="store_true", help="--mvtec/--folder data are textures: synthetic anomalies anywhere")
    data.add_argument("--sample", "--datasets", nargs="+", default=[], choices=list(DATASETS), help="the sample data")
    data.add_argument("--data-root", type=Path, default=None, help="sample data folder (default: ../shared/data)")
    models = p.add_argument_group("models")
    models.add_argument("--models", nargs="+", default=[], metavar="NAME",
                        help="shipped configs by name: dpnr, diffusion_ad (their CPU configs), dpnr/paper, Patchcore, Padim "
                             f"(shipped: {', '.join(config_names())}); default: the baselines and every CPU config")  # fmt: skip
    models.add_argument("--config", action="append", help="'config.yaml-or-name [--model.x v ...]' (repeatable)")
    models.add_argument("--variant", action="append", default=[], help="like --config, run on --variant-datasets only")
    models.add_argument("--variant-datasets", nargs="+", default=["bottle"], help="datasets for --variant (default: bottle, else the first)")
    models.add_argument("--retest", action="append", default=[], metavar="OVERRIDES",
                        help="inference-only '--model.x v' overrides tested again on each trained model that takes them "
                             "(same weights, one more row each), e.g. '--model.inference_dtype bfloat16' (repeatable)")  # fmt: skip
    models.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="add PatchCore when no config names it (speed ratios need it)")  # fmt: skip
    runs = p.add_argument_group("runs and outputs")
    runs.add_argument("--seeds", "--seed", type=int, nargs="+", default=[42], help="model seeds, one run of every model each")
    runs.add_argument("--split-seed", type=int, default=42, help="seed of the validation/test split (the same for every job)")
    runs.add_argument("--max-epochs", type=int, default=None, help="override the configs' trainer.max_epochs (quick checks)")
    runs.add_argument("--quick", action="store_true", help="toy models, one epoch (on a tiny generated dataset unless data is given)")
    runs.add_argument("--csv", type=Path, default=None, help="results CSV (required)")
    runs.add_argument("--plot", type=Path, default=None, help="PNG plot (default: the CSV path with .png)")
    runs.add_argument("--readme", type=Path, action="append", default=[], help="markdown file(s) whose table to update")
    runs.add_argument("--key", default="comparison", help="marker key of the table block")
    runs.add_argument("--append", action="store_true", help="merge into an existing CSV (same model/config/dataset/seed replaced)")
    runs.add_argument("--render", action="store_true", help="run nothing: redraw the plot and tables from --csv")
    runs.add_argument("--job", type=json.loads, help=argparse.SUPPRESS)


def run(args: argparse.Namespace, command: str) -> int:
    """Run a comparison from parsed arguments; ``command`` is what the README block says generated it."""
    if args.job:  # child process
        for row in run_job(**args.job):
            print("BENCHMARK_ROW " + json.dumps(row), flush=True)
        return 0
    if args.csv is None:
        print("compare: --csv PATH is required (where the results go)", file=sys.stderr)
        return 2
    for readme in args.readme:  # before hours of training, not after
        if f"<!-- bench:{args.key} -->" not in readme.read_text():
            print(f"compare: {readme} has no <!-- bench:{args.key} --> ... <!-- /bench:{args.key} --> block", file=sys.stderr)
            return 2
    failed: list[str] = []
    if args.render:
        rows = read_csv(args.csv)
    else:
        from anomalib_dpnr.cli import install_missing_weights

        try:
            jobs = plan(args)
        except (FileNotFoundError, ValueError, KeyError) as error:
            print(f"compare: {error}", file=sys.stderr)
            return 2
        if not args.quick:  # toy models use random-init backbones
            for config in dict.fromkeys(job["config"] for job in jobs):
                if (installed := install_missing_weights(Path(config))) is not None:
                    print(f"compare: installed EfficientNet-Lite0 weights at {installed}", flush=True)
        rows, failed = run_jobs(jobs, time.strftime("%Y%m%d-%H%M%S"))
        add_ratios(rows)
        if args.append and args.csv.is_file():
            rows = merge_rows(read_csv(args.csv), rows)
        if rows:
            write_csv(args.csv, rows)
    if not rows:
        print(f"compare: no results; failed: {failed}", file=sys.stderr)
        return 1
    plot(rows, args.plot or args.csv.with_suffix(".png"))
    table = markdown(rows)
    print(table)
    if failed:  # the rows that passed are in the CSV; README tables stay as they were
        print("compare: FAILED jobs: " + "; ".join(failed), file=sys.stderr)
        return 1
    for readme in args.readme:
        update_readme(readme, args.key, table, command)
    print(f"compare: results in {args.csv} and {args.plot or args.csv.with_suffix('.png')}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m anomalib_dpnr.compare ...`` (the same as ``anomalib-dpnr compare ...``)."""
    argv = sys.argv[1:] if argv is None else argv
    return run(parser().parse_args(argv), "anomalib-dpnr compare " + shlex.join(argv))


if __name__ == "__main__":
    sys.exit(main())
