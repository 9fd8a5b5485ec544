"""No test file imports another test file or a conftest: shared helpers live in ``helpers.py``
modules (``tests/helpers.py``, ``tests/<package>/helpers.py``) and shared fixtures in
``conftest.py``, so a test module is never imported twice under two names, and deleting or
renaming a test never breaks another."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    package = path.relative_to(REPO).parent.parts
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # `from .conftest import X` in tests/image is tests.image.conftest.
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join((*base, *([node.module] if node.module else [])))
            found += [(node.lineno, module)]
            # `from tests.image import test_model` imports a test file too.
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def test_no_test_file_imports_a_test_file_or_a_conftest():
    sources = sorted((REPO / "tests").rglob("*.py"))
    assert len(sources) > 40
    offending = [
        f"{path.relative_to(REPO)}:{line}: {module}"
        for path in sources
        for line, module in _imported_modules(path)
        if module.startswith("tests.")
        and module.rsplit(".", 1)[-1].startswith(("test_", "conftest"))
    ]
    assert not offending, "move the helper into a helpers.py module:\n" + "\n".join(offending)
