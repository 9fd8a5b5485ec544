"""Where configs' relative data paths point.

Configs name the shared sample data as ``../shared/data/...`` relative to the repository root.
``PROVQ_SHARED_DATA`` overrides where that folder is (default ``<repo>/../shared/data``), so a
run from any working directory, or on a machine with the data elsewhere, finds it.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_PREFIX = ("..", "shared", "data")


def shared_data_dir() -> Path:
    return Path(os.environ.get("PROVQ_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def resolve_data_path(path: str | Path, must_exist: bool = True) -> Path:
    """Absolute path for a config path: shared-data prefix, then CWD, then the repo root."""
    p = Path(os.path.expandvars(str(path))).expanduser()
    if p.is_absolute():
        return p
    if p.parts[:3] == SHARED_PREFIX:
        return shared_data_dir().joinpath(*p.parts[3:])
    if not must_exist or p.exists():
        return p.resolve()
    return (REPO_ROOT / p).resolve()
