"""Map normalisation on the validation half of one sample dataset, from a trained D3AD or DPNR checkpoint.

The raw term maps of every validation image (latent/pixel and feature distance) are computed once
(``validation_terms``); each variant then reads them: the model's configured normalisation (D3AD: min-max over
training pixels, the reference; DPNR: none) or per-position statistics of training images with several
``positional_shrinkage`` values (``positional_statistics``). For each, ``feature_weight`` is chosen among
``--weights`` by validation pixel AUROC + PRO, as a run with ``feature_weight_choices`` does, and the row reports
that weight's metrics (maps and image scores exactly as the model's ``score_maps``). Statistics the checkpoint has
not fitted are fitted here on (up to ``statistics_images``) training images. Only the validation half of the
``from_test`` split (seed 42, as ``anomalib-dpnr compare``) is read; the scored test half never is.

``--ddim-steps S ...`` (D3AD) reads the checkpoint once per DDIM step count instead, the statistics refitted on the
training images for each (the maps change with it), each row in the checkpoint's configured reading.

    anomalib fit --config configs/d3ad/cpu.yaml --data.category magnetic_tile --data.root ../shared/data
    nice python benchmarks/statistics_validation.py --model D3AD --dataset magnetic_tile \\
        --ckpt results/D3AD/MVTecAD/magnetic_tile/latest/weights/lightning/model.ckpt \\
        --csv benchmarks/results/d3ad_validation_magnetic_tile.csv
    nice python benchmarks/statistics_validation.py --model D3AD --dataset bottle --ddim-steps 1 2 5 \\
        --ckpt results/D3AD/MVTecAD/bottle/latest/weights/lightning/model.ckpt --csv d3ad_steps_bottle.csv
    python benchmarks/statistics_validation.py --render benchmarks/results/d3ad_validation_bottle.csv \\
        benchmarks/results/d3ad_validation_magnetic_tile.csv --readme src/anomalib_dpnr/models/d3ad/README.md --key d3ad_validation
"""

from __future__ import annotations

import argparse
import time

from validation import add_checkpoint_arguments, collect_terms, metrics, parse_checkpoint_arguments, sample_split

from anomalib_dpnr.compare import write_csv

SHRINKAGES = (0.0, 0.01, 0.1, 0.3, 1.0)  # positional_shrinkage values read on the same maps
COLUMNS = ["dataset", "variant", "feature_weight", "image_AUROC", "pixel_AUROC", "pixel_AUPRO", "seconds"]
REFERENCE = {"D3AD": "min-max over all training pixels (reference)", "Dpnr": "raw terms (no statistics)"}


def best_row(model, first, second, labels, masks, weights) -> dict:  # noqa: ANN001
    """Metrics of ``model.score_maps`` with the ``feature_weight`` (of ``weights``) of highest pixel AUROC + PRO."""
    best = None
    for weight in weights:
        model.feature_weight = weight
        out = model.score_maps(first, second)
        row = {"feature_weight": weight, **metrics(out.pred_score, labels, out.anomaly_map, masks)}
        if best is None or row["pixel_AUROC"] + row["pixel_AUPRO"] > best["pixel_AUROC"] + best["pixel_AUPRO"]:
            best = row
    return best


def timed_terms(module, data) -> tuple:  # noqa: ANN001
    """The validation half's raw term maps, labels and masks (``collect_terms``) and the seconds they took."""
    start = time.perf_counter()
    terms = collect_terms(module, data.val_dataloader(), module.model.validation_terms)
    return (*terms, round(time.perf_counter() - start, 1))


def steps_row(module, data, steps: int, weights: list[float], dataset: str) -> dict:  # noqa: ANN001
    """D3AD read with ``steps`` DDIM steps: statistics refitted on the training images, then the validation half in
    the checkpoint's reading; ``seconds`` is the validation half's scoring time."""
    module.model.ddim_steps = steps
    module.fit_statistics(data.train_data)
    first, second, labels, masks, seconds = timed_terms(module, data)
    row = {"dataset": dataset, "variant": f"{steps} DDIM steps", **best_row(module.model, first, second, labels, masks, weights), "seconds": seconds}
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser, "statistics_validation")
    parser.add_argument("--model", choices=sorted(REFERENCE), default="D3AD")
    parser.add_argument("--weights", type=float, nargs="+", default=None, help="feature_weight choices (default: the checkpoint's)")
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=None, help="D3AD: read these DDIM step counts instead")
    args = parse_checkpoint_arguments(parser, argv, "statistics_validation.py")
    if args is None:
        return 0
    import anomalib_dpnr

    module = getattr(anomalib_dpnr, args.model).load_from_checkpoint(args.ckpt).eval()
    model = module.model
    weights = args.weights or module.feature_weight_choices or [model.feature_weight]
    data = sample_split(args.dataset, args.data_root)
    if args.ddim_steps:
        if args.model != "D3AD":
            parser.error("--ddim-steps reads D3AD checkpoints only")
        rows = [steps_row(module, data, steps, weights, args.dataset) for steps in args.ddim_steps]
        write_csv(args.csv, rows, COLUMNS)
        return 0
    if not bool(model.normaliser.fitted):
        module.fit_statistics(data.train_data)
    first, second, labels, masks, seconds = timed_terms(module, data)
    variants = [(REFERENCE[args.model], False, model.normaliser.shrinkage)]
    variants += [(f"per-position statistics, shrinkage {value:g}", True, value) for value in SHRINKAGES]
    rows = []
    for name, positional, shrinkage in variants:
        model.positional_statistics, model.normaliser.shrinkage = positional, shrinkage
        row = best_row(model, first, second, labels, masks, weights)
        rows.append({"dataset": args.dataset, "variant": name, **row, "seconds": seconds})
        print(rows[-1], flush=True)
    write_csv(args.csv, rows, COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
