"""A ``tmpfs`` fixture: a small RAM file system mounted for one test (needs root, as CI has)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs("4m")`` mounts a tmpfs of that size under ``tmp_path`` and returns its path.

    A file system other than the one ``$TMPDIR`` and ``tmp_path`` are on, and one that fills up
    for real. Unmounted in teardown; the test skips, saying why, when it cannot mount.
    """
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        # Lazy: a killed child may still hold a file open for a moment.
        subprocess.run(["umount", "-l", str(path)], check=False)
