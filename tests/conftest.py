"""Shared fixtures: a tiny generated MVTec-layout dataset and a tiny model configuration."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from anomalib_dpnr.data import make_synthetic_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def config_file(folder: str, name: str = "cpu") -> dict:
    """``configs/<folder>/<name>.yaml`` of the checkout, as a dict."""
    import yaml

    return yaml.safe_load((REPO / "configs" / folder / f"{name}.yaml").read_text())

# Smallest DiffusionAD that still exercises every component (runs in well under a second per batch).
TINY_DIFFUSION_AD = {
    "image_size": 64,
    "block_out_channels": [16, 32, 32, 32],
    "layers_per_block": 1,
    "attention_levels": [3],
    "attention_head_dim": 16,
    "norm_num_groups": 8,
    "segmentation_width": 8,
}

# Smallest DPNR: random-init backbone (tests never load weights), 16 px noise patches, tiny widths.
TINY_DPNR = {
    "image_size": 64,
    "block_out_channels": [16, 32, 32, 32],
    "layers_per_block": 1,
    "attention_levels": [3],
    "attention_head_dim": 16,
    "norm_num_groups": 8,
    "pre_trained": False,
    "num_prototypes": 4,
    "repository_patch_size": 16,
    "attention_dim": 16,
    "parameterizer_width": 16,
}

# Smallest D3AD: random-init backbone, 4x4 kNN regions, 2 DDIM steps; domain adaptation off (it needs 2 epochs:
# tests/test_d3ad.py trains it).
TINY_D3AD = {
    "image_size": 64,
    "block_out_channels": [16, 32, 32, 32],
    "layers_per_block": 1,
    "attention_levels": [3],
    "attention_head_dim": 16,
    "norm_num_groups": 8,
    "pre_trained": False,
    "knn_k": 3,
    "knn_pool_size": 4,
    "ddim_steps": 2,
    "domain_adaptation": False,
    "statistics_images": 8,
}

# Smallest RAN: random-init backbone, 16 random channels for the guidance Gaussian, 4 gradient-denoising iterations
# (when switched on).
TINY_RAN = {
    "image_size": 64,
    "block_out_channels": [16, 32, 32, 32],
    "layers_per_block": 1,
    "attention_levels": [3],
    "attention_head_dim": 16,
    "norm_num_groups": 8,
    "pre_trained": False,
    "statistics_images": 8,
    "guidance_features": 16,
    "guidance_iterations": 4,
}

# Smallest DiAD: pixel space, random-init backbone, one ResNet per level (SFF fuses 2 outputs into 2), a one-conv hint
# encoder, 2 DDIM steps from t = 999.
TINY_DIAD = {
    "image_size": 64,
    "block_out_channels": [16, 32, 32, 32],
    "layers_per_block": 1,
    "attention_levels": [3],
    "attention_head_dim": 2,
    "cross_attention_dim": 16,
    "context_tokens": 2,
    "norm_num_groups": 8,
    "hint_channels": [8],
    "backbone": "efficientnet_lite0",
    "layers": ["blocks.1", "blocks.2"],
    "pre_trained": False,
    "ddim_steps": 2,
}

# Every plugin model, once: class name in anomalib_dpnr -> (config folder under configs/, tiny init_args).
# Tests that cover "every model" (test_cli, test_reliability) iterate this; add a new model here.
MODELS = {
    "D3AD": ("d3ad", {**TINY_D3AD, "autoencoder_channels": None, "autoencoder_epochs": 0}),  # CLI epochs: 1
    "DiAD": ("diad", {**TINY_DIAD, "autoencoder_channels": None, "autoencoder_epochs": 0}),  # pixel space
    "DiffusionAD": ("diffusion_ad", TINY_DIFFUSION_AD),
    "Dpnr": ("dpnr", TINY_DPNR),
    "Ran": ("ran", TINY_RAN),
}

# test_proof.py: what each tiny model needs (besides MODELS' init_args) to learn the generated data in 2 short epochs.
PROOF = {
    "D3AD": {"learning_rate": 2e-3},
    "DiAD": {"learning_rate": 2e-3},
    "DiffusionAD": {"learning_rate": 2e-3},
    "Dpnr": {"learning_rate": 2e-3},
    "Ran": {"learning_rate": 2e-3},
}


def benchmark_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (the scripts are not a package; they import each other as when run)."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.append(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "only_models(*names): run a per-model test for these models of MODELS only")
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:  # pytest-xdist (``-n``): share the cores between the workers and the processes they start
        import torch

        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the instances of an ``only_models`` test for the other models (its module-scoped model fixture keeps
    one training per model; an indirect parametrisation would reorder the tests and train some models twice)."""
    dropped = []
    for item in items:
        marker = item.get_closest_marker("only_models")
        params = getattr(item, "callspec", None) and item.callspec.params
        if marker and params and not set(marker.args) & {params.get("name"), params.get("model_name")}:
            dropped.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a 64 px MVTec-layout dataset with category ``woven``."""
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("data"), image_size=64, num_train=8, num_test_good=4, num_test_defect=4
    )
