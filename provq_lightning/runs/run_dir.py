"""A run directory's layout: where its last checkpoint is, how versions are named, and which
run ``--ckpt_path last`` resumes. Pure file-system helpers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
LOCK_FILE = ".provq.lock"  # held by the fit writing the directory (runs/lock.py)


@dataclass(frozen=True)
class ResumeTarget:
    """The run directory to continue and the checkpoint to restore from."""

    run_dir: Path
    version: str
    checkpoint: Path


def newest_resumable_run(save_dir: str | Path, name: str) -> ResumeTarget | None:
    """The run under ``save_dir/name`` whose ``last.ckpt`` was written most recently, if any."""
    root = Path(save_dir) / name
    if not root.is_dir():
        return None
    found = []
    for run_dir in root.iterdir():
        ckpt = run_dir / LAST_CHECKPOINT
        if ckpt.is_file():
            found.append((ckpt.stat().st_mtime_ns, run_dir.name, ckpt))
    if not found:
        return None
    _, version, ckpt = max(found)
    return ResumeTarget(run_dir=root / version, version=version, checkpoint=ckpt)


def saved_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoint files a fit wrote into ``run_dir`` (``checkpoints/*.ckpt``), sorted."""
    folder = Path(run_dir) / LAST_CHECKPOINT.parent
    return sorted(folder.glob("*.ckpt")) if folder.is_dir() else []


def version_dir(version: int | str) -> str:
    """The directory name Lightning's TensorBoard/CSV loggers give ``version``."""
    return f"version_{version}" if isinstance(version, int) else str(version)


def version_from_dir_name(name: str) -> int | str:
    """Lightning's logger ``version`` argument for a run directory's name."""
    if name.startswith("version_") and name[len("version_") :].isdigit():
        return int(name[len("version_") :])
    return name
