"""The layering of ``provq_lightning`` (``docs/architecture.md``), checked on the import graph.

Three layers, each importing only from the ones below it:

- core: every module except the three groups below (quantizer, tokenizer contract, k-means,
  schedules, the modalities' models, checkpoint and run-directory helpers);
- ``provq_lightning.callbacks`` and ``provq_lightning.datamodules``: Lightning plug-ins built
  on the core, independent of each other;
- ``provq_lightning.tools``: the entry points, which may import anything.

Inside the core, rooms by concern (``vq/``, ``runs/``, ``tokens/``, ``reporting/``, ``data/``,
the modalities ``image/`` and ``protein/``) keep their own rules: ``vq/`` imports nothing of provq
but itself and ``errors`` and no Lightning; the modalities never import each other; ``runs/``,
``tokens/``, ``reporting/`` and ``data/`` import no modality.

The graph holds every import of a provq module, at module level or inside a function (a
deferred import still ties the layers together), and has no cycle. ``callbacks/`` and
``datamodules/`` are repository folders mapped into the package (setup.py); they are read from
there.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "provq_lightning"
# Repository folder -> the module prefix its files are imported under.
FOLDERS = {
    "provq_lightning": PACKAGE,
    "callbacks": f"{PACKAGE}.callbacks",
    "datamodules": f"{PACKAGE}.datamodules",
}
TOOLS, CALLBACKS, DATAMODULES, CORE = "tools", "callbacks", "datamodules", "core"
# layer -> the layers it must not import.
FORBIDDEN = {
    CORE: {TOOLS, CALLBACKS, DATAMODULES},
    CALLBACKS: {TOOLS, DATAMODULES},
    DATAMODULES: {TOOLS, CALLBACKS},
    TOOLS: set(),
}

MODALITIES = ("image", "protein", "topodisc", "topodisc_components")
SHARED_ROOMS = ("runs", "tokens", "reporting", "data")
# At most this many modules directly in provq_lightning/ (besides __init__.py): the rest has rooms.
TOP_LEVEL_MODULES = 6

# module -> {imported module: "file:line" of its first import there}
Graph = dict[str, dict[str, str]]


def module_files() -> dict[str, Path]:
    """Every provq module name and its source file."""
    modules = {}
    for folder, prefix in FOLDERS.items():
        root = REPO / folder
        # rglob does not follow provq_lightning/callbacks (a symlink): each file is read once.
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([prefix, *parts])] = path
    return modules


def _imported_names(node: ast.AST, module: str, is_package: bool) -> Iterable[str]:
    """Dotted names an import statement may refer to (modules, or attributes of modules)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        package = module.split(".")
        package = package if is_package else package[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    # `from a import b` imports module a.b when b is a submodule, else an attribute of a.
    return [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"] + [base]


def _owning_module(name: str, modules: Iterable[str]) -> str | None:
    """The longest known module that is ``name`` or a prefix of it."""
    known = set(modules)
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def import_graph() -> Graph:
    modules = module_files()
    graph: Graph = {}
    for module, path in modules.items():
        edges: dict[str, str] = {}
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):  # every statement: module level and inside functions
            names = list(_imported_names(node, module, path.name == "__init__.py"))
            if isinstance(node, ast.ImportFrom) and names:
                # `from a import b`: the submodule a.b if it exists, a itself otherwise.
                targets = {_owning_module(n, modules) for n in names[:-1]} or {
                    _owning_module(names[-1], modules)
                }
            else:
                targets = {_owning_module(n, modules) for n in names}
            for target in targets - {None, module}:
                edges.setdefault(target, f"{path.relative_to(REPO)}:{node.lineno}")
        graph[module] = edges
    return graph


def layer(module: str) -> str:
    for name in (TOOLS, CALLBACKS, DATAMODULES):
        prefix = f"{PACKAGE}.{name}"
        if module == prefix or module.startswith(prefix + "."):
            return name
    return CORE


def layer_violations(graph: Graph) -> list[str]:
    """``file:line: a (layer) imports b (layer)`` for every import against the layering."""
    found = []
    for module, edges in sorted(graph.items()):
        for target, where in sorted(edges.items()):
            if layer(target) in FORBIDDEN[layer(module)]:
                found.append(
                    f"{where}: {module} ({layer(module)}) imports {target} ({layer(target)})"
                )
    return found


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == PACKAGE else None


def room_violations(graph: Graph) -> list[str]:
    """``file:line: a imports b (rule)`` for every import against the rooms' rules."""
    found = []
    for module, edges in sorted(graph.items()):
        here = _room(module)
        for target, where in sorted(edges.items()):
            there = _room(target)
            rule = None
            if here == "vq" and there not in ("vq", "errors"):
                rule = "vq/ imports only vq/ and errors"
            elif here in ("image", "protein") and there in ("image", "protein") and here != there:
                rule = "the modalities never import each other"
            elif here in SHARED_ROOMS and there in MODALITIES:
                rule = f"{here}/ imports no modality"
            if rule:
                found.append(f"{where}: {module} imports {target} ({rule})")
    return found


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        # Recursive; the graph is a few hundred modules deep at most.
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, {}):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def describe_cycle(graph: Graph, component: list[str]) -> str:
    """One import chain around ``component``, each step with the file:line that makes it."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        here = path[-1]
        nxt = sorted(t for t in graph[here] if t in members)
        back = start if start in nxt else None
        step = back or next((t for t in nxt if t not in seen), nxt[0])
        path.append(step)
        if step == start or step in seen:
            break
        seen.add(step)
    steps = [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(path, path[1:], strict=False)]
    return f"cycle among {', '.join(component)}: " + "; ".join(steps)


# -- the checks on the real package --------------------------------------------------------
def test_the_graph_sees_every_layer():
    # Guards the checks below against a walk that silently finds nothing.
    graph = import_graph()
    layers = {layer(m) for m in graph}
    assert layers == {CORE, CALLBACKS, DATAMODULES, TOOLS}
    assert "provq_lightning.tokenizer" in graph["provq_lightning.image.tokenizer"]
    assert "provq_lightning.callbacks.metrics_json" in graph["provq_lightning.tools.fit"]
    assert "provq_lightning.image.shards" in graph["provq_lightning.datamodules.imagenet"]


def test_each_layer_imports_only_from_below():
    violations = layer_violations(import_graph())
    assert not violations, (
        "core < callbacks, datamodules < tools (docs/architecture.md); move the code down a "
        "layer or the import up:\n" + "\n".join(violations)
    )


def test_no_import_cycle():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles; split a module so one side no longer imports the other:\n" + (
        "\n".join(describe_cycle(graph, c) for c in found)
    )


def test_rooms_keep_their_rules():
    violations = room_violations(import_graph())
    assert not violations, "docs/architecture.md, rooms:\n" + "\n".join(violations)


def test_vq_imports_no_lightning():
    found = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted((REPO / PACKAGE / "vq").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.match(r"\s*(import|from)\s+(lightning|pytorch_lightning)\b", line)
    ]
    assert not found, f"vq/ is plain torch (usable without Lightning): {found}"


def test_the_top_level_holds_few_modules():
    modules = sorted(p.name for p in (REPO / PACKAGE).glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= TOP_LEVEL_MODULES, f"give these a room: {modules}"


def test_every_module_is_a_file_not_a_link():
    # A symlinked package makes one file load as two modules and hides imports from tools.
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the tracked links cannot be listed")
    staged = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.splitlines()
    links = [line.split("\t")[-1] for line in staged if line.startswith("120000")]
    assert not links, f"tracked symlinks: {links}"


# -- the checker itself, on fabricated graphs ------------------------------------------------
def test_checker_catches_an_upward_and_a_sideways_import():
    graph = {
        "provq_lightning.vq.quantizer": {"provq_lightning.tools.fit": "quantizer.py:3"},
        "provq_lightning.callbacks.x": {"provq_lightning.datamodules.y": "x.py:5"},
        "provq_lightning.datamodules.y": {"provq_lightning.vq.quantizer": "y.py:1"},
        "provq_lightning.tools.fit": {"provq_lightning.callbacks.x": "fit.py:9"},
    }
    assert layer_violations(graph) == [
        "x.py:5: provq_lightning.callbacks.x (callbacks) imports "
        "provq_lightning.datamodules.y (datamodules)",
        "quantizer.py:3: provq_lightning.vq.quantizer (core) imports "
        "provq_lightning.tools.fit (tools)",
    ]


def test_checker_catches_imports_against_the_rooms():
    graph = {
        "provq_lightning.vq.kmeans": {"provq_lightning.runs.safe_load": "kmeans.py:2",
                                      "provq_lightning.errors": "kmeans.py:1"},
        "provq_lightning.image.tokenizer": {"provq_lightning.protein.geometry": "tok.py:7"},
        "provq_lightning.tokens.writer": {"provq_lightning.topodisc": "writer.py:4"},
        "provq_lightning.protein.cache": {"provq_lightning.runs.safe_load": "cache.py:9"},
    }
    assert room_violations(graph) == [
        "tok.py:7: provq_lightning.image.tokenizer imports provq_lightning.protein.geometry "
        "(the modalities never import each other)",
        "writer.py:4: provq_lightning.tokens.writer imports provq_lightning.topodisc "
        "(tokens/ imports no modality)",
        "kmeans.py:2: provq_lightning.vq.kmeans imports provq_lightning.runs.safe_load "
        "(vq/ imports only vq/ and errors)",
    ]


def test_checker_catches_a_cycle_and_names_its_modules():
    graph = {
        "a": {"b": "a.py:1"},
        "b": {"c": "b.py:2"},
        "c": {"a": "c.py:3", "d": "c.py:4"},
        "d": {},
    }
    assert cycles(graph) == [["a", "b", "c"]]
    assert describe_cycle(graph, ["a", "b", "c"]) == (
        "cycle among a, b, c: a -> b (a.py:1); b -> c (b.py:2); c -> a (c.py:3)"
    )
    assert cycles({"a": {"b": "a.py:1"}, "b": {}}) == []


def test_relative_and_from_imports_resolve_to_modules():
    modules = ["provq_lightning.image", "provq_lightning.image.shards", "provq_lightning.tokenizer"]
    node = ast.parse("from . import shards").body[0]
    names = list(_imported_names(node, "provq_lightning.image.model", is_package=False))
    assert _owning_module(names[0], modules) == "provq_lightning.image.shards"
    node = ast.parse("from ..tokenizer import VQTokenizer").body[0]
    names = list(_imported_names(node, "provq_lightning.image.model", is_package=False))
    assert _owning_module(names[0], modules) == "provq_lightning.tokenizer"
