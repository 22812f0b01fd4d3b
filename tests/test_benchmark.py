"""Benchmarks: ``anomalib-dpnr benchmark`` (anomalib's pipeline with plugin models) and ``anomalib-dpnr compare``
(``benchmarks/run.py`` calls it)."""

from __future__ import annotations

import csv
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY_DIFFUSION_AD, benchmark_script, config_file

from anomalib_dpnr import compare as bench
from anomalib_dpnr.benchmark import expand_model, load_grid, parse_model, register

GRIDS = sorted((REPO / "benchmarks" / "configs").glob("*.yaml"))


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, check=False, cwd=cwd)


def tiny_grid(path: Path, data: Path, models: list[dict]) -> Path:
    grid = {
        "accelerator": "cpu",
        "trainer": {"max_epochs": 1, "num_sanity_val_steps": 0},
        "benchmark": {
            "seed": 42,
            "model": {"grid": models},
            "data": {"class_path": "MVTecAD", "init_args": {
                "root": str(data), "category": "woven", "num_workers": 0, "train_batch_size": 8, "eval_batch_size": 8,
                "val_split_mode": "from_test", "val_split_ratio": 0.5, "seed": 42}},
        },
    }  # fmt: skip
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.mark.parametrize("grid", GRIDS, ids=lambda p: p.stem)
def test_grid_configs_are_fair_and_parse(grid: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every entry is a training config (never a copy that can drift) and parses at 128 px, on the from_test
    split with seed 42, for bounded epochs, with the same per-dataset overrides benchmarks/run.py applies."""
    register()
    monkeypatch.chdir(REPO)
    raw = yaml.safe_load(grid.read_text())["benchmark"]["model"]["grid"]
    assert all("config" in entry for entry in raw)
    assert [entry["config"] for entry in raw] == bench.default_configs()
    dataset = grid.stem.removesuffix("_cpu")
    for entry in raw:
        model = bench.model_class(str(REPO / entry["config"]))
        expected = list(bench.DATASET_ARGS.get((dataset, model.__name__), []))
        if bench.DATASETS[dataset][2] and "use_foreground" in inspect.signature(model).parameters:
            expected += bench.TEXTURE_ARGS
        given = [arg for key, value in (entry.get("init_args") or {}).items() for arg in (f"--model.{key}", str(value).lower())]
        assert given == expected, entry["config"]
    config, trainer = load_grid(grid)
    assert trainer["max_epochs"] == 8 and trainer.get("check_val_every_n_epoch", 1) == 1
    data = config["benchmark"]["data"]["init_args"]
    assert (data["val_split_mode"], data["val_split_ratio"], data["seed"], config["benchmark"]["seed"]) == ("from_test", 0.5, 42, 42)
    names = set()
    for entry in config["benchmark"]["model"]["grid"]:
        init = parse_model(entry).model.init_args
        names.add(entry["class_path"].rsplit(".", 1)[-1])
        if "image_size" in init:
            assert init.image_size == 128
        else:  # anomalib baselines: the same 128 px resize and the plugin models' metrics (AUPRO included)
            assert entry["init_args"]["pre_processor"]["init_args"]["transform"]["init_args"]["transforms"][0]["init_args"]["size"] == [128, 128]
            assert entry["init_args"]["evaluator"]["init_args"]["test_metrics"][-1]["class_path"] == "anomalib.metrics.AUPRO"
    assert {"Padim", "Patchcore", "DiffusionAD", "Dpnr"} <= names


def test_expand_model_reads_the_training_config(tmp_path: Path) -> None:
    config = tmp_path / "m.yaml"
    config.write_text("model:\n  class_path: anomalib_dpnr.Dpnr\n  init_args: {image_size: 128, top_k: 50}\n")
    assert expand_model({"config": "m.yaml", "init_args": {"top_k": 10}}, tmp_path) == {
        "class_path": "anomalib_dpnr.Dpnr", "init_args": {"image_size": 128, "top_k": 10}}
    assert expand_model({"class_path": "Padim"}, tmp_path) == {"class_path": "Padim"}
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        expand_model({"config": "missing.yaml"}, tmp_path)
    with pytest.raises(ValueError, match="only 'init_args'"):
        expand_model({"config": "m.yaml", "class_path": "Padim"}, tmp_path)
    config.write_text("trainer: {max_epochs: 1}\n")
    with pytest.raises(ValueError, match="no 'model:' section"):
        expand_model({"config": "m.yaml"}, tmp_path)


def test_load_grid_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {class_path: Padim}\n")
    with pytest.raises(ValueError, match="needs a 'benchmark:' section"):
        load_grid(bad)
    bad.write_text("trainer: {devices: 2}\nbenchmark: {model: Padim}\n")
    with pytest.raises(ValueError, match="devices"):
        load_grid(bad)
    bad.write_text("trainer: {check_val_every_n_epoch: 8}\nbenchmark: {model: Padim}\n")
    with pytest.raises(ValueError, match="never validate"):  # PaDiM (1 epoch) would get no thresholds
        load_grid(bad)
    with pytest.raises(FileNotFoundError):
        load_grid(tmp_path / "missing.yaml")
    _, trainer = load_grid(GRIDS[0], max_epochs=1)
    assert trainer["max_epochs"] == 1


def test_run_plan_fair_jobs(tmp_path: Path) -> None:
    """Same seed/split everywhere, PatchCore added as reference, per-dataset arguments, variants on bottle only."""
    for sub in ("mvtec_ad/bottle", "magnetic_tile"):
        (tmp_path / sub / "train" / "good").mkdir(parents=True)
    parse = lambda *a: bench.parser().parse_args(["--csv", "x.csv", "--sample", "bottle", "magnetic_tile", "--data-root", str(tmp_path), *a])  # noqa: E731
    jobs = bench.plan(parse("--variant", "configs/dpnr/cpu.yaml --model.dp_sni false"))
    found = {(j["_model"], j["label"], j["data"]["category"]): j["extra"] for j in jobs}
    assert [j["_model"] for j in jobs[:4]] == ["Padim", "Padim", "Patchcore", "Patchcore"] and {j["seed"] for j in jobs} == {42}
    assert {j["split_seed"] for j in jobs} == {42}
    assert ("DiffusionAD", "configs/diffusion_ad/cpu.yaml", "magnetic_tile") in found
    assert found[("Patchcore", "configs/baselines/patchcore_cpu.yaml", "magnetic_tile")] == ["--model.coreset_sampling_ratio", "0.001"]
    assert found[("Patchcore", "configs/baselines/patchcore_cpu.yaml", "bottle")] == []
    assert found[("Padim", "configs/baselines/padim_cpu.yaml", "magnetic_tile")] == []  # no use_foreground there
    assert bench.TEXTURE_ARGS[0] in found[("Dpnr", "configs/dpnr/cpu.yaml", "magnetic_tile")]
    variant = [key for key in found if "dp_sni" in key[1]]
    assert variant == [("Dpnr", "configs/dpnr/cpu.yaml --model.dp_sni false", "bottle")]
    assert found[variant[0]][-2:] == ["--model.dp_sni", "false"]
    only = bench.plan(parse("--config", "configs/diffusion_ad/cpu.yaml", "--max-epochs", "1"))
    assert [j["_model"] for j in only] == ["Patchcore", "Patchcore", "DiffusionAD", "DiffusionAD"]
    assert "--trainer.max_epochs" in only[-1]["extra"]
    # config names, several model seeds (seed by seed), one split seed, user data beside the sample data
    seeds = bench.plan(parse("--models", "diffusion_ad", "Patchcore", "--seeds", "0", "1", "--mvtec", str(tmp_path), "magnetic_tile"))
    assert [(j["_model"], j["seed"], j["data"]["category"]) for j in seeds[:6]] == [
        ("DiffusionAD", 0, "magnetic_tile"), ("DiffusionAD", 0, "bottle"), ("DiffusionAD", 0, "magnetic_tile"),
        ("Patchcore", 0, "magnetic_tile"), ("Patchcore", 0, "bottle"), ("Patchcore", 0, "magnetic_tile"),
    ]  # fmt: skip
    assert len(seeds) == 12 and {j["split_seed"] for j in seeds} == {42} and [j["seed"] for j in seeds[6:]] == [1] * 6
    with pytest.raises(FileNotFoundError, match="no .*nowhere/cat/train/good"):
        bench.plan(parse("--mvtec", str(tmp_path / "nowhere"), "cat"))
    with pytest.raises(ValueError, match="ROOT NORMAL_DIR ABNORMAL_DIR"):
        bench.plan(parse("--folder", str(tmp_path), "good"))
    with pytest.raises(FileNotFoundError, match="no config file or shipped config named 'nope'"):
        bench.plan(parse("--models", "nope"))
    with pytest.raises(ValueError, match="--retest takes '--model.<argument> <value>' pairs"):
        bench.plan(parse("--retest", "--trainer.precision bf16"))
    assert bench.model_overrides("--model.inference_dtype bfloat16 --model.top_k 10") == {"inference_dtype": "bfloat16", "top_k": 10}


def test_ratios_and_plot(tmp_path: Path) -> None:
    rows = [
        {"model": "Patchcore", "config": "p.yaml", "dataset": "bottle", "run_id": "a", "train_seconds": 10.0, "infer_ms_per_image": 20.0},
        {"model": "Dpnr", "config": "d.yaml --model.dp_sni false", "dataset": "bottle", "run_id": "a", "train_seconds": 50.0, "infer_ms_per_image": 100.0},
        {"model": "Dpnr", "config": "d.yaml", "dataset": "bottle", "run_id": "b", "train_seconds": 50.0, "infer_ms_per_image": 100.0},
    ]  # fmt: skip
    for row in rows:
        row.update(image_AUROC=0.9, image_F1Score=0.8, pixel_AUROC=0.7, pixel_AUPRO=0.6)
    for row in rows:
        row["seed"] = 42
    bench.add_ratios(rows)
    assert (rows[0]["train_x_patchcore"], rows[1]["train_x_patchcore"], rows[1]["infer_x_patchcore"]) == (1.0, 5.0, 5.0)
    assert "train_x_patchcore" not in rows[2]  # no PatchCore in run b: no ratio
    assert bench.label(rows[1]) == "Dpnr dp_sni=false"
    bench.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_seeds_give_mean_and_spread(tmp_path: Path) -> None:
    """Several seeds of a model are one table row (mean ± sample std, ``seeds``); one seed prints plain numbers."""
    rows = [{"model": "Dpnr", "config": "d.yaml", "dataset": "bottle", "seed": seed, "pixel_AUROC": value, "train_seconds": 10.0 * (seed + 1)}
            for seed, value in ((0, 0.9), (1, 0.8), (2, 0.7))]  # fmt: skip
    rows.append({"model": "Padim", "config": "p.yaml", "dataset": "bottle", "seed": 0, "pixel_AUROC": 0.6, "train_seconds": 1.0})
    (dpnr, padim) = bench.summarise(rows)
    assert dpnr["seeds"] == 3 and dpnr["pixel_AUROC"] == pytest.approx(0.8) and dpnr["pixel_AUROC_std"] == pytest.approx(0.1)
    assert padim["seeds"] == 1 and padim["pixel_AUROC_std"] == 0.0
    table = bench.markdown(rows).splitlines()
    assert table[0].endswith("| seeds |") and "| 0.8000 ± 0.1000 |" in table[2] and "| 20.0 |" in table[2]
    assert "| 0.6000 |" in table[3] and table[3].endswith("| 1 |")
    bench.plot(rows, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 10_000


def test_models_table_takes_one_dataset_of_a_csv(tmp_path: Path) -> None:
    """``--csv PATH@dataset``: a newer CSV's rows replace an older CSV's on one dataset instead of pooling with them."""
    models_table = benchmark_script("models_table")
    row = lambda model, dataset, seed, value: {  # noqa: E731
        "model": model, "config": f"configs/{model.lower()}/cpu.yaml" if model == "Dpnr" else "b.yaml", "dataset": dataset,
        "seed": seed, "pixel_AUROC": value, "pixel_AUPRO": value, "image_AUROC": value,
    }  # fmt: skip
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    for path, rows in ((old, [row("Patchcore", "bottle", 42, 0.9), row("Dpnr", "bottle", 42, 0.1), row("Padim", "tile", 42, 0.7), row("Dpnr", "tile", 42, 0.6)]),
                       (new, [row("Patchcore", "bottle", s, 0.9) for s in (0, 1)] + [row("Dpnr", "bottle", 0, 0.8), row("Dpnr", "bottle", 1, 0.6)])):  # fmt: skip
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    rows = models_table.read_rows(f"{old}@tile") + models_table.read_rows(str(new))
    dpnr = [r for r in bench.summarise(rows) if r["model"] == "Dpnr"]
    assert sorted((r["dataset"], r["seeds"], round(r["pixel_AUROC"], 3)) for r in dpnr) == [("bottle", 2, 0.7), ("tile", 1, 0.6)]
    with pytest.raises(SystemExit, match=r"no rows for dataset\(s\) \['carpet'\]"):
        models_table.read_rows(f"{old}@carpet")
    assert [r["model"] for r in models_table.read_rows(f"{old}@tile:Padim")] == ["Padim"]  # a newer CSV holds Dpnr's tile row
    with pytest.raises(SystemExit, match=r"no rows for model\(s\) \['Ran'\]"):
        models_table.read_rows(f"{old}@tile:Ran")
    timed = [{**r, "infer_x_patchcore": 10.0} for r in rows if r["dataset"] == "bottle"]
    timed += [{**r, "config": f"{r['config']} {models_table.BFLOAT16}", "infer_x_patchcore": 4.0} for r in timed if r["model"] == "Dpnr"]
    line = models_table.headline(bench.summarise(rows), "Dpnr", "configs/dpnr/cpu.yaml", bench.summarise(timed))
    assert line.startswith("pixel AUROC / PRO: bottle 0.700 ± 0.141") and line.endswith("inference on bottle 10x (4x in bfloat16) PatchCore's")
    # the multiples come from the speed run only, never from the quality CSVs' own timings
    assert "inference" not in models_table.headline(bench.summarise(timed), "Dpnr", "configs/dpnr/cpu.yaml")
    # rows of the config trained differently (``--trainer.*``, ``--model.*``) stand in for a dataset without the
    # shipped config's rows: those with the fewest other settings (not a retest of them), named in the line
    tile = [{**r, "dataset": "magnetic_tile"} for r in rows if r["dataset"] == "tile"]
    shorter = [{**r, "config": f"{r['config']} --trainer.max_epochs 6"} if r["model"] == "Dpnr" else r for r in tile]
    line = models_table.headline(bench.summarise(shorter), "Dpnr", "configs/dpnr/cpu.yaml")
    assert line == "pixel AUROC / PRO: magnetic_tile 0.600 / 0.600, 1 seed, `--trainer.max_epochs 6` (Padim 0.700 / 0.700)"
    other = [{**r, "config": f"{r['config']} --model.layers a"} if r["model"] == "Dpnr" else r for r in tile]
    retest = [{**r, "config": f"{r['config']} --model.alpha 1 --model.layers a", "pixel_AUROC": 0.1} for r in tile if r["model"] == "Dpnr"]
    line = models_table.headline(bench.summarise(retest + other), "Dpnr", "configs/dpnr/cpu.yaml")
    assert line == "pixel AUROC / PRO: magnetic_tile 0.600 / 0.600, 1 seed, `--model.layers a` (Padim 0.700 / 0.700)"


def test_append_replaces_rows_where_they_stood() -> None:
    row = lambda model, dataset, run: {"model": model, "config": f"{model}.yaml", "dataset": dataset, "run_id": run}  # noqa: E731
    old = [row("Padim", "bottle", "a"), row("Patchcore", "bottle", "a"), row("Dpnr", "bottle", "a"), row("Dpnr", "tile", "b")]
    merged = bench.merge_rows(old, [row("Patchcore", "bottle", "c"), row("Dpnr", "bottle", "c"), row("Ran", "bottle", "c")])
    assert [(r["model"], r["dataset"], r["run_id"]) for r in merged] == [
        ("Padim", "bottle", "a"), ("Patchcore", "bottle", "c"), ("Dpnr", "bottle", "c"), ("Dpnr", "tile", "b"), ("Ran", "bottle", "c"),
    ]  # fmt: skip


@pytest.mark.slow
def test_run_quick_compares_every_model_with_baselines(tmp_path: Path) -> None:
    """PaDiM, a DPNR ablation and the PatchCore reference (added by itself) at toy scale: CSV, ratios, plot, README."""
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:comparison -->\nold\n<!-- /bench:comparison -->\nend\n")
    out = tmp_path / "quick.csv"
    earlier = {"model": "Padim", "config": "x.yaml", "dataset": "woven", "image_AUROC": "0.5"}
    with out.open("w", newline="") as handle:  # a row from an earlier run, kept by --append
        writer = csv.DictWriter(handle, fieldnames=list(earlier))
        writer.writeheader()
        writer.writerow(earlier)
    configs = ["--config", "configs/baselines/padim_cpu.yaml", "--variant", "configs/dpnr/cpu.yaml --model.dp_sni false"]
    retest = ["--retest", "--model.inference_dtype bfloat16"]  # DPNR's weights tested again in bfloat16; PaDiM has no such argument
    done = run(str(REPO / "benchmarks" / "run.py"), "--quick", *configs, *retest, "--csv", str(out), "--append", "--readme", str(readme), cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = list(csv.DictReader(out.open()))
    assert [row["model"] for row in rows] == ["Padim", "Patchcore", "Padim", "Dpnr", "Dpnr"]
    trained, retested = rows[3:]
    assert retested["config"] == trained["config"] + " --model.inference_dtype bfloat16"
    assert retested["train_seconds"] == trained["train_seconds"] and retested["seed"] == trained["seed"]  # the same weights
    assert abs(float(retested["pixel_AUROC"]) - float(trained["pixel_AUROC"])) < 0.05
    new = rows[1:]
    assert len({row["run_id"] for row in new}) == 1 and {row["seed"] for row in new} == {"42"}
    for row in new:
        for column in bench.METRICS:
            assert 0.0 <= float(row[column]) <= 1.0, (row["model"], column)
        assert float(row["train_seconds"]) > 0 and float(row["infer_ms_per_image"]) > 0 and int(row["peak_rss_mb"]) > 100
        assert float(row["train_x_patchcore"]) > 0 and float(row["infer_x_patchcore"]) > 0
    assert float(new[0]["train_x_patchcore"]) == 1.0 == float(new[0]["infer_x_patchcore"])
    assert out.with_suffix(".png").stat().st_size > 10_000
    text = readme.read_text()
    assert "old" not in text and "| Patchcore | configs/baselines/patchcore_cpu.yaml | woven |" in text
    assert "| Dpnr | configs/dpnr/cpu.yaml --model.dp_sni false | woven |" in text and "infer_x_patchcore" in text
    assert "| Dpnr | configs/dpnr/cpu.yaml --model.dp_sni false --model.inference_dtype bfloat16 | woven |" in text
    assert text.startswith("intro\n") and text.endswith("end\n")


def test_retest_fits_its_own_reading_on_the_validation_split(tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A retest that changes the reading (here the map smoothing) is validated before it is tested, so its
    normalisation, thresholds and fitted map weight are its own and not the trained reading's."""
    from anomalib.engine import Engine

    from anomalib_dpnr.cli import quick_args
    from anomalib_dpnr.config_files import config_path

    order = []
    for name in ("validate", "test"):
        original = getattr(Engine, name)
        monkeypatch.setattr(Engine, name, lambda self, *a, _f=original, _n=name, **k: order.append((_n, k["model"])) or _f(self, *a, **k))
    config = str(config_path("dpnr/cpu"))
    data = {"kind": "mvtec", "root": str(tiny_dataset), "category": "woven"}
    extra = [*quick_args(config), "--data.num_workers", "0"]
    trained, retested = bench.run_job(config, data, extra, seed=0, split_seed=0, retest=["--model.smoothing_sigma 1"])
    assert retested["config"].endswith("--model.smoothing_sigma 1") and trained["train_seconds"] == retested["train_seconds"]
    calls = [(name, model.model.scorer.sigma) for name, model in order]
    assert calls[-2:] == [("validate", 1), ("test", 1)]  # the retested model: validated, then tested
    again = order[-1][1]
    assert again is order[-2][1] and again.post_processor.image_threshold != order[0][1].post_processor.image_threshold


def folder_dataset(root: Path, tiny_dataset: Path) -> Path:
    """The tiny dataset rearranged as anomalib ``Folder`` data: good/, defect/, masks/ (same file names)."""
    import shutil

    source = tiny_dataset / "woven"
    for sub in ("good", "defect", "masks"):
        (root / sub).mkdir(parents=True)
    for image in [*source.glob("train/good/*.png"), *source.glob("test/good/*.png")]:
        shutil.copy(image, root / "good" / f"{image.parent.parent.name}_{image.name}")
    for image in source.glob("test/spot/*.png"):
        shutil.copy(image, root / "defect" / image.name)
        shutil.copy(source / "ground_truth" / "spot" / f"{image.stem}_mask.png", root / "masks" / image.name)
    return root


@pytest.mark.slow
def test_compare_on_folder_data_with_seeds(tmp_path: Path, tiny_dataset: Path) -> None:
    """``anomalib-dpnr compare`` on the user's own Folder data, run from outside the checkout: two model seeds of
    PaDiM plus the PatchCore reference, progress per job and epoch, one row per seed in the CSV, mean ± std in the table."""
    parts = folder_dataset(tmp_path / "parts", tiny_dataset)
    out = tmp_path / "parts.csv"
    args = ["--quick", "--folder", str(parts), "good", "defect", "masks", "--models", "Padim", "--seeds", "0", "1", "--csv", str(out)]
    done = run("-m", "anomalib_dpnr.cli", "compare", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "compare: job 1/4: configs/baselines/patchcore_cpu.yaml on parts, seed 0" in done.stdout
    assert "compare: job 4/4: epoch 1/1" in done.stdout and "timed on an earlier seed" in done.stdout
    rows = list(csv.DictReader(out.open()))
    assert [(row["model"], row["seed"], row["dataset"]) for row in rows] == [
        ("Patchcore", "0", "parts"), ("Padim", "0", "parts"), ("Patchcore", "1", "parts"), ("Padim", "1", "parts")]
    for row in rows:
        assert 0.0 <= float(row["pixel_AUROC"]) <= 1.0 and float(row["train_x_patchcore"]) > 0
    table = [line for line in done.stdout.splitlines() if line.startswith("| Padim |")]
    assert len(table) == 1 and " ± " in table[0] and table[0].endswith("| 2 |")
    assert out.with_suffix(".png").is_file()


@pytest.mark.slow
def test_run_fails_loudly_when_a_job_fails(tmp_path: Path) -> None:
    config = config_file("diffusion_ad")
    config["model"]["init_args"]["inference_timesteps"] = [100, 5000]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    out = tmp_path / "x.csv"
    done = run(str(REPO / "benchmarks" / "run.py"), "--quick", "--no-reference", "--config", str(bad), "--csv", str(out), cwd=tmp_path)
    assert done.returncode == 1
    assert "FAILED" in done.stderr
    assert "timesteps must lie in [0, 999]" in " ".join(done.stderr.split())
    assert not out.exists()


@pytest.mark.slow
def test_anomalib_benchmark_with_plugin_and_anomalib_models(tmp_path: Path, tiny_dataset: Path) -> None:
    """A grid mixing DiffusionAD (a training config it refers to, with an override) and PaDiM (inline, different
    init_args) runs through anomalib's pipeline, one epoch each."""
    config = {"model": {"class_path": "anomalib_dpnr.DiffusionAD", "init_args": TINY_DIFFUSION_AD}}
    (tmp_path / "diffusion_ad.yaml").write_text(yaml.safe_dump(config))
    padim = {"backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "pre_trained": False, "n_features": 50}
    models = [{"config": "diffusion_ad.yaml", "init_args": {"use_foreground": False}}, {"class_path": "Padim", "init_args": padim}]
    grid = tiny_grid(tmp_path / "grid.yaml", tiny_dataset, models)
    done = run("-m", "anomalib_dpnr.cli", "benchmark", "--config", str(grid), "--csv", str(tmp_path / "out.csv"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert [row["model.class_path"] for row in rows] == ["anomalib_dpnr.DiffusionAD", "Padim"]
    for row in rows:
        assert 0.0 <= float(row["image_AUROC"]) <= 1.0 and 0.0 <= float(row["pixel_AUROC"]) <= 1.0
    assert rows[0]["model.init_args.segmentation_width"] and rows[1]["model.init_args.n_features"]  # union of columns
    assert float(rows[0]["pixel_AUPRO"]) >= 0.0


@pytest.mark.slow
def test_anomalib_benchmark_fails_loudly(tmp_path: Path, tiny_dataset: Path) -> None:
    """anomalib logs a failed job and exits 0 with an empty CSV; the wrapper exits 1 and shows the error."""
    padim = {"backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "pre_trained": False}
    grid = tiny_grid(tmp_path / "grid.yaml", tiny_dataset, [{"class_path": "Padim", "init_args": padim}])
    config = yaml.safe_load(grid.read_text())
    config["benchmark"]["data"]["init_args"]["train_batch_size"] = 0  # fails inside the job, at fit time
    grid.write_text(yaml.safe_dump(config))
    done = run("-m", "anomalib_dpnr.cli", "benchmark", "--config", str(grid), cwd=tmp_path)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[benchmark] FAILED" in done.stderr and "0 of 1 job results" in done.stderr


def test_validation_script_scores_the_validation_half_every_n_epochs(tiny_dataset: Path, tmp_path: Path) -> None:
    """``benchmarks/validation.py``: one row per validation, each the metrics of the model's raw validation maps."""
    from test_reliability import build, datamodule, engine

    validation = benchmark_script("validation")
    module, data = build("Ran", seed=0), datamodule(tiny_dataset)
    scores = validation.ValidationScores({"config": "tiny"}, by_type=True)
    engine(tmp_path, max_epochs=2, check_val_every_n_epoch=1, num_sanity_val_steps=0, callbacks=[scores]).fit(module, datamodule=data)
    assert [row["epoch"] for row in scores.rows] == [1, 2]
    assert all(row["config"] == "tiny" and row["train_seconds"] >= 0 for row in scores.rows)
    expected = validation.raw_metrics(module.eval(), data.val_dataloader())  # the trained model, outside the validation loop
    assert {key: scores.rows[-1][key] for key in expected} == pytest.approx(expected, abs=2e-3)
    # --by-type: per validation, one row per defect type of the validation half, over its images and the normal ones
    batches = list(data.val_dataloader())
    kinds = [Path(path).parent.name for batch in batches for path in batch.image_path]
    defects = sorted(set(kinds) - {"good"})
    assert len(defects) > 1 and [row["defect"] for row in scores.type_rows] == defects * 2
    last = scores.type_rows[len(defects) :]
    assert [row["images"] for row in last] == [kinds.count(defect) for defect in defects]
    keep = [i for i, kind in enumerate(kinds) if kind in ("good", defects[0])]
    labels = torch.cat([batch.gt_label for batch in batches])[keep]
    with torch.no_grad():
        outputs = [module.model(module.pre_processor.transform(batch.image)) for batch in batches]
    maps = torch.cat([out.anomaly_map.reshape(-1, 1, *out.anomaly_map.shape[-2:]) for out in outputs])[keep]
    masks = torch.cat([validation.mask_like(batch.gt_mask, maps) for batch in batches])[keep]
    scores_kept = torch.cat([out.pred_score.reshape(-1) for out in outputs])[keep]
    own = validation.metrics(scores_kept, labels, maps, masks)
    assert {key: last[0][key] for key in own} == pytest.approx(own, abs=2e-3) and last[0]["defect_pixels"] == int(masks.sum())


def test_validation_gives_texture_arguments_only_to_models_that_take_them() -> None:
    """``benchmarks/validation.py`` on magnetic_tile: DPNR gets ``TEXTURE_ARGS``, RAN (no synthetic anomalies) does not."""
    from anomalib_dpnr.compare import TEXTURE_ARGS

    validation = benchmark_script("validation")
    root = Path("data")
    for config, dataset, expected in (("dpnr/cpu", "magnetic_tile", True), ("ran/cpu", "magnetic_tile", False), ("dpnr/cpu", "bottle", False)):
        args = validation.fit_args(config, dataset, root, 0, 5, 10)
        assert (args[-2:] == TEXTURE_ARGS) is expected, (config, dataset)
        assert args[args.index("--data.category") + 1] == validation.DATASETS[dataset][1]


def test_statistics_validation_scores_the_models_own_maps_for_each_weight(tiny_dataset: Path) -> None:
    """``benchmarks/statistics_validation.py``: each variant's row is the model's ``score_maps`` at the weight with the
    best validation pixel AUROC + PRO."""
    from test_reliability import build, datamodule

    script, validation = benchmark_script("statistics_validation"), benchmark_script("validation")
    module, data = build("D3AD", seed=0).eval(), datamodule(tiny_dataset)
    data.setup()
    module.build_bank(data.train_data)
    module.fit_statistics(data.train_data)
    first, second, labels, masks = validation.collect_terms(module, data.val_dataloader(), module.model.validation_terms)
    assert first.shape == second.shape == masks.shape and first.shape[0] == labels.shape[0] == len(data.val_data)
    model, rows = module.model, {}
    for positional in (False, True):
        model.positional_statistics = positional
        expected = {}
        for weight in (0.0, 1.0):
            model.feature_weight = weight
            out = model.score_maps(first, second)
            expected[weight] = validation.metrics(out.pred_score, labels, out.anomaly_map, masks)
        rows[positional] = script.best_row(model, first, second, labels, masks, (0.0, 1.0))
        best = max(expected, key=lambda w: expected[w]["pixel_AUROC"] + expected[w]["pixel_AUPRO"])
        assert rows[positional] == {"feature_weight": best, **expected[best]}
    assert rows[False] != rows[True]  # the reading matters


def test_ran_validation_reads_the_checkpoints_own_maps_with_alpha_or_smoothing_changed(tiny_dataset: Path) -> None:
    """``benchmarks/ran_validation.py``: ``combine`` in the checkpoint's own reading is the model's own ``predict``;
    its ``alpha`` and ``sigma`` variants are the model's with that argument changed."""
    import torch
    from test_reliability import build, datamodule

    from anomalib_dpnr.components.processing import AnomalyScorer

    script = benchmark_script("ran_validation")
    module, data = build("Ran", seed=0).eval(), datamodule(tiny_dataset)
    data.setup()
    module.fit_statistics(data.train_data)
    model = module.model
    images = module.pre_processor.transform(next(iter(data.val_dataloader())).image)  # as collect_terms reads them
    kl, feature = model.level_maps(images)
    levels = list(range(kl.shape[0]))
    for alpha, sigma in ((model.alpha, None), (0.25, None), (model.alpha, 8.0)):
        scores, maps = script.combine(module, kl, feature, levels, alpha, model.normalise_features, model.positional_statistics,
                                      model.normaliser.shrinkage, sigma)  # fmt: skip
        model.alpha = alpha
        if sigma is not None:
            model.scorer = AnomalyScorer(sigma, model.scorer.top_k)
        expected = model.predict(images)
        assert torch.allclose(maps, expected.anomaly_map, atol=1e-5) and torch.allclose(scores, expected.pred_score, atol=1e-5)


def test_statistics_validation_reads_d3ad_at_each_step_count_with_its_own_statistics(tiny_dataset: Path) -> None:
    """``--ddim-steps``: each row is the model read with that many DDIM steps, its statistics refitted for them."""
    import torch
    from test_reliability import build, datamodule

    script, validation = benchmark_script("statistics_validation"), benchmark_script("validation")
    module, data = build("D3AD", seed=0).eval(), datamodule(tiny_dataset)
    data.setup()
    module.build_bank(data.train_data)
    rows, statistics = {}, {}
    for steps in (1, 3):
        rows[steps] = script.steps_row(module, data, steps, [0.0, 1.0], "tiny")
        statistics[steps] = {name: value.clone() for name, value in module.model.normaliser.state_dict().items()}
        assert module.model.ddim_steps == steps and rows[steps]["variant"] == f"{steps} DDIM steps"
    module.model.ddim_steps = 3
    first, second, labels, masks = validation.collect_terms(module, data.val_dataloader(), module.model.validation_terms)
    assert {k: v for k, v in rows[3].items() if k not in ("dataset", "variant", "seconds")} == script.best_row(
        module.model, first, second, labels, masks, [0.0, 1.0])
    assert any(not torch.equal(statistics[1][name], statistics[3][name]) for name in statistics[1])  # refitted per count


def test_inference_time_loads_every_batch_before_timing_and_keeps_the_fastest_pass() -> None:
    """Data loading stays out of the timed region, and the best of the timed passes is kept."""
    import time
    import types

    import torch

    events: list[str] = []

    class Loader:
        def __iter__(self):  # noqa: ANN204
            for size in (4, 4, 2):
                events.append("load")
                yield types.SimpleNamespace(image=torch.zeros(size, 3, 8, 8))

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.delays = iter([0.0] + [0.05] * 3 + [0.0] * 3 + [0.05] * 3)  # warm-up, then three passes of three batches

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            events.append("model")
            time.sleep(next(self.delays))
            return images

    datamodule = types.SimpleNamespace(test_dataloader=Loader)
    ms = bench.inference_ms_per_image(Model(), datamodule, passes=3)
    assert events == ["load"] * 3 + ["model"] * 10  # everything loaded first; warm-up + 3 passes x 3 batches
    assert ms < 0.05 * 1000 / 10  # the fastest pass (no delay) is kept, not the mean of all three
