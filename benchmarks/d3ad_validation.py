"""D3AD's map normalisation on the validation half of one sample dataset, from a trained checkpoint.

The raw latent/pixel and feature distance maps of every validation image are computed once (``D3ADModel.term_maps``);
each variant then normalises them with the checkpoint's statistics of training images: min-max over all pixels (the
reference) or per pixel position with several ``positional_shrinkage`` values (``positional_statistics``). For each,
``feature_weight`` is chosen among ``--weights`` by validation pixel AUROC + PRO, as a run with ``feature_weight_choices``
does, and the row reports that weight's metrics. Only the validation half of the ``from_test`` split (seed 42, as
``anomalib-dpnr compare``) is read; the scored test half never is.

    anomalib fit --config configs/d3ad/cpu.yaml --data.category magnetic_tile --data.root ../shared/data
    nice python benchmarks/d3ad_validation.py --ckpt results/D3AD/MVTecAD/magnetic_tile/latest/weights/lightning/model.ckpt \\
        --dataset magnetic_tile --csv benchmarks/results/d3ad_validation_magnetic_tile.csv
    python benchmarks/d3ad_validation.py --render benchmarks/results/d3ad_validation_bottle.csv \\
        benchmarks/results/d3ad_validation_magnetic_tile.csv --readme src/anomalib_dpnr/models/d3ad/README.md
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from ran_validation import table
from validation import add_checkpoint_arguments, mask_like, metrics, report, validation_loader

from anomalib_dpnr.compare import write_csv
from anomalib_dpnr.components.statistics import MapStatistics

SHRINKAGES = (0.0, 0.01, 0.1, 0.3, 1.0)  # positional_shrinkage values read on the same maps
COLUMNS = ["dataset", "variant", "feature_weight", "image_AUROC", "pixel_AUROC", "pixel_AUPRO", "seconds"]


def raw_maps(module, loader) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    """``[N, 1, H, W]`` latent and feature distance maps, labels ``[N]`` and masks ``[N, 1, H, W]`` of the images."""
    latents, features, labels, masks = [], [], [], []
    with torch.no_grad():
        for batch in loader:
            images = module.pre_processor.transform(batch.image)
            latent, feature, _ = module.model.term_maps(images)
            latents.append(latent), features.append(feature), labels.append(batch.gt_label)
            masks.append(mask_like(batch.gt_mask, images))
    return torch.cat(latents), torch.cat(features), torch.cat(labels), torch.cat(masks)


def best_row(module, latent, feature, labels, masks, statistics: MapStatistics, reading: str, weights) -> dict:  # noqa: ANN001
    """Metrics of the map with the ``feature_weight`` (of ``weights``) whose pixel AUROC + PRO is highest."""
    model = module.model
    base = model.pixel_weight * statistics(latent, 0, reading)
    extra = statistics(feature, 1, reading)
    best = None
    for weight in weights:
        maps, scores = model.scorer(base + weight * extra)
        row = {"feature_weight": weight, **metrics(scores, labels, maps, masks)}
        if best is None or row["pixel_AUROC"] + row["pixel_AUPRO"] > best["pixel_AUROC"] + best["pixel_AUPRO"]:
            best = row
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser, "d3ad_validation")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.15, 0.85, 5.0], help="feature_weight choices")
    args = parser.parse_args(argv)
    if args.render:
        report([], table(args.render), args, "d3ad_validation.py", argv)
        return 0
    if args.ckpt is None or args.csv is None:
        parser.error("--ckpt and --csv are required unless --render")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from anomalib_dpnr import D3AD

    module = D3AD.load_from_checkpoint(args.ckpt).eval()
    stored = module.model.normaliser
    if not bool(stored.fitted):
        parser.error(f"{args.ckpt} holds no fitted map statistics (train with validation at the last epoch)")
    loader = validation_loader(args.dataset, args.data_root)
    start = time.perf_counter()
    latent, feature, labels, masks = raw_maps(module, loader)
    seconds = round(time.perf_counter() - start, 1)
    variants = [("min-max over all pixels (reference)", "minmax", stored.shrinkage)]
    variants += [(f"per-position statistics, shrinkage {value:g}", "position", value) for value in SHRINKAGES]
    rows = []
    for name, reading, shrinkage in variants:
        statistics = MapStatistics((2,), stored.size, shrinkage)
        statistics.load_state_dict(stored.state_dict())
        row = best_row(module, latent, feature, labels, masks, statistics, reading, args.weights)
        rows.append({"dataset": args.dataset, "variant": name, **row, "seconds": seconds})
        print(rows[-1], flush=True)
    write_csv(args.csv, rows, COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
