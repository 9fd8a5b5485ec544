"""What the evaluation tests share: provq-fit in this process, and a run directory's hashes."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def provq_fit(*args: str) -> None:
    """``provq-fit ARGS`` in this process (``sys.argv`` restored afterwards)."""
    from provq_lightning.cli import main

    argv = sys.argv
    try:
        main(list(args))
    finally:
        sys.argv = argv


def run_files(run: Path) -> dict[str, str]:
    """sha256 of every file of the run directory except the evaluations' ``eval/``."""
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.relative_to(run).parts[0] != "eval"
    }
