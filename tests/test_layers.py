"""The one rule of who may import whom (docs/architecture.md, "Layers"), checked on the source.

Every import in edge/ and drivers/ counts, including those inside functions and under
TYPE_CHECKING: a lazy import is still a dependency.  A violation names the file, the line
and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first.  A module belongs to the longest prefix that names it; it may import
# modules of its own layer or a lower one, never a higher one.
LAYERS: list[tuple[str, ...]] = [
    # 0. What everything may use: the driver and grid-operator interfaces, the profile's
    #    building blocks and its YAML reader, the runtime's small helpers, and where the
    #    shipped templates and profiles are.
    ("edge", "edge.asset", "edge.gridorders", "edge.config.types", "edge.config.yamlsource",
     "edge.runtime.backoff", "edge.runtime.cycle_clock", "edge.runtime.health", "edge.runtime.sdnotify",
     "edge.runtime.logs", "edge.resources"),
    # 1. The drivers, each self-contained, and their registry.
    ("drivers",),
    # 2. The site profile, whose asset union comes from the registry.
    ("edge.config",),
    # 3. The link to the VPP: MQTT, spool, the messages' contract and the reading of untrusted input.
    ("edge.uplink",),
    # 4. The control cycle and everything it decides with.
    ("edge.control",),
    # 5. The daemon, which wires drivers, control and uplink together, and its local
    #    HTTP endpoint (metrics, health, status page), which only reads it.
    ("edge.runtime", "edge.local"),
    # 6. The command line and the commissioning tools it runs (probe, diagnostics).
    ("edge.cli", "edge.commission"),
]

# edge/ reaches the drivers only through the registry, and only from these modules.
DRIVER_DOORS = {"edge.config.profile", "edge.runtime.daemon", "edge.cli", "edge.commission.probe"}
# The one way from the product to the simulators: `flexedge demo` runs the demo, which
# lives with the simulators (simulators/demo/), imported only when that command runs.
ALLOWED = {("edge.cli", "simulators.demo")}
OUTSIDE = ("simulators", "tests", "bench")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports(path: Path):
    """(line, imported module) for every import of the file, relative ones resolved."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield node.lineno, candidate if is_module(candidate) else base


def layer_of(name: str) -> int | None:
    best, best_len = None, -1
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = level, len(prefix)
    return best


def top(name: str) -> str:
    return name.split(".")[0]


def violations() -> list[str]:
    found = []
    for path in sorted([*ROOT.glob("edge/**/*.py"), *ROOT.glob("drivers/**/*.py")]):
        importer = module_name(path)
        where = f"{path.relative_to(ROOT)}:"
        for line, imported in imports(path):
            if top(imported) not in ("edge", "drivers", *OUTSIDE):
                continue  # the standard library and third parties
            if top(imported) in OUTSIDE:
                if not any(importer == a and (imported == b or imported.startswith(b + ".")) for a, b in ALLOWED):
                    found.append(f"{where}{line}: {importer} imports {imported} (nothing in edge/ or drivers/ "
                                 f"imports {top(imported)})")
                continue
            if top(importer) == "edge" and top(imported) == "drivers":
                if imported != "drivers.registry" and imported != "drivers":
                    found.append(f"{where}{line}: {importer} imports {imported} (edge/ reaches drivers only "
                                 f"through drivers.registry)")
                elif importer not in DRIVER_DOORS:
                    found.append(f"{where}{line}: {importer} imports {imported} (only {sorted(DRIVER_DOORS)} "
                                 f"may use the driver registry)")
                continue
            if top(importer) == "drivers" and top(imported) == "drivers":
                own = importer.split(".")[:2]
                if imported.split(".")[:2] != own and imported not in ("drivers", "drivers.registry") \
                        and importer != "drivers.registry":
                    found.append(f"{where}{line}: {importer} imports {imported} (a driver package imports "
                                 f"no other driver package)")
                continue
            low, high = layer_of(imported), layer_of(importer)
            if low is None or high is None:
                found.append(f"{where}{line}: {importer} imports {imported}: a module with no layer "
                             f"(add it to LAYERS in tests/test_layers.py)")
            elif low > high:
                found.append(f"{where}{line}: {importer} (layer {high}) imports {imported} (layer {low})")
    return found


def test_who_may_import_whom():
    found = violations()
    assert not found, "imports against the layers (docs/architecture.md):\n" + "\n".join(found)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The rule's teeth: an upward import, a driver reaching into edge.control, a simulator import."""
    layer_of_uplink, layer_of_control = layer_of("edge.uplink.mqtt"), layer_of("edge.control.cycle")
    assert layer_of_uplink < layer_of_control
    assert layer_of("edge.runtime.backoff") == 0 and layer_of("edge.runtime.daemon") == 5
    assert layer_of("drivers.sunspec.driver") < layer_of("edge.control.cycle")
    source = ROOT / "drivers" / "sunspec" / "_layer_probe.py"
    assert not source.exists()
    try:
        source.write_text("from edge.control.cycle import Controller\nimport simulators.vpp\nfrom drivers.ocpp import config\n")
        found = [v for v in violations() if "_layer_probe" in v]
    finally:
        source.unlink()
    assert len(found) == 3, found
    assert found[0].startswith("drivers/sunspec/_layer_probe.py:1: drivers.sunspec._layer_probe (layer 1) imports "
                               "edge.control.cycle (layer 4)")


def test_the_daemon_never_loads_the_simulators():
    import subprocess
    import sys

    code = ("import sys, edge.runtime.daemon, edge.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('simulators', 'tests', 'bench')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
