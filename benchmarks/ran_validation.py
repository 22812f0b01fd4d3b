"""RAN's inference choices and ablations on the validation half of one sample dataset, from a trained checkpoint.

The raw KL and feature maps of every validation image are computed once (``RanModel.level_maps``); each variant
then combines them: single levels vs the ensemble of all levels, pixel (KL) only (``alpha`` 1) vs feature only
(``alpha`` 0) vs both, feature maps standardised or not. ``--guided`` adds the ensemble with gradient denoising on
(Algorithm 1; 100 iterations per image by default, slow on a CPU). Only the validation half of the ``from_test`` split
(seed 42, as ``anomalib-dpnr compare``) is read; the scored test half never is. The last
variants read the checkpoint's per-position statistics (``positional_statistics``) instead of its per-level ones, with
several ``positional_shrinkage`` values, then the checkpoint's own reading with Eq. 11's ``alpha`` or the map
smoothing (``smoothing_sigma``) changed.

    nice python benchmarks/ran_validation.py --ckpt results/Ran/MVTecAD/bottle/latest/weights/lightning/model.ckpt \\
        --csv benchmarks/results/ran_validation_bottle.csv [--guided]
    python benchmarks/ran_validation.py --render benchmarks/results/ran_validation_bottle.csv \\
        benchmarks/results/ran_validation_magnetic_tile.csv --readme src/anomalib_dpnr/models/ran/README.md
"""

from __future__ import annotations

import argparse
import time

import torch
from validation import add_checkpoint_arguments, collect_terms, metrics, parse_checkpoint_arguments, sample_split

from anomalib_dpnr.compare import write_csv
from anomalib_dpnr.components.processing import AnomalyScorer
from anomalib_dpnr.components.statistics import MapStatistics
from anomalib_dpnr.models.ran.ensemble import ensemble

SHRINKAGES = (0.0, 0.01, 0.1, 0.3, 1.0)  # positional_shrinkage values read on the same maps
ALPHAS = (0.25, 0.6, 0.75, 0.9)  # Eq. 11's pixel weight around the reference's 1 : 1, under the checkpoint's own reading
SIGMAS = (2.0, 8.0)  # map smoothing around the configs' 4 px, under the checkpoint's own reading
COLUMNS = ["dataset", "variant", "levels", "alpha", "normalise_features", "gradient_denoising", "image_AUROC", "pixel_AUROC",
           "pixel_AUPRO", "seconds"]  # fmt: skip


def combine(module, kl: torch.Tensor, feature: torch.Tensor, levels: list[int], alpha: float, normalise: bool,
            per_position: bool = False, shrinkage: float | None = None, sigma: float | None = None) -> tuple:  # fmt: skip
    """Scores and smoothed maps of Eq. 11 over the chosen ``levels`` with the checkpoint's statistics (smoothed with
    ``sigma``, default the checkpoint's ``smoothing_sigma``)."""
    stored = module.model.normaliser
    normaliser = MapStatistics((2, len(levels)), stored.size, stored.shrinkage if shrinkage is None else shrinkage)
    normaliser.fit({name: buffer[:, levels] for name, buffer in stored.named_buffers() if name != "fitted"})
    reading = "position" if per_position else "standard"
    scorer = module.model.scorer if sigma is None else AnomalyScorer(sigma, module.model.scorer.top_k)
    maps, scores = scorer(ensemble(kl[levels], feature[levels], normaliser, alpha, normalise, reading))
    return scores, maps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser, "ran_validation")
    parser.add_argument("--guided", action="store_true", help="also score with gradient denoising on (slow)")
    args = parse_checkpoint_arguments(parser, argv, "ran_validation.py")
    if args is None:
        return 0
    from anomalib_dpnr import Ran

    # the configured alpha, not one fitted on this validation half: these readings vary it themselves
    module = Ran.load_from_checkpoint(args.ckpt, alpha_choices=None).eval()
    loader = sample_split(args.dataset, args.data_root).val_dataloader()
    start = time.perf_counter()
    kl, feature, labels, masks = collect_terms(module, loader, module.model.level_maps, dim=1)
    seconds = round(time.perf_counter() - start, 1)
    count = kl.shape[0]
    steps = module.model.inference_timesteps
    variants = [("ensemble (Eq. 11: per-level statistics, KL standardised)", list(range(count)), module.model.alpha, False)]
    variants += [(f"level t={steps[i]}", [i], module.model.alpha, False) for i in range(count)]
    variants += [("KL only", list(range(count)), 1.0, False), ("feature only", list(range(count)), 0.0, False)]
    variants += [("both standardised, per-level statistics", list(range(count)), 0.5, True)]
    rows = []
    for name, levels, alpha, normalise in variants:
        scores, maps = combine(module, kl, feature, levels, alpha, normalise)
        rows.append({"dataset": args.dataset, "variant": name, "levels": " ".join(str(steps[i]) for i in levels), "alpha": alpha,
                     "normalise_features": normalise, "gradient_denoising": False, **metrics(scores, labels, maps, masks),
                     "seconds": seconds})  # fmt: skip
        print(rows[-1], flush=True)
    every = list(range(count))
    per_position = [("KL standardised, per-position statistics", 0.5, False, None, every)]
    per_position += [(f"both standardised, per-position statistics, shrinkage {value:g}", 0.5, True, value, every) for value in SHRINKAGES]
    # one level alone under the checkpoint's own reading: a third of the denoiser passes
    own = module.model.normaliser.shrinkage
    per_position += [(f"level t={steps[i]}, both standardised, per-position statistics, shrinkage {own:g}", 0.5, True, own, [i]) for i in range(count)]
    per_position = [(*variant, True, None) for variant in per_position]
    config = module.model
    own_reading = (config.normalise_features, own, every, config.positional_statistics)
    per_position += [(f"the checkpoint's reading, alpha {a:g}", a, *own_reading, None) for a in ALPHAS]
    per_position += [(f"the checkpoint's reading, smoothing sigma {g:g}", config.alpha, *own_reading, g) for g in SIGMAS]
    for name, alpha, normalise, shrinkage, levels, positional, sigma in per_position:
        scores, maps = combine(module, kl, feature, levels, alpha, normalise, positional, shrinkage, sigma)
        rows.append({"dataset": args.dataset, "variant": name, "levels": " ".join(str(steps[i]) for i in levels), "alpha": alpha,
                     "normalise_features": normalise, "gradient_denoising": False, **metrics(scores, labels, maps, masks),
                     "seconds": seconds})  # fmt: skip
        print(rows[-1], flush=True)
    if args.guided:
        module.model.gradient_denoising = True
        start = time.perf_counter()
        kl, feature, labels, masks = collect_terms(module, loader, module.model.level_maps, dim=1)
        scores, maps = combine(module, kl, feature, list(range(count)), module.model.alpha, module.model.normalise_features)
        rows.append({"dataset": args.dataset, "variant": "ensemble, gradient denoising", "levels": " ".join(map(str, steps)),
                     "alpha": module.model.alpha, "normalise_features": module.model.normalise_features, "gradient_denoising": True,
                     **metrics(scores, labels, maps, masks), "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
        print(rows[-1], flush=True)
    write_csv(args.csv, rows, COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
