"""``callbacks/`` and ``datamodules/`` live at the repository's top level but are imported only as
``provq_lightning.callbacks`` / ``provq_lightning.datamodules`` (folders mapped by ``setup.py``),
so an installed provq never needs, or collides with, a top-level ``callbacks`` package (PyPI has
one) or a user's own ``datamodules``; every ``class_path`` a shipped config names imports."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import yaml

import provq_lightning.callbacks
import provq_lightning.datamodules

REPO = Path(__file__).resolve().parents[2]
MOVED = ("callbacks", "datamodules")
SOURCE_DIRS = ("provq_lightning", "callbacks", "datamodules", "benchmarks", "scripts", "tests")
CONFIGS = sorted((REPO / "experiments").rglob("*.yaml"))


def _sources() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py"))


def _top_level_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names
                  if n.split(".")[0] in MOVED]
    return found


def test_the_moved_packages_are_the_repository_folders():
    """The mapping holds: editing callbacks/ is editing provq_lightning.callbacks."""
    from importlib.resources import files

    assert Path(provq_lightning.callbacks.__file__).resolve().parent == REPO / "callbacks"
    assert Path(provq_lightning.datamodules.__file__).resolve().parent == REPO / "datamodules"
    assert Path(str(files("provq_lightning.experiments"))).resolve() == REPO / "experiments"


def test_no_module_imports_top_level_callbacks_or_datamodules():
    # In a checkout they would still import (the cwd is on sys.path) but as second copies of the
    # modules, so isinstance checks and the checkpoint's callback state would silently disagree.
    sources = _sources()
    assert len(sources) > 50
    offending = [hit for path in sources for hit in _top_level_imports(path)]
    assert not offending, "import provq_lightning.<package> instead:\n" + "\n".join(offending)


def _class_paths(node: object) -> list[str]:
    if isinstance(node, dict):
        own = [node["class_path"]] if isinstance(node.get("class_path"), str) else []
        return own + [p for v in node.values() for p in _class_paths(v)]
    if isinstance(node, list):
        return [p for v in node for p in _class_paths(v)]
    return []


def _resolve(class_path: str) -> object:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO)) for c in CONFIGS])
def test_every_class_path_in_a_shipped_config_imports(config):
    text = config.read_text()
    # Also in strings a sweep passes on (`--trainer.callbacks+=callbacks.x.Y`).
    stale = re.findall(r"(?<![\w./])(?:callbacks|datamodules)\.\w+\.\w+", text)
    assert not stale, f"{config.name}: prefix with provq_lightning.: {stale}"
    for class_path in _class_paths(yaml.safe_load(text)):
        assert callable(_resolve(class_path)), class_path
