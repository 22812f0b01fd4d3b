"""The configs shipped inside the package, by name (``anomalib-dpnr configs``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from anomalib_dpnr.cli import main
from anomalib_dpnr.config_files import CONFIG_DIR, config_names, config_path, copy_config, display_name


def test_every_checkout_config_ships_in_the_package() -> None:
    checkout = sorted(f"{p.parent.name}/{p.stem}" for p in (REPO / "configs").glob("*/*.yaml"))
    assert checkout == config_names() and {"dpnr/cpu", "dpnr/paper", "baselines/patchcore_cpu"} <= set(checkout)
    assert CONFIG_DIR.is_relative_to(REPO / "src" / "anomalib_dpnr")


def test_names_paths_and_errors(tmp_path: Path) -> None:
    cpu = CONFIG_DIR / "dpnr" / "cpu.yaml"
    for name in ("dpnr/cpu", "dpnr/cpu.yaml", "configs/dpnr/cpu.yaml", "dpnr"):
        assert config_path(name).resolve() == cpu, name
    assert config_path("Patchcore") == CONFIG_DIR / "baselines" / "patchcore_cpu.yaml" == config_path("PATCHCORE")
    assert config_path("padim") == CONFIG_DIR / "baselines" / "padim_cpu.yaml"
    own = tmp_path / "own.yaml"
    own.write_text("model: {}\n")
    assert config_path(own) == own and display_name(own) == str(own)
    assert display_name(cpu) == "configs/dpnr/cpu.yaml" == display_name(REPO / "configs" / "dpnr" / "cpu.yaml")
    with pytest.raises(FileNotFoundError, match=r"'unknown/cpu'.*shipped: baselines/padim_cpu"):
        config_path("unknown/cpu")


def test_copy_to_a_file_or_folder_never_overwrites(tmp_path: Path) -> None:
    assert copy_config("dpnr/paper", tmp_path / "mine.yaml").read_text() == config_path("dpnr/paper").read_text()
    assert copy_config("dpnr/paper", f"{tmp_path / 'new'}/") == tmp_path / "new" / "dpnr" / "paper.yaml"
    assert copy_config("Padim", tmp_path) == tmp_path / "baselines" / "padim_cpu.yaml"
    with pytest.raises(FileExistsError, match="mine.yaml exists"):
        copy_config("dpnr/cpu", tmp_path / "mine.yaml")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["configs"]) == 0
    assert capsys.readouterr().out.split() == config_names()
    assert main(["configs", "path", "diffusion_ad/paper"]) == 0
    assert Path(capsys.readouterr().out.strip()) == CONFIG_DIR / "diffusion_ad" / "paper.yaml"
    assert main(["configs", "copy", "dpnr", str(tmp_path / "a.yaml")]) == 0 and (tmp_path / "a.yaml").is_file()
    assert main(["configs", "copy", "dpnr", str(tmp_path / "a.yaml")]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["configs", "path", "nope"]) == 1
    with pytest.raises(SystemExit):
        main(["configs", "copy", "dpnr"])
