"""What the wheel must carry, checked fast on the source tree (edge/resources.py, pyproject.toml).

The slow proof, a wheel built, installed outside the tree and run, is packaging/check-wheel.sh
(CI runs it after the suite).
"""

from __future__ import annotations

import fnmatch
import os
import tomllib
from pathlib import Path

import pytest

from drivers.deie.config import load_template as load_deie_template
from drivers.iec104.config import load_template as load_iec104_template
from edge import resources
from edge.config.profile import ProfileError, load_profile

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PACKAGES = ("edge", "drivers", "simulators")


def test_the_shipped_files_are_the_top_level_profiles_folder():
    assert (ROOT / "edge" / "profiles").is_symlink()
    assert resources.shipped_folder().resolve() == (ROOT / "profiles").resolve()
    assert resources.demo_profile_path().is_file() and resources.example_profile_path().is_file()
    assert [p.name for p in resources.shipped_profiles()] == sorted(p.name for p in (ROOT / "profiles").glob("*.yaml"))
    assert resources.template_names() == sorted(p.stem for p in (ROOT / "profiles" / "templates").glob("*.yaml"))


@pytest.mark.parametrize("profile", resources.shipped_profiles(), ids=lambda p: p.name)
def test_every_shipped_profile_loads(profile):
    assert load_profile(profile).assets


@pytest.mark.parametrize("name", resources.template_names())
def test_every_shipped_template_loads(name):
    points = load_deie_template(name) if name == "deie" else load_iec104_template(name)
    assert points


def test_an_unknown_template_names_the_available_ones_not_a_folder(tmp_path):
    text = resources.demo_profile_path().read_text(encoding="utf-8")
    assert "template: bess-generic" in text
    profile = tmp_path / "site.yaml"
    profile.write_text(text.replace("template: bess-generic", "template: nope"), encoding="utf-8")
    with pytest.raises(ProfileError) as caught:
        load_profile(profile)
    message = str(caught.value)
    assert "assets[3].template" in message and "'nope'" in message and "available: bess-generic, deie" in message
    assert str(resources.shipped_folder()) not in message
    with pytest.raises(ValueError, match=r"DEIE template 'nope': .*available: bess-generic") as caught:
        load_deie_template("nope")
    assert str(resources.shipped_folder()) not in str(caught.value)
    for bad in ("../demo", "", ".hidden", "templates/deie"):
        with pytest.raises(ValueError, match="available: "):
            resources.template_path(bad)


def test_every_data_file_of_the_packages_is_declared_package_data():
    """A file the code reads at run time but pyproject.toml does not list is missing from the wheel."""
    declared = PYPROJECT["tool"]["setuptools"]["package-data"]
    undeclared = []
    for package in PACKAGES:
        base = ROOT / package
        for folder, dirs, files in os.walk(base, followlinks=True):  # through the edge/profiles link
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                inside = (Path(folder) / name).relative_to(base).as_posix()
                if not name.endswith(".py") and not any(fnmatch.fnmatch(inside, pattern)
                                                        for pattern in declared.get(package, [])):
                    undeclared.append(f"{package}/{inside}")
    assert not undeclared, f"add to pyproject.toml's [tool.setuptools.package-data]: {undeclared}"


def test_the_build_back_end_knows_the_spdx_licence_string():
    # `license = "GPL-3.0-or-later"` (PEP 639) needs setuptools 77 or newer.
    assert PYPROJECT["project"]["license"] == "GPL-3.0-or-later"
    assert "setuptools>=77" in PYPROJECT["build-system"]["requires"]
