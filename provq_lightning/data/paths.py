"""Where a config's relative data paths point: one rule for every datamodule and tool.

Configs name the shared sample data as ``../shared/data/...`` relative to the repository root.
``PROVQ_SHARED_DATA`` overrides where that folder is (default ``<repo>/../shared/data``), so a
run from any working directory, or on a machine with the data elsewhere, finds it. Any other
relative path is taken from the working directory when it exists there, else from a fallback
root (the repository root by default).
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

# The checkout's root (in an installed wheel: the folder holding the package).
REPO_ROOT = Path(__file__).resolve().parents[2]


def experiments_parent() -> Path:
    """The folder holding ``experiments/``: the checkout, or in an installed wheel the package,
    which ships the configs and their class lists as ``provq_lightning/experiments``."""
    return Path(str(files("provq_lightning.experiments"))).parent
SHARED_PREFIX = ("..", "shared", "data")


def shared_data_dir() -> Path:
    """The folder configs call ``../shared/data``: ``$PROVQ_SHARED_DATA`` or the default."""
    return Path(os.environ.get("PROVQ_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def resolve_data_path(
    path: str | Path, must_exist: bool = True, root: Path = REPO_ROOT
) -> Path:
    """Absolute path for a config path: shared-data prefix, then the working directory, then
    ``root``. With ``must_exist`` False (an output folder) a relative path stays in the
    working directory."""
    p = Path(os.path.expandvars(str(path))).expanduser()
    if p.is_absolute():
        return p
    if p.parts[:3] == SHARED_PREFIX:
        return shared_data_dir().joinpath(*p.parts[3:])
    if not must_exist or p.exists():
        return p.resolve()
    return (root / p).resolve()
