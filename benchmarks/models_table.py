"""Write the README's model table: model, paper, status and one line of headline numbers from comparison CSVs.

The headline of a model on a dataset is its pixel AUROC / PRO (mean ± std when the CSVs hold several seeds of the
same config) beside the baseline it has to beat there (PatchCore on bottle, PaDiM on magnetic_tile), and its
inference time as a multiple of PatchCore's from the speed runs given with ``--speed`` (each timed its models with
PatchCore in the same run, so the multiples compare). Rows of several CSVs (e.g. one per seed) are pooled;
``--csv PATH@magnetic_tile`` takes only that dataset's rows of a CSV (e.g. when a newer CSV replaces its bottle rows),
``--csv PATH@magnetic_tile:Padim,DiffusionAD`` only those models' rows on it.

    python benchmarks/models_table.py --csv benchmarks/results/comparison_cpu.csv --speed benchmarks/results/inference_speed_cpu.csv --readme README.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from anomalib_dpnr.compare import read_csv, summarise, update_readme

# (shown name, class in anomalib_dpnr, paper, README, its CPU config); a model without a config is planned.
MODELS = [
    ("DPNR", "Dpnr", "dual-prototype noise repository (DP-SNI, RHN-Loss)", "src/anomalib_dpnr/models/dpnr/README.md", "configs/dpnr/cpu.yaml"),
    ("DiffusionAD", "DiffusionAD", "Zhang et al., DiffusionAD", "src/anomalib_dpnr/models/diffusion_ad/README.md", "configs/diffusion_ad/cpu.yaml"),
    ("D3AD", "D3AD", "Tebbe & Tayyub, Dynamic Addition of Noise (with DDAD)", "src/anomalib_dpnr/models/d3ad/README.md", "configs/d3ad/cpu.yaml"),
    ("DiAD", "DiAD", "He et al., DiAD (Semantic-Guided latent diffusion)", "src/anomalib_dpnr/models/diad/README.md", "configs/diad/cpu.yaml"),
    ("RAN", "Ran", "Lu et al., Removing Anomalies as Noises", "src/anomalib_dpnr/models/ran/README.md", "configs/ran/cpu.yaml"),
]  # fmt: skip
TARGETS = {"bottle": "Patchcore", "magnetic_tile": "Padim"}  # the baseline each dataset's headline compares with
BFLOAT16 = "--model.inference_dtype bfloat16"  # the same weights retested in bfloat16 (compare --retest): its speed is shown too


def _value(row: dict, column: str, digits: int = 3) -> str:
    text = f"{row[column]:.{digits}f}"
    return text + (f" ± {row[column + '_std']:.{digits}f}" if row["seeds"] > 1 else "")


def headline(summary: list[dict], name: str, config: str, speed: list[dict] | None = None) -> str:
    """``pixel AUROC / PRO: bottle 0.958 / 0.824, 3 seeds (Patchcore 0.937 / 0.739); ...; inference on bottle 20x
    PatchCore's`` for one model's config; the multiple comes from ``speed`` (summarised rows of the speed run)."""
    parts = []
    for dataset, reference in TARGETS.items():
        rows = {r["config"]: r for r in summary if r["model"] == name and r["dataset"] == dataset}  # this model's configs
        # the config as shipped; else the config with the fewest other settings (``--trainer.*``, ``--model.*``),
        # named in the line
        other = sorted((c for c in rows if c.startswith(f"{config} --")), key=lambda c: (len(c), c))
        own = [rows[config]] if config in rows else [rows[c] for c in other[:1]]
        base = [r for r in summary if r["model"] == reference and r["dataset"] == dataset]
        if not own or not base:
            continue
        (row,), ref = own, base[0]
        seeds = f", {row['seeds']} seeds" if row["seeds"] > 1 else ", 1 seed"
        seeds += f", `{row['config'][len(config) + 1:]}`" if row["config"] != config else ""
        parts.append(f"{dataset} {_value(row, 'pixel_AUROC')} / {_value(row, 'pixel_AUPRO')}{seeds} "
                     f"({reference} {ref['pixel_AUROC']:.3f} / {ref['pixel_AUPRO']:.3f})")  # fmt: skip
    if not parts:
        return "not benchmarked yet"
    ratios = []
    for row in speed or []:
        if row["model"] == name and row["config"] == config and "infer_x_patchcore" in row:
            fast = next((r for r in speed if r["model"] == name and r["dataset"] == row["dataset"] and r["config"] == f"{config} {BFLOAT16}"), {})
            low = f" ({fast['infer_x_patchcore']:.0f}x in bfloat16)" if "infer_x_patchcore" in fast else ""
            ratios.append(f"inference on {row['dataset']} {row['infer_x_patchcore']:.0f}x{low} PatchCore's")
    return "pixel AUROC / PRO: " + "; ".join(parts + ratios)


def table(rows: list[dict], speed: list[dict] | None = None) -> str:
    summary, speed = summarise(rows), summarise(speed or [])
    lines = ["| model | class | paper | status | headline (CPU configs, 128 px) |", "|---|---|---|---|---|"]
    for name, cls, paper, readme, config in MODELS:
        shown = f"[{name}]({readme})" if readme else name
        status = "implemented" if config else "planned"
        numbers = headline(summary, cls, config, speed) if config else ""
        lines.append(f"| {shown} | `anomalib_dpnr.{cls}` | {paper} | {status} | {numbers} |")
    return "\n".join(lines)


def read_rows(spec: str) -> list[dict]:
    """The rows of ``PATH``; ``PATH@dataset[,dataset]``: of those datasets only; ``...:Model[,Model]``: of those models only."""
    path, _, selection = spec.partition("@")
    datasets, _, models = selection.partition(":")
    rows = read_csv(Path(path))
    for column, names in (("dataset", datasets), ("model", models)):
        if not names:
            continue
        wanted = set(names.split(","))
        if missing := wanted - {row[column] for row in rows}:
            msg = f"{path} has no rows for {column}(s) {sorted(missing)}"
            raise SystemExit(msg)
        rows = [row for row in rows if row[column] in wanted]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", action="append", required=True, help="comparison CSV(s), pooled; PATH@dataset[,dataset][:Model[,Model]]: only those datasets (and models)")
    parser.add_argument("--speed", action="append", default=[], help="speed-run CSV(s), PATH[@dataset[:Model,...]] like --csv: inference multiples of PatchCore come from these only")
    parser.add_argument("--readme", type=Path, action="append", default=[])
    parser.add_argument("--key", default="models")
    args = parser.parse_args(argv)
    rows = [row for spec in args.csv for row in read_rows(spec)]
    text = table(rows, [row for spec in args.speed for row in read_rows(spec)])
    print(text)
    command = "python benchmarks/models_table.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    for readme in args.readme:
        update_readme(readme, args.key, text, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
