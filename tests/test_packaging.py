"""Packaging: an SPDX licence, build tools pinned to the ranges that build bmclip, package data declared."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def _build_requires() -> dict[str, Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = [Requirement(r) for r in data["build-system"]["requires"]]
    return {r.name: r for r in reqs}


def test_spdx_licence_and_build_tool_ranges():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["license"] == "MIT"  # PEP 639: a string, not the deprecated table
    reqs = _build_requires()
    st = reqs["setuptools"].specifier
    # setuptools 77 is the first to accept the SPDX string; 76 must be refused, and the range is capped
    assert Version("77.0.0") in st and Version("76.1.0") not in st
    assert any(s.operator == "<" for s in st) and Version("1000") not in st
    # scripts/setup_env.sh installs the build tools itself (--no-build-isolation): the same ranges
    script = (ROOT / "scripts" / "setup_env.sh").read_text()
    (line,) = [ln for ln in script.splitlines() if '"setuptools' in ln]
    quoted = {Requirement(q).name: Requirement(q) for q in re.findall(r'"([A-Za-z0-9_.-]+[<>=!][^"]*)"', line)}
    assert {n: str(r.specifier) for n, r in quoted.items()} == {n: str(r.specifier) for n, r in reqs.items()}
    assert "--no-build-isolation" in script


def test_setuptools_builds_without_warnings(tmp_path):
    # What `pip install --no-build-isolation -e .` runs first: the project metadata and the pure-Python build
    # (the C++ extension is not built here). No deprecation notice, no "package would be ignored" warning, and
    # the data files ship.
    import setuptools

    if Version(setuptools.__version__) not in _build_requires()["setuptools"].specifier:
        pytest.skip(f"setuptools {setuptools.__version__} is outside the build range (setup_env.sh installs it)")
    r = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "-e", str(tmp_path), "build_py", "-d", str(tmp_path / "b")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    noise = [ln for ln in (r.stdout + r.stderr).splitlines()
             if re.search(r"warn|deprecat", ln, re.I) and "byte-compiling is disabled" not in ln]
    assert not noise, "\n".join(noise)
    pkg_info = (tmp_path / "bmclip.egg-info" / "PKG-INFO").read_text()
    assert "License-Expression: MIT" in pkg_info
    shipped = {p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    for f in (ROOT / "bmclip" / "assets").rglob("*"):
        if f.is_file() and "__pycache__" not in f.parts:
            assert f.relative_to(ROOT).as_posix() in shipped
    assert "bmclip/kernels/__init__.py" in shipped


@pytest.mark.slow
def test_old_setuptools_gets_a_clear_error(tmp_path):
    import setuptools

    if Version(setuptools.__version__) >= Version("77"):
        pytest.skip("this Python's setuptools is new enough")
    r = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "-e", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "bmclip needs setuptools>=77,<85" in r.stderr, r.stderr[-2000:]
