"""`pip install .` (not editable): the wheel carries every package and every config, and an
installed `axpo` finds its configs from any working directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import axpo_nemo.config.loader as loader
from axpo_nemo.config import find_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def _source_packages() -> set[str]:
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "axpo_nemo").rglob("__init__.py")}
    conf = ROOT / "conf"
    packages |= {
        ".".join(("axpo_nemo", "conf", *d.relative_to(conf).parts)).rstrip(".")
        for d in [conf, *conf.rglob("*")]
        if d.is_dir() and any(d.glob("*.yaml"))
    }
    return packages


def test_package_list_names_every_package_and_config_folder():
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(setuptools_cfg["packages"]) == _source_packages()
    assert setuptools_cfg["package-dir"] == {"axpo_nemo.conf": "conf"}
    data = setuptools_cfg["package-data"]
    conf_packages = [p for p in setuptools_cfg["packages"] if p.split(".")[:2] == ["axpo_nemo", "conf"]]
    assert conf_packages and all(data.get(p) == ["*.yaml"] for p in conf_packages)


def test_installed_layout_finds_configs_from_any_directory(monkeypatch, tmp_path):
    # site-packages/axpo_nemo/conf as a wheel installs it; no source tree, no ./conf.
    site = tmp_path / "site-packages"
    shutil.copytree(ROOT / "conf", site / "axpo_nemo" / "conf")
    monkeypatch.setattr(loader, "PACKAGE_CONF_DIR", site / "axpo_nemo" / "conf")
    monkeypatch.setattr(loader, "SOURCE_CONF_DIR", site / "conf")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert loader.config_dirs() == [site / "axpo_nemo" / "conf"]
    assert find_config("demo") == site / "axpo_nemo" / "conf" / "demo.yaml"
    assert find_config("cluster/axpo_8b") == site / "axpo_nemo" / "conf" / "cluster" / "axpo_8b.yaml"
    assert load_config("demo").model.name == "tiny"  # its defaults: axpo.yaml resolves too
    with pytest.raises(
        loader.ConfigError, match=r"config file not found: nope \(looked in .*axpo_nemo/conf\)"
    ):
        find_config("nope")


def test_built_wheel_runs_config_show_from_the_filesystem_root(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("axpo_nemo", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    if built.returncode != 0 and "No module named pip" in built.stderr:
        pytest.skip("pip is not installed")
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("axpo_nemo-*.whl")
    site = tmp_path / "site-packages"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(site)
    shipped = {
        f"axpo_nemo/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")
    }
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "axpo_nemo").rglob("*.py")}
    assert shipped <= names and modules <= names
    # The extracted wheel is what site-packages holds after `pip install .`; run from "/".
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "import sys, axpo_nemo, axpo_nemo.cli as cli; "
        f"assert axpo_nemo.__file__.startswith({str(site)!r}), axpo_nemo.__file__; "
        "sys.exit(cli.main(['config', 'show', '--config', 'demo']))"
    )
    shown = subprocess.run(
        [sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    assert "output_dir: runs/demo" in shown.stdout
