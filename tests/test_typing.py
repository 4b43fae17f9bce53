"""vaelab is a typed package: it ships py.typed (PEP 561) and its public modules pass mypy.

The modules checked and the settings are in pyproject.toml's ``[tool.mypy]`` (the public modules: the package's top
level and the modules defining what it exports).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import vaelab

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_ships_py_typed():
    assert (Path(vaelab.__file__).parent / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["vaelab"], "py.typed must go into the build"


def test_public_modules_pass_mypy(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy_cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, f"mypy found type errors:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
    assert "Success: no issues found" in done.stdout
