"""Sweep DPNR's inference choices on trained checkpoints: noise levels, map terms, image-score source.

Nothing is retrained: each checkpoint's denoiser, DP-SNI and repository are fixed, and each setting only
changes how the test image is corrupted and how the discrepancy is read (``inference_timesteps``,
``pixel_weight``/``feature_weight``, ``smoothing_sigma``, ``score_from``). Choose on the validation half (``split=val``); the
test half (``split=test``) is the benchmark's scored half and is reported for the chosen setting only to
show how it transfers. Given several checkpoints (model seeds of one config), every metric is their mean and the
choice is the setting with the best mean, so it does not ride on one seed. Same data, 128 px pre-processing and ``from_test`` split (seed 42) as
``anomalib-dpnr compare``: sample-data folders from ``anomalib_dpnr.compare.DATASETS``, split from
``configs/dpnr/cpu.yaml``'s data section.

    anomalib train --config configs/dpnr/cpu.yaml        # or the checkpoint benchmarks/run.py left in results/
    python benchmarks/dpnr_inference.py --ckpt results/Dpnr/MVTecAD/bottle/v0/weights/lightning/model.ckpt \\
        --dataset bottle --csv benchmarks/results/dpnr_inference_bottle.csv   # --ckpt A B C: several seeds
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch
import yaml
from validation import mask_like, metrics

from anomalib_dpnr.compare import DATASETS, read_csv, update_readme, write_csv
from anomalib_dpnr.config_files import config_path

CONFIG = config_path("dpnr/cpu")  # whose data section (split, seed, batch size) the sweep uses
TIMESTEPS = [(50,), (100,), (200,), (300,), (50, 100), (100, 200), (100, 200, 300)]
WEIGHTS = [(1.0, 0.1), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)]  # (pixel_weight, feature_weight)
SIGMAS = [2.0, 4.0]  # smoothing_sigma of the anomaly map
COLUMNS = ["inference_timesteps", "pixel_weight", "feature_weight", "smoothing_sigma", "score_from", "split",
           "image_AUROC", "pixel_AUROC", "pixel_AUPRO", "checkpoint_setting", "checkpoint"]  # fmt: skip
SETTING = COLUMNS[:5]  # the columns that name one way of reading the maps
METRICS = COLUMNS[6:9]  # image_AUROC, pixel_AUROC, pixel_AUPRO


def maps(model, loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """Pixel and feature discrepancy maps, labels and masks (at the model's input size) over a dataloader."""
    pixel, feature, labels, masks = [], [], [], []
    for batch in loader:
        images = model.pre_processor.transform(batch.image)
        p, f = model.model.mean_discrepancy(images, features=True)  # scores() weighs the terms
        pixel.append(p), feature.append(f), labels.append(batch.gt_label)
        masks.append(mask_like(batch.gt_mask, images))
    return torch.cat(pixel), torch.cat(feature), torch.cat(labels), torch.cat(masks)


def scores(model, pixel, feature, labels, masks, weights, score_from, sigma=None) -> dict[str, float]:  # noqa: ANN001
    """Image/pixel AUROC and PRO of one way of reading the maps, read by ``DpnrModel.score_maps`` itself.

    ``sigma``: the anomaly map's smoothing (``None``: the model's own).
    """
    from anomalib_dpnr.components import AnomalyScorer

    model.model.pixel_weight, model.model.feature_weight = weights
    model.model.score_from = score_from
    if sigma is not None and sigma != model.model.scorer.sigma:
        model.model.scorer = AnomalyScorer(sigma, model.model.scorer.top_k)
    out = model.model.score_maps(pixel, feature)
    return metrics(out.pred_score, labels, out.anomaly_map, masks)


def sweep(args: argparse.Namespace, ckpt: Path) -> list[dict]:
    """Every setting's metrics on the validation and the test half, for one checkpoint."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from anomalib.data import MVTecAD

    from anomalib_dpnr import Dpnr

    model = Dpnr.load_from_checkpoint(ckpt, map_location="cpu").eval()
    own = (model.model.inference_timesteps, (model.model.pixel_weight, model.model.feature_weight), model.model.scorer.sigma,
           model.model.score_from)  # fmt: skip
    sub, category, _ = DATASETS[args.dataset]
    init = yaml.safe_load(CONFIG.read_text())["data"]["init_args"]
    data = MVTecAD(**{**init, "root": args.data_root / sub, "category": category, "num_workers": 0})
    data.setup()
    rows = []
    with torch.no_grad():
        for timesteps in [tuple(map(int, t.split())) for t in args.timesteps] if args.timesteps else TIMESTEPS:
            model.model.inference_timesteps = timesteps
            for split, loader in (("val", data.val_dataloader()), ("test", data.test_dataloader())):
                computed = maps(model, loader)
                for weights, sigma, score_from in ((w, s, f) for w in WEIGHTS for s in args.sigmas for f in ("pixel", "map")):
                    row = {"inference_timesteps": " ".join(map(str, timesteps)), "pixel_weight": weights[0],
                           "feature_weight": weights[1], "smoothing_sigma": sigma, "score_from": score_from, "split": split,
                           **scores(model, *computed, weights, score_from, sigma),
                           "checkpoint_setting": (timesteps, weights, sigma, score_from) == own, "checkpoint": str(ckpt)}  # fmt: skip
                    rows.append(row)
                    print(row, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, nargs="+", default=[], help="Dpnr checkpoint(s), e.g. one per model seed (not needed with --render)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="bottle")
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--csv", type=Path, required=True)
    parser.add_argument("--readme", type=Path, action="append", default=[], help="README(s) whose summary table to update")
    parser.add_argument("--key", default="dpnr_inference", help="README marker key")
    parser.add_argument("--render", action="store_true", help="compute nothing: redo the summary and README table from --csv")
    parser.add_argument("--timesteps", nargs="+", help='level sets to try, e.g. "100" "100 200" (default: all of TIMESTEPS)')
    parser.add_argument("--sigmas", nargs="+", type=float, default=SIGMAS, help="anomaly-map smoothing sigmas to try")
    args = parser.parse_args(argv)
    if args.render:
        numbers = ["pixel_weight", "feature_weight", "smoothing_sigma", *METRICS]
        rows = [{**row, **{c: float(row[c]) for c in numbers}, "checkpoint_setting": row["checkpoint_setting"] == "True"}
                for row in read_csv(args.csv)]  # fmt: skip
    else:
        missing = [str(ckpt) for ckpt in args.ckpt if not ckpt.is_file()] or ([] if args.ckpt else ["(none given)"])
        if missing:
            print(f"no checkpoint at {', '.join(missing)}: train one first (see this script's docstring)", file=sys.stderr)
            return 2
        rows = [row for ckpt in args.ckpt for row in sweep(args, ckpt)]
        write_csv(args.csv, rows, COLUMNS)
    rows, count = mean_over_checkpoints(rows)
    val = [row for row in rows if row["split"] == "val"]
    best = max(val, key=lambda row: (row["pixel_AUROC"], row["image_AUROC"]))
    same = lambda row: all(row[c] == best[c] for c in SETTING)  # noqa: E731
    test = next(row for row in rows if row["split"] == "test" and same(row))
    mine = [row for row in rows if row["checkpoint_setting"]]
    table = summary(rows, mine, best, test, count)
    print(table)
    for readme in args.readme:
        update_readme(readme, args.key, table, "python benchmarks/dpnr_inference.py " + shlex.join(argv if argv is not None else sys.argv[1:]))
    return 0


def mean_over_checkpoints(rows: list[dict]) -> tuple[list[dict], int]:
    """One row per setting and split, metrics averaged over the checkpoints (rows without one count as one)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[c] for c in [*SETTING, "split"]), []).append(row)
    count = max(len(group) for group in groups.values())
    if any(len(group) != count for group in groups.values()):
        msg = "every checkpoint must have been swept over the same settings"
        raise ValueError(msg)
    mean = lambda group, c: round(sum(r[c] for r in group) / len(group), 4)  # noqa: E731
    return [{**group[0], **{c: mean(group, c) for c in METRICS},
             "checkpoint_setting": all(r["checkpoint_setting"] for r in group)} for group in groups.values()], count  # fmt: skip


def summary(rows: list[dict], mine: list[dict], best: dict, test: dict, count: int = 1) -> str:
    """Markdown: validation pixel AUROC per level set, smoothing and map terms; the checkpoint's and the best setting on val and test."""
    val = {tuple(r[c] for c in SETTING): r for r in rows if r["split"] == "val"}
    levels = list(dict.fromkeys(key[0] for key in val))
    groups = sorted(dict.fromkeys((key[0], key[3]) for key in val), key=lambda g: (levels.index(g[0]), g[1]))  # (levels, sigma)
    (p0, f0) = WEIGHTS[0]
    head = ["levels", "sigma", *(f"pixel AUROC {p:g} pix + {f:g} feat" for p, f in WEIGHTS),
            f"image AUROC (pixel score, {p0:g} pix + {f0:g} feat)", "image AUROC (map score)"]  # fmt: skip
    over = f", mean over {count} checkpoints (model seeds)" if count > 1 else ""
    lines = [f"Validation half, by noise levels, map smoothing and map terms{over}:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t, sigma in groups:
        cells = [str(val[(t, p, f, sigma, "pixel")]["pixel_AUROC"]) for p, f in WEIGHTS]
        cells += [str(val[(t, p0, f0, sigma, "pixel")]["image_AUROC"]), str(val[(t, p0, f0, sigma, "map")]["image_AUROC"])]
        lines.append(f"| {t} | {sigma:g} | " + " | ".join(cells) + " |")
    lines += ["", "| setting | split | image_AUROC | pixel_AUROC | pixel_AUPRO |", "|---|---|---|---|---|"]
    for name, picked in (("checkpoint's own", mine), ("best on val (pixel AUROC)", [best, test])):
        for r in picked:
            setting = (f"{name}: levels {r['inference_timesteps']}, {r['pixel_weight']:g} pix + {r['feature_weight']:g} feat, "
                       f"sigma {r['smoothing_sigma']:g}, score from {r['score_from']}")  # fmt: skip
            lines.append(f"| {setting} | {r['split']} | {r['image_AUROC']} | {r['pixel_AUROC']} | {r['pixel_AUPRO']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
