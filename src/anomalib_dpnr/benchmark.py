"""Run anomalib's own benchmark pipeline (``anomalib benchmark``) on grids that name plugin models.

anomalib 2.7's pipeline resolves models only under ``anomalib.models``, builds every job's ``Engine`` with
just accelerator/devices (Lightning's default of 1000 epochs for models that do not set ``max_epochs``),
builds result columns from the first job only, and exits 0 when a job fails. :func:`run_benchmark`
adjusts exactly those points in-process, then hands over to ``anomalib.cli.cli.main()``:

- :func:`register` puts the plugin models into ``anomalib.models`` (and the ``MVTec`` alias into
  ``anomalib.data``), so ``class_path: Dpnr`` / ``anomalib.models.Dpnr`` resolve;
- every job's model is built by jsonargparse from the grid entry, as ``anomalib train`` builds it
  (so ``class_path: anomalib_dpnr.Dpnr`` and nested objects such as ``pre_processor``/``evaluator``
  work), after seeding with ``benchmark.seed``;
- a grid entry may be ``{config: configs/dpnr/cpu.yaml, init_args: {...}}``: the ``model:`` section of that
  training config, with ``init_args`` overriding single arguments, so grids never repeat (and drift from)
  the configs users train with (:func:`expand_model`);
- a top-level ``trainer:`` section of the grid file goes to every job's ``Engine`` (a model's own
  ``trainer_arguments``, e.g. PaDiM/PatchCore's one epoch, still win);
- results are collected as the union of all jobs' columns (grid entries may have different ``init_args``);
- the run fails (exit 1) unless every job wrote a row and ``runs/pipeline.log`` got no new error.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

__all__ = ["BenchmarkError", "build_model", "expand_model", "load_grid", "parse_model", "register", "run_benchmark"]

LOG = Path("runs/pipeline.log")  # where anomalib's pipeline logs (relative to the working directory)
RESULTS = Path("runs/benchmark")  # where it writes <timestamp>/results.csv
RESERVED = {"accelerator", "devices", "default_root_dir"}  # set by BenchmarkJob itself


class BenchmarkError(RuntimeError):
    """A benchmark job failed or wrote no results."""


def register() -> None:
    """Make the plugin classes visible where anomalib's ``get_model``/``get_datamodule`` look."""
    import anomalib.data
    import anomalib.models

    import anomalib_dpnr
    from anomalib_dpnr.models import __all__ as models

    for name in models:
        setattr(anomalib.models, name, getattr(anomalib_dpnr, name))
    if not hasattr(anomalib.data, "MVTec"):
        anomalib.data.MVTec = anomalib_dpnr.MVTec


def _model_parser():  # noqa: ANN202
    from anomalib.models import AnomalibModule
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(AnomalibModule, "model", required=True)
    return parser


def parse_model(config: Any):  # noqa: ANN201
    """Check a grid entry ``{class_path, init_args}`` against the model's signature (nothing is built)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(config)
    if isinstance(config, str):
        config = {"class_path": config}
    return _model_parser().parse_object({"model": config})


def build_model(config: Any, seed: int | None = None):  # noqa: ANN201
    """An ``AnomalibModule`` from ``{class_path, init_args}``, parsed and instantiated like ``anomalib train`` does."""
    from lightning.pytorch import seed_everything

    parsed = parse_model(config)
    if seed is not None:  # anomalib seeds only inside the job, after the first model was built
        seed_everything(seed)
    return _model_parser().instantiate_classes(parsed).model


def _patch(trainer: dict[str, Any], seed: int | None) -> None:
    """Point anomalib's benchmark job generator/job at our model builder, trainer arguments and collector.

    Process-wide and not undone: meant for the ``anomalib-dpnr benchmark`` process.
    """
    import pandas as pd
    from anomalib.engine import Engine
    from anomalib.pipelines.benchmark import generator, job

    generator.get_model = functools.partial(build_model, seed=seed)
    job.Engine = functools.partial(Engine, **trainer)
    job.BenchmarkJob.collect = staticmethod(lambda results: pd.DataFrame(results))


def _expected_jobs(config: dict) -> int:
    from anomalib.pipelines.components.utils import get_iterator_from_grid_dict

    accelerators = config.get("accelerator", "cpu")
    count = len(accelerators) if isinstance(accelerators, list) else 1
    return count * len(list(get_iterator_from_grid_dict(config["benchmark"])))


def expand_model(entry: Any, base: Path = Path()) -> Any:
    """A grid entry with every ``{config: file, init_args: overrides}`` replaced by that file's ``model:`` section.

    ``file`` is relative to ``base`` (the working directory, like the data paths in a grid), or a shipped config
    name (``configs/dpnr/cpu.yaml`` works without a checkout); ``init_args`` replace the config's arguments one
    by one. Other entries are returned unchanged.
    """
    from anomalib_dpnr.config_files import config_path

    if not isinstance(entry, dict) or "config" not in entry:
        return entry
    if unknown := set(entry) - {"config", "init_args"}:
        msg = f"grid entry {entry!r}: with 'config' only 'init_args' (overrides) may be given, not {sorted(unknown)}"
        raise ValueError(msg)
    path = base / entry["config"]
    if not path.is_file():
        try:
            path = config_path(entry["config"])
        except FileNotFoundError as error:
            msg = f"grid entry refers to {path}, which does not exist (paths are relative to {base.resolve()}): {error}"
            raise FileNotFoundError(msg) from None
    model = (yaml.safe_load(path.read_text()) or {}).get("model")
    if not isinstance(model, dict) or "class_path" not in model:
        msg = f"{path} has no 'model:' section with a class_path"
        raise ValueError(msg)
    return {"class_path": model["class_path"], "init_args": {**(model.get("init_args") or {}), **(entry.get("init_args") or {})}}


def load_grid(path: Path, max_epochs: int | None = None) -> tuple[dict, dict[str, Any]]:
    """The grid file (config references expanded) and the trainer arguments for every job (``max_epochs`` overrides the file's)."""
    if not path.is_file():
        msg = f"benchmark config {path} not found"
        raise FileNotFoundError(msg)
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config.get("benchmark"), dict) or "model" not in config["benchmark"]:
        msg = f"{path}: needs a 'benchmark:' section with 'model' and 'data' (see benchmarks/configs/)"
        raise ValueError(msg)
    models = config["benchmark"]["model"]
    if isinstance(models, dict) and isinstance(models.get("grid"), list):
        models["grid"] = [expand_model(entry) for entry in models["grid"]]
    else:
        config["benchmark"]["model"] = expand_model(models)
    trainer = dict(config.get("trainer") or {})
    if bad := RESERVED & set(trainer):
        msg = f"{path}: trainer keys {sorted(bad)} are set per job by anomalib; use the top-level 'accelerator'"
        raise ValueError(msg)
    if trainer.get("check_val_every_n_epoch", 1) != 1:
        msg = (
            f"{path}: trainer.check_val_every_n_epoch must be 1 here: models that fix fewer epochs themselves "
            "(PaDiM/PatchCore: 1) would never validate, leaving their thresholds unset"
        )
        raise ValueError(msg)
    if max_epochs is not None:
        trainer["max_epochs"] = max_epochs
    if "max_epochs" not in trainer:
        print(f"benchmark: {path} sets no trainer.max_epochs: models without their own train 1000 epochs", file=sys.stderr)
    return config, trainer


def run_benchmark(config_path: str | Path, max_epochs: int | None = None) -> Path:
    """Run ``anomalib benchmark --config config_path`` with the plugin models; return the results CSV.

    Raises:
        BenchmarkError: a job failed, or fewer rows than jobs were written.
    """
    import pandas as pd
    from anomalib.cli import cli

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(config_path)
    config, trainer = load_grid(path, max_epochs)
    seed = config["benchmark"].get("seed")
    register()
    _patch(trainer, seed if isinstance(seed, int) else None)
    expected = _expected_jobs(config)
    before = set(RESULTS.glob("*/results.csv"))
    log_start = LOG.stat().st_size if LOG.is_file() else 0

    with tempfile.TemporaryDirectory() as tmp:  # anomalib reads the grid with the config references expanded
        expanded = Path(tmp) / path.name
        expanded.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = sys.argv
        sys.argv = ["anomalib", "benchmark", "--config", str(expanded)]
        try:
            cli.main()
        finally:
            sys.argv = argv

    log = LOG.read_bytes()[log_start:].decode(errors="replace") if LOG.is_file() else ""
    new = sorted(set(RESULTS.glob("*/results.csv")) - before, key=lambda p: p.stat().st_mtime)
    rows = len(pd.read_csv(new[-1])) if new and new[-1].stat().st_size > 1 else 0
    errors = [line for line in log.splitlines() if " - ERROR - " in line]
    if errors or rows < expected:
        tail = "\n".join(log.splitlines()[-80:])
        msg = (
            f"anomalib benchmark: {len(errors)} error(s), {rows} of {expected} job results written "
            f"({new[-1] if new else 'no results.csv'}). Last lines of {LOG.resolve()}:\n{tail}"
        )
        raise BenchmarkError(msg)
    return new[-1]
