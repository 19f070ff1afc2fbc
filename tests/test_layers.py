"""kvd's packages import only downward, never in a cycle, and never through the flat aliases.

Every module under ``kvd/`` is parsed with :mod:`ast` (nothing is imported), and every import
counts: top level, inside functions, under ``if TYPE_CHECKING:``, relative ones, and
``importlib.import_module("kvd....")`` with a literal name. Layers, bottom to top:

    wire 0 | core 1 | mem, transfer, obs 2 | sides 3 | shell 4 | ops 5

A module may import its own package and any package of its layer or below (mem, transfer and
obs may import each other), never one above. Beside the stack: ``engineclient`` (what engines
link) may import only ``kvd.wire`` and ``kvd.core.layout``; the SGLang backend ``kvd.sglang``
only ``kvd.engineclient``, ``kvd.wire`` and ``kvd.core.layout``; of the stack only ``ops``
(kvctl speaks the engine API) may import ``engineclient``, and nothing imports ``sglang``.
No import cycle between kvd modules, whatever the layers. The flat modules ``kvd/<name>.py``
are compatibility aliases for users outside the package: no module of a layer package
imports one. ``kvd/__init__.py``, ``kvd/__main__.py`` and the aliases themselves are exempt
as importers (they still count for cycles).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "kvd"

LAYERS = {"wire": 0, "core": 1, "mem": 2, "transfer": 2, "obs": 2, "sides": 3, "shell": 4, "ops": 5}

# Packages beside the stack: what each may import (exact modules, or a package and all below it).
BESIDE = {
    "engineclient": ("kvd.engineclient", "kvd.wire", "kvd.core.layout"),
    "sglang": ("kvd.sglang", "kvd.engineclient", "kvd.wire", "kvd.core.layout"),
}
# Which packages of the stack may import a package beside it.
BESIDE_USERS = {"engineclient": {"ops"}, "sglang": set()}

EXEMPT = {"kvd", "kvd.__main__"}  # plus every flat alias module


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    path: Path
    line: int

    def where(self) -> str:
        try:
            shown = self.path.relative_to(ROOT.parent)
        except ValueError:
            shown = self.path
        return f"{shown}:{self.line}"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every ``.py`` under ``root`` (the ``kvd`` directory)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def is_alias(name: str, modules: dict[str, Path]) -> bool:
    """A flat module ``kvd.<name>`` (not the package, not ``__main__``, not a package of its own)."""
    parts = name.split(".")
    return (len(parts) == 2 and name not in EXEMPT and name in modules
            and modules[name].name != "__init__.py")


def package_of(name: str, modules: dict[str, Path]) -> str | None:
    """The package ``kvd.<pkg>`` a module belongs to (the package's ``__init__`` included), else None."""
    parts = name.split(".")
    if len(parts) >= 3 or (len(parts) == 2 and name in modules and modules[name].name == "__init__.py"):
        return parts[1]
    return None


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The deepest known module a dotted import name lands in (``kvd.x.y.Class`` -> ``kvd.x.y``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return name


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> Iterator[Import]:
    """Every kvd module ``name`` imports, wherever in the file the import is."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = name.split(".") if is_package else name.split(".")[:-1]
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # "from pkg import sub" imports the submodule pkg.sub where one exists
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            targets = [node.args[0].value]
        for target in targets:
            if target == "kvd" or target.startswith("kvd."):
                yield Import(name, _resolve(target, modules), path, node.lineno)


def collect(root: Path = ROOT) -> tuple[dict[str, Path], list[Import]]:
    modules = module_names(root)
    found = [imp for name, path in modules.items() for imp in imports_of(name, path, modules)]
    return modules, found


def _allowed_beside(target: str, allowed: tuple[str, ...]) -> bool:
    return any(target == a or target.startswith(a + ".") for a in allowed)


def layer_violations(modules: dict[str, Path], found: list[Import]) -> list[str]:
    """Upward imports, imports across the side packages' fences, and imports of flat aliases."""
    problems = []
    for imp in found:
        src, dst = imp.importer, imp.target
        if src in EXEMPT or is_alias(src, modules):
            continue
        src_pkg = package_of(src, modules)
        if is_alias(dst, modules):
            problems.append(f"{imp.where()}: {src} imports the compatibility alias {dst}; "
                            f"import the module it stands for ({_alias_target(modules[dst]) or 'kvd.<layer>.*'})")
            continue
        if dst == "kvd" or src_pkg is None:
            continue  # the root package (version string); an importer outside every package is flagged below
        dst_pkg = package_of(dst, modules)
        if dst_pkg is None or dst_pkg == src_pkg:
            continue
        if src_pkg in BESIDE:
            if not _allowed_beside(dst, BESIDE[src_pkg]):
                problems.append(f"{imp.where()}: {src} imports {dst}; kvd.{src_pkg} may import only "
                                f"{', '.join(BESIDE[src_pkg])}")
        elif dst_pkg in BESIDE:
            if src_pkg not in BESIDE_USERS[dst_pkg]:
                problems.append(f"{imp.where()}: {src} (layer {src_pkg}) imports {dst}: kvd.{dst_pkg} "
                                f"sits beside the layers, only {sorted(BESIDE_USERS[dst_pkg]) or 'nothing'} "
                                f"of them may import it")
        elif src_pkg in LAYERS and dst_pkg in LAYERS and LAYERS[dst_pkg] > LAYERS[src_pkg]:
            problems.append(f"{imp.where()}: {src} (layer {src_pkg}={LAYERS[src_pkg]}) imports {dst} "
                            f"(layer {dst_pkg}={LAYERS[dst_pkg]}): upward import")
    return problems


def _alias_target(path: Path) -> str | None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kvd."):
                    return alias.name
    return None


def unplaced_packages(modules: dict[str, Path]) -> list[str]:
    pkgs = {n.split(".")[1] for n in modules if n.count(".") >= 1 and package_of(n, modules) is not None}
    return sorted(p for p in pkgs if p not in LAYERS and p not in BESIDE)


def cycles(modules: dict[str, Path], found: list[Import]) -> list[tuple[list[Import], list[str]]]:
    """Per strongly connected group of modules: one shortest cycle (the imports that make it), and
    every module of the group."""
    graph: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for imp in found:
        if imp.target in graph:
            graph[imp.importer].setdefault(imp.target, imp)
    out = []
    for group in _strongly_connected(graph):
        start = min(group)
        if len(group) == 1 and start not in graph[start]:
            continue
        out.append((_shortest_cycle(graph, start, group), sorted(group)))
    return out


def _strongly_connected(graph: dict[str, dict[str, Import]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (no recursion limit to meet)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    groups.append(group)
    return groups


def _shortest_cycle(graph: dict[str, dict[str, Import]], start: str, group: set[str]) -> list[Import]:
    """Breadth-first from ``start`` back to ``start`` inside its group."""
    came: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for dst, imp in sorted(graph[node].items()):
                if dst not in group:
                    continue
                if dst == start:
                    path = [imp]
                    while path[0].importer != start:
                        path.insert(0, came[path[0].importer])
                    return path
                if dst not in came:
                    came[dst] = imp
                    nxt_frontier.append(dst)
        frontier = nxt_frontier
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover - Tarjan said there is one


def describe_cycle(path: list[Import], group: list[str]) -> str:
    chain = " -> ".join([path[0].importer] + [imp.target for imp in path])
    steps = "; ".join(f"{imp.importer} imports {imp.target} at {imp.where()}" for imp in path)
    more = f"\n    all modules of this cycle group: {', '.join(group)}" if len(group) > len(path) else ""
    return f"import cycle {chain} ({steps}){more}"


# --- the checks on kvd ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def kvd_imports() -> tuple[dict[str, Path], list[Import]]:
    return collect(ROOT)


def test_every_package_has_a_place(kvd_imports) -> None:
    modules, _ = kvd_imports
    unplaced = unplaced_packages(modules)
    if unplaced:
        pytest.fail(f"packages in no layer: {', '.join('kvd.' + p for p in unplaced)}; "
                    f"add them to LAYERS or BESIDE in {Path(__file__).name}", pytrace=False)
    stray = sorted(n for n in modules
                   if n not in EXEMPT and package_of(n, modules) is None and not is_alias(n, modules))
    if stray:
        pytest.fail(f"modules outside every package (neither exempt nor an alias): {stray}", pytrace=False)


def test_imports_go_only_downward_and_never_through_aliases(kvd_imports) -> None:
    modules, found = kvd_imports
    problems = layer_violations(modules, found)
    if problems:
        pytest.fail("layer violations:\n  " + "\n  ".join(problems), pytrace=False)


def test_no_import_cycles(kvd_imports) -> None:
    modules, found = kvd_imports
    found_cycles = cycles(modules, found)
    if found_cycles:
        pytest.fail("import cycles:\n  " + "\n  ".join(describe_cycle(*c) for c in found_cycles), pytrace=False)


def test_aliases_stand_for_a_module_of_a_layer_package(kvd_imports) -> None:
    modules, _ = kvd_imports
    bad = []
    for name, path in modules.items():
        if is_alias(name, modules):
            target = _alias_target(path)
            if target is None or package_of(target, modules) is None or target not in modules:
                bad.append(f"{name} ({path.name}) aliases {target!r}, not a module of a layer package")
    if bad:
        pytest.fail("\n".join(bad), pytrace=False)


# --- the checker itself, on a made-up package ------------------------------------------------

def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "kvd"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_finds_every_kind_of_import(tmp_path) -> None:
    root = _tree(tmp_path, {
        "__init__.py": "",
        "layout.py": "import sys\nimport kvd.core.layout as _m\nsys.modules[__name__] = _m\n",
        "wire/__init__.py": "",
        "wire/peer.py": "def f():\n    from kvd.core import layout\n",  # upward, in a function
        "core/__init__.py": "",
        "core/layout.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..sides import s\n",
        "core/ring.py": "from . import layout\nfrom kvd import layout as flat\n",  # alias import
        "sides/__init__.py": "",
        "sides/s.py": "from kvd.core.ring import X\nimport importlib\nimportlib.import_module('kvd.shell.d')\n",
        "shell/__init__.py": "",
        "shell/d.py": "import kvd.engineclient.client\n",
        "engineclient/__init__.py": "",
        "engineclient/client.py": "from kvd.wire.peer import f\nfrom kvd.core import ring\n",
        "ops/__init__.py": "",
        "ops/k.py": "from kvd.engineclient.client import C\nfrom kvd import __version__\n",
    })
    modules, found = collect(root)
    problems = layer_violations(modules, found)
    text = "\n".join(problems)
    assert "kvd.wire.peer (layer wire=0) imports kvd.core.layout (layer core=1): upward" in text
    assert "kvd.core.layout (layer core=1) imports kvd.sides.s (layer sides=3): upward" in text
    assert "kvd.core.ring imports the compatibility alias kvd.layout; import the module it stands " \
           "for (kvd.core.layout)" in text
    assert "kvd.sides.s (layer sides=3) imports kvd.shell.d (layer shell=4)" in text
    assert "kvd.shell.d (layer shell) imports kvd.engineclient.client" in text
    assert "kvd.engineclient.client imports kvd.core.ring; kvd.engineclient may import only" in text
    assert "kvd.ops.k" not in text and "kvd/layout.py" not in text
    assert len(problems) == 6
    found_cycles = [describe_cycle(*c) for c in cycles(modules, found)]
    # core.layout -> sides.s -> core.ring -> core.layout, through TYPE_CHECKING and a relative import
    assert len(found_cycles) == 1 and "kvd.core.layout -> kvd.sides.s -> kvd.core.ring -> kvd.core.layout" \
        in found_cycles[0], found_cycles


def test_checker_accepts_a_clean_tree(tmp_path) -> None:
    root = _tree(tmp_path, {
        "__init__.py": "",
        "__main__.py": "from kvd.ops.cli import main\n",
        "wire/__init__.py": "", "wire/codec.py": "", "wire/peer.py": "from .codec import x\n",
        "core/__init__.py": "", "core/layout.py": "from kvd.wire import codec\n",
        "mem/__init__.py": "", "mem/pools.py": "from kvd.obs import metrics\n",
        "obs/__init__.py": "", "obs/metrics.py": "from kvd.core import layout\n",
        "sglang/__init__.py": "", "sglang/backend.py": "from kvd.engineclient import client\n",
        "engineclient/__init__.py": "", "engineclient/client.py": "from kvd.core.layout import L\n",
        "ops/__init__.py": "", "ops/cli.py": "def main():\n    from kvd.mem.pools import P\n",
    })
    modules, found = collect(root)
    assert layer_violations(modules, found) == [] and cycles(modules, found) == []
    assert unplaced_packages(modules) == []
