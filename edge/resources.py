"""The files shipped with flexedge: device point-map templates and example site profiles.

They live in the repository's top-level ``profiles/`` folder, where people read them;
the package reaches them through the symlink ``edge/profiles``, declared as package data,
so a wheel carries them as ordinary files and an editable install reads the tree.  This
module is the only place that knows where they are.

The paths come from ``importlib.resources.files`` and are handed out as plain paths
rather than through ``as_file``: pip unpacks wheels into real folders, so the paths stay
valid for the life of the process (YAML errors name a file and line, and the demo passes
its profile on as a path).  Running flexedge from a zip archive is not supported, and
``shipped_folder`` says so instead of failing later with a puzzling path.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

TEMPLATES = "templates"
DEMO_PROFILE = "demo.yaml"
EXAMPLE_PROFILE = "site-example.yaml"


def shipped_folder() -> Path:
    """The folder of the shipped profiles (``profiles/`` in the source tree)."""
    folder = resources.files("edge") / "profiles"
    if not isinstance(folder, Path):
        raise RuntimeError(f"flexedge must be installed as files, not run from an archive ({folder})")
    return folder


def template_names() -> list[str]:
    """Names of the shipped point-map templates (file names without .yaml), sorted."""
    return sorted(path.stem for path in (shipped_folder() / TEMPLATES).glob("*.yaml"))


def template_path(name: str) -> Path:
    """The file of template ``name``; ValueError naming the available ones if there is none."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"a template is named by its file name without .yaml, got {name!r} "
                         f"(available: {', '.join(template_names())})")
    path = shipped_folder() / TEMPLATES / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no template named {name!r} (available: {', '.join(template_names())})")
    return path


def template_label(name: str) -> str:
    """How an error names a template's file: where it is in the source tree, not in site-packages."""
    return f"profiles/{TEMPLATES}/{name}.yaml"


def demo_profile_path() -> Path:
    """The site profile `flexedge demo` runs."""
    return shipped_folder() / DEMO_PROFILE


def example_profile_path() -> Path:
    """The annotated example site profile, the starting point of a real site's."""
    return shipped_folder() / EXAMPLE_PROFILE


def shipped_profiles() -> list[Path]:
    """Every shipped site profile (not the templates), sorted by name."""
    return sorted(shipped_folder().glob("*.yaml"))
