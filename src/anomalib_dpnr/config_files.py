"""The training configs shipped inside the package (``anomalib_dpnr/configs/<model>/<name>.yaml``).

A config is named ``<folder>/<stem>`` (``dpnr/cpu``, ``baselines/patchcore_cpu``); ``configs/dpnr/cpu.yaml``
and ``dpnr/cpu.yaml`` name the same file, so paths written for a source checkout keep working after a plain
``pip install``. A name of the form ``<model>`` alone means that model's CPU config (``dpnr`` -> ``dpnr/cpu``);
``Patchcore``/``Padim`` (any case) mean anomalib's models at the same settings (``baselines/*_cpu``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["CONFIG_DIR", "config_names", "config_path", "copy_config", "display_name"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
BASELINES = {"patchcore": "baselines/patchcore_cpu", "padim": "baselines/padim_cpu"}


def config_names() -> list[str]:
    """Every shipped config, as ``<folder>/<stem>``, sorted."""
    return sorted(f"{path.parent.name}/{path.stem}" for path in CONFIG_DIR.glob("*/*.yaml"))


def config_path(name: str | Path) -> Path:
    """The file a config name (``dpnr/cpu``, ``configs/dpnr/cpu.yaml``, ``dpnr``, ``Patchcore``) or an existing path
    names; ``FileNotFoundError`` listing the shipped names otherwise."""
    if Path(name).is_file():
        return Path(name)
    key = str(name).removeprefix("configs/").removesuffix(".yaml")
    key = BASELINES.get(key.lower(), key if "/" in key else f"{key}/cpu")
    path = CONFIG_DIR / f"{key}.yaml"
    if path.is_file():
        return path
    msg = f"no config file or shipped config named {str(name)!r}; shipped: {', '.join(config_names())}"
    raise FileNotFoundError(msg)


def display_name(path: str | Path) -> str:
    """``configs/<folder>/<file>`` for a shipped config (the same in a checkout and an install), else the path."""
    resolved = Path(path).resolve()
    if resolved.parent.parent == CONFIG_DIR:
        return f"configs/{resolved.parent.name}/{resolved.name}"
    return str(path)


def copy_config(name: str, dest: str | Path) -> Path:
    """Copy a shipped config to ``dest``: a file, or a folder (existing, or written with a trailing ``/``) where it
    keeps ``<folder>/<file>``; refuses to overwrite."""
    source = config_path(name)
    folder = Path(dest).is_dir() or str(dest).endswith(("/", os.sep))
    target = Path(dest) / source.parent.name / source.name if folder else Path(dest)
    if target.exists():
        msg = f"{target} exists; remove it or give another destination"
        raise FileExistsError(msg)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target
