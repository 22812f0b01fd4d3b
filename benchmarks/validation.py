"""Choose a config's training length on the validation half: train once, score the validation half every few epochs.

Trains one config (``--config diad/cpu``, with any ``--model.*``/``--trainer.*`` overrides after ``--``) on one sample
dataset with the same data, pre-processing and ``from_test`` split (seed 42) as ``anomalib-dpnr compare``, runs
Lightning's validation loop every ``--every`` epochs up to ``--max-epochs`` (so state a model fits on validation, such
as RAN's level statistics, is fitted as in a normal run) and appends, per validation, the epoch, the training seconds
so far and the image AUROC, pixel AUROC and pixel AUPRO of the raw maps on the *validation* half to ``--csv``. The
scored test half is never read. Pick by validation pixel AUROC + AUPRO. With ``--by-type CSV``, each validation also
appends one row per defect type to that CSV: the metrics over the type's anomalous images and every normal image
(the type is the image's folder name), which shows where a model wins or loses (a defect type with large regions
weighs most in pixel AUROC).

    nice python benchmarks/validation.py --config diad/cpu --dataset bottle --every 6 --max-epochs 36 \\
        --csv benchmarks/results/diad_validation.csv
    python benchmarks/validation.py --csv benchmarks/results/diad_validation.csv --render \\
        --readme src/anomalib_dpnr/models/diad/README.md --key diad_validation
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch.nn import functional as F  # noqa: N812

from anomalib_dpnr.compare import DATASETS, model_class, read_csv, seed_args, texture_args, update_readme, write_csv
from anomalib_dpnr.config_files import config_path

COLUMNS = ["config", "dataset", "overrides", "seed", "epoch", "train_seconds", "image_AUROC", "pixel_AUROC", "pixel_AUPRO"]
TYPE_COLUMNS = [*COLUMNS[:5], "defect", "images", "defect_pixels", *COLUMNS[6:]]


def metrics(scores: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Image AUROC, pixel AUROC and AUPRO of ``[N]`` scores and ``[N, 1, H, W]`` maps against labels and masks."""
    from anomalib.metrics.aupro import _AUPRO
    from sklearn.metrics import roc_auc_score

    pro = _AUPRO()
    pro.update(maps[:, 0], masks[:, 0].int())
    return {
        "image_AUROC": round(float(roc_auc_score(labels.numpy(), scores.numpy())), 4),
        "pixel_AUROC": round(float(roc_auc_score(masks.numpy().ravel(), maps.numpy().ravel())), 4),
        "pixel_AUPRO": round(float(pro.compute()), 4),
    }


def mask_like(gt_mask: torch.Tensor, anomaly_map: torch.Tensor) -> torch.Tensor:
    """``[B, 1, h, w]`` boolean ground truth at the size of ``anomaly_map`` (``[B, 1, h, w]`` or ``[B, h, w]``)."""
    mask = gt_mask.float().reshape(gt_mask.shape[0], 1, *gt_mask.shape[-2:])
    return F.interpolate(mask, size=anomaly_map.shape[-2:], mode="nearest") > 0.5


def collect_terms(module, loader, terms, dim: int = 0) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    """``terms(images)``'s maps (concatenated along ``dim``), labels ``[N]`` and masks ``[N, 1, H, W]`` of every
    image of ``loader``, pre-processed as the model's own."""
    outputs, labels, masks = [], [], []
    with torch.no_grad():
        for batch in loader:
            images = module.pre_processor.transform(batch.image)
            outputs.append(terms(images)), labels.append(batch.gt_label), masks.append(mask_like(batch.gt_mask, images))
    maps = (torch.cat(parts, dim=dim) for parts in zip(*outputs, strict=True))
    return *maps, torch.cat(labels), torch.cat(masks)


def raw_metrics(module, loader) -> dict[str, float]:  # noqa: ANN001
    """``metrics`` of a lightning model's raw scores and maps (``module.model`` on pre-processed images) over ``loader``."""
    scores, labels, maps, masks = [], [], [], []
    with torch.no_grad():
        for batch in loader:
            out = module.model(module.pre_processor.transform(batch.image))
            scores.append(out.pred_score), labels.append(batch.gt_label), maps.append(out.anomaly_map)
            masks.append(mask_like(batch.gt_mask, out.anomaly_map))
    return metrics(torch.cat(scores), torch.cat(labels), torch.cat(maps), torch.cat(masks))


class ValidationScores(Callback):
    """Collects the raw scores and maps of every validation batch and appends one metrics row per validation (and,
    ``by_type``, one per defect type to ``type_rows``)."""

    def __init__(self, row: dict, by_type: bool = False) -> None:
        self.row, self.rows, self.by_type, self.type_rows = row, [], by_type, []

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001, D102
        self.start, self.validation_seconds = time.perf_counter(), 0.0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001, D102
        self.batches, self.types, self.validation_start = [], [], time.perf_counter()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, D102
        maps = outputs.anomaly_map.detach().float().cpu()
        maps = maps.reshape(maps.shape[0], 1, *maps.shape[-2:])
        self.batches.append((outputs.pred_score.detach().float().cpu().reshape(-1), outputs.gt_label.cpu(), maps,
                             mask_like(outputs.gt_mask.cpu(), maps)))  # fmt: skip
        self.types += [Path(path).parent.name for path in outputs.image_path]

    def on_validation_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001, D102
        train_seconds = self.validation_start - self.start - self.validation_seconds
        self.validation_seconds += time.perf_counter() - self.validation_start
        scores, labels, maps, masks = (torch.cat(part) for part in zip(*self.batches, strict=True))
        row = {**self.row, "epoch": trainer.current_epoch + 1, "train_seconds": round(train_seconds, 1)}
        self.rows.append({**row, **metrics(scores, labels, maps, masks)})
        print(self.rows[-1], flush=True)
        if self.by_type:
            self.type_rows += type_rows({**self.row, "epoch": row["epoch"]}, self.types, scores, labels, maps, masks)


def type_rows(row: dict, types: list[str], scores: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor,
              masks: torch.Tensor) -> list[dict]:  # fmt: skip
    """One ``row`` per defect type of the anomalous images: ``metrics`` over its images and every normal image."""
    rows, images = [], list(zip(types, labels.tolist(), strict=True))
    for defect in sorted({kind for kind, label in images if label}):
        keep = torch.tensor([bool(not label or kind == defect) for kind, label in images])
        rows.append({**row, "defect": defect, "images": int((labels.bool() & keep).sum()), "defect_pixels": int(masks[keep].sum()),
                     **metrics(scores[keep], labels[keep], maps[keep], masks[keep])})  # fmt: skip
    return rows


def fit_args(config: str, dataset: str, data_root: Path, seed: int, every: int, max_epochs: int) -> list[str]:
    """``anomalib fit`` arguments of one validation run (``TEXTURE_ARGS`` on textures for the models that take them)."""
    sub, category, texture = DATASETS[dataset]
    path = str(config_path(config))
    model = model_class(path)
    return ["fit", "--config", path, "--trainer.enable_progress_bar", "false",
            "--trainer.max_epochs", str(max_epochs), "--trainer.check_val_every_n_epoch", str(every),
            *seed_args(model, seed), "--data.root", str(data_root / sub), "--data.category", category,
            *texture_args(model, texture)]  # fmt: skip


def train_and_score(config: str, dataset: str, data_root: Path, seed: int, every: int, max_epochs: int,
                    overrides: list[str], by_type: bool = False) -> ValidationScores:  # fmt: skip
    """Fit ``config`` for ``max_epochs`` and score the validation half every ``every`` epochs (its ``rows``, and
    with ``by_type`` its ``type_rows``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from anomalib.cli import AnomalibCLI
    from lightning.pytorch import seed_everything

    if every < 1 or max_epochs < every:
        msg = f"need 1 <= --every <= --max-epochs, got --every {every} --max-epochs {max_epochs}"
        raise ValueError(msg)
    seed_everything(seed, workers=True)
    cli = AnomalibCLI(args=[*fit_args(config, dataset, data_root, seed, every, max_epochs), *overrides], run=False)
    row = {"config": config, "dataset": dataset, "overrides": shlex.join(overrides) or "(config)", "seed": seed}
    scores = ValidationScores(row, by_type)
    cli.engine._cache.args["callbacks"].append(scores)  # noqa: SLF001 (the Engine builds its Trainer lazily)
    cli.engine.fit(model=cli.model, datamodule=cli.datamodule)
    return scores


def update_csv(path: Path, new_rows: list[dict], columns: list[str]) -> list[dict]:
    """The rows already in ``path`` (if any) followed by ``new_rows``, all written back to ``path``."""
    rows = (read_csv(path) if path.is_file() else []) + new_rows
    if new_rows:
        write_csv(path, rows, columns)
    return rows


HEADINGS = {"train_seconds": "train s", "defect_pixels": "defect pixels", "image_AUROC": "image AUROC", "pixel_AUROC": "pixel AUROC",
            "pixel_AUPRO": "pixel AUPRO"}  # fmt: skip


def summary(rows: list[dict], columns: list[str] = COLUMNS) -> str:
    """Markdown table of the rows (``columns`` of them; ``TYPE_COLUMNS`` for ``--by-type`` rows) in the order they were run."""
    lines = ["| " + " | ".join(HEADINGS.get(c, c) for c in columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(f"`{r[c]}`" if c == "overrides" else str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def add_run_arguments(parser: argparse.ArgumentParser, key: str) -> None:
    """Options every validation script shares: dataset, data root, CSV, render-only, README block, CLI overrides."""
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="bottle")
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--csv", type=Path, required=True, help="rows are appended")
    parser.add_argument("--render", action="store_true", help="train nothing: print the table of --csv")
    parser.add_argument("--readme", type=Path, action="append", default=[], help="README(s) whose bench:KEY block to fill")
    parser.add_argument("--key", default=key, help="marker key of the --readme block")
    parser.add_argument("overrides", nargs="*", help="CLI overrides after --, e.g. -- --model.learning_rate 0.0002")


def add_checkpoint_arguments(parser: argparse.ArgumentParser, key: str) -> None:
    """Options of the scripts that score a trained checkpoint's variants on a validation half."""
    parser.add_argument("--render", nargs="+", type=Path, metavar="CSV", help="score nothing: tabulate these CSVs side by side")
    parser.add_argument("--readme", type=Path, action="append", default=[], help="README(s) whose bench:KEY block to fill")
    parser.add_argument("--key", default=key, help="marker key of the --readme block")
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--dataset", default="bottle", choices=list(DATASETS))
    parser.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--csv", type=Path)


def sample_split(dataset: str, data_root: Path, batch_size: int = 16):  # noqa: ANN201
    """``dataset``'s datamodule, set up with ``anomalib-dpnr compare``'s split (``from_test``, half, seed 42): its
    ``train_data`` and the validation half (``val_dataloader()``)."""
    from anomalib.data import MVTecAD

    sub, category, _ = DATASETS[dataset]
    data = MVTecAD(root=data_root / sub, category=category, eval_batch_size=batch_size, num_workers=0,
                   val_split_mode="from_test", val_split_ratio=0.5, seed=42)  # fmt: skip
    data.setup()
    return data


def table(paths: list[Path]) -> str:
    """Markdown: one row per variant, image AUROC / pixel AUROC / PRO per dataset (CSV) side by side."""
    by_dataset = {path: {row["variant"]: row for row in read_csv(path)} for path in paths}
    variants = list(dict.fromkeys(variant for rows in by_dataset.values() for variant in rows))
    names = [next(iter(rows.values()))["dataset"] for rows in by_dataset.values()]
    lines = ["| variant | " + " | ".join(f"{name}: image AUROC / pixel AUROC / PRO" for name in names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for variant in variants:
        cells = []
        for rows in by_dataset.values():
            row = rows.get(variant)
            cells.append(" / ".join(f"{float(row[key]):.3f}" for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")) if row else "")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_checkpoint_arguments(parser: argparse.ArgumentParser, argv: list[str] | None, script: str) -> argparse.Namespace | None:
    """Parsed ``add_checkpoint_arguments`` options; ``None`` after ``--render`` wrote the variant table of the CSVs."""
    args = parser.parse_args(argv)
    if args.render:
        report([], table(args.render), args, script, argv)
        return None
    if args.ckpt is None or args.csv is None:
        parser.error("--ckpt and --csv are required unless --render")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return args


def report(rows: list[dict], table: str, args: argparse.Namespace, script: str, argv: list[str] | None) -> None:
    """Print ``table`` and write it, with the command that made it, into each ``--readme``."""
    print(table)
    for readme in args.readme:
        update_readme(readme, args.key, table, f"python benchmarks/{script} " + shlex.join(argv if argv is not None else sys.argv[1:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="diad/cpu", help="a packaged config name or a YAML path")
    parser.add_argument("--seed", type=int, default=0, help="model seed")
    parser.add_argument("--every", type=int, default=6, help="validate every this many epochs")
    parser.add_argument("--max-epochs", type=int, default=36)
    add_run_arguments(parser, "validation")
    parser.add_argument("--by-type", type=Path, metavar="CSV", help="also append per-defect-type rows to this CSV (with --render: tabulate it)")
    args = parser.parse_args(argv)
    if args.render and args.by_type is not None:  # the per-type table of that CSV
        report([], summary(read_csv(args.by_type), TYPE_COLUMNS), args, "validation.py", argv)
        return 0
    if not args.render:
        scores = train_and_score(args.config, args.dataset, args.data_root, args.seed, args.every, args.max_epochs,
                                 args.overrides, args.by_type is not None)  # fmt: skip
        if args.by_type is not None:
            update_csv(args.by_type, scores.type_rows, TYPE_COLUMNS)
    rows = update_csv(args.csv, [] if args.render else scores.rows, COLUMNS)
    report(rows, summary(rows), args, "validation.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
