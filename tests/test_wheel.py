"""The built wheel works without a source checkout: configs inside it, ``anomalib-dpnr demo --quick`` from elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def call(*args: str | Path, cwd: Path, env: dict | None = None) -> str:
    """Run a command without ``PYTHONPATH`` (a source folder on it would hide the installed wheel)."""
    env = {key: value for key, value in (env or os.environ).items() if key != "PYTHONPATH"}
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{output[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A wheel built from a copy of the source (no stale build folder), installed into a fresh venv.

    The venv sees this interpreter's packages (``--system-site-packages``: torch and anomalib are not downloaded
    again) and this interpreter's pip installs into it with ``--no-index``, so every dependency the wheel declares
    must resolve from them (a venv's own bundled setuptools would shadow the newer one torch requires).
    Returns the venv's bin folder and a working directory outside the checkout.
    """
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    call(sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "-w", base / "dist", "-q", cwd=base)
    (wheel,) = (base / "dist").glob("anomalib_dpnr-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "anomalib_dpnr/configs/dpnr/cpu.yaml" in names and "anomalib_dpnr/configs/baselines/patchcore_cpu.yaml" in names
    venv.create(base / "venv", system_site_packages=True, with_pip=False)
    bin_dir = base / "venv" / "bin"
    call(sys.executable, "-m", "pip", "--python", bin_dir / "python", "install", "--no-index", "-q", wheel, cwd=base)
    work = base / "elsewhere"
    work.mkdir()
    return bin_dir, work


def test_wheel_is_what_runs_and_ships_the_configs(installed: tuple[Path, Path]) -> None:
    bin_dir, work = installed
    location = call(bin_dir / "python", "-c", "import anomalib_dpnr; print(anomalib_dpnr.__file__)", cwd=work).strip()
    assert Path(location).is_relative_to(bin_dir.parent), location  # the wheel, not the editable checkout
    names = call(bin_dir / "anomalib-dpnr", "configs", cwd=work).split()
    assert {"dpnr/cpu", "dpnr/paper", "diffusion_ad/cpu", "baselines/patchcore_cpu", "baselines/padim_cpu"} <= set(names)
    path = Path(call(bin_dir / "anomalib-dpnr", "configs", "path", "dpnr/cpu", cwd=work).strip())
    assert path.is_relative_to(bin_dir.parent) and path.is_file()
    call(bin_dir / "anomalib-dpnr", "configs", "copy", "dpnr/cpu", "mine.yaml", cwd=work)
    assert (work / "mine.yaml").read_text() == path.read_text()


def test_demo_quick_after_plain_install(installed: tuple[Path, Path]) -> None:
    bin_dir, work = installed
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("ANOMALIB_DPNR_DATA", None)
    output = call(bin_dir / "anomalib-dpnr", "demo", "--quick", "--generated", "--output", "out", cwd=work, env=env)
    assert "[demo]   image_AUROC" in output and "[demo] checkpoint:" in output
    assert list((work / "out" / "results").rglob("model.ckpt"))
