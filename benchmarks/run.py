"""The project's comparison runs: ``anomalib-dpnr compare`` (``anomalib_dpnr.compare``) from a source checkout.

The same arguments; the README blocks it fills name this script as their generator. Examples:

    python benchmarks/run.py --datasets bottle magnetic_tile --seeds 0 1 2 --csv benchmarks/results/comparison_cpu.csv --readme README.md
    python benchmarks/run.py --variant "configs/dpnr/cpu.yaml --model.dp_sni false" --datasets bottle --csv /tmp/ablation.csv
    python benchmarks/run.py --quick --csv /tmp/quick.csv      # tiny generated dataset, one epoch
    python benchmarks/run.py --render --csv benchmarks/results/comparison_cpu.csv --readme README.md
"""

from __future__ import annotations

import shlex
import sys

from anomalib_dpnr.compare import parser, run

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(run(parser().parse_args(argv), "python benchmarks/run.py " + shlex.join(argv)))
