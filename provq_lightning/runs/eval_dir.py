"""Where ``provq-fit validate|test|predict`` write: never into a fit's run directory.

The rule: an evaluation whose logger would write into a fit's run directory (one holding
``checkpoints/`` or a fit's lock) writes into ``<run>/eval/<subcommand>-<YYYYmmdd-HHMMSS>``
instead. With no fixed logger version, the run is the checkpoint's (``--ckpt_path
<run>/checkpoints/x.ckpt`` under the logger's ``save_dir/name``), so the run's own
``config.yaml`` evaluates into that run's ``eval/`` and never overwrites its ``metrics.json``,
``config.yaml`` or event files. Pure file-system helpers; the CLI glue is in
``provq_lightning.tools.fit``.
"""

from __future__ import annotations

import time
from pathlib import Path

from provq_lightning.runs.run_dir import (
    LAST_CHECKPOINT,
    LOCK_FILE,
    newest_resumable_run,
    version_dir,
)

EVAL_SUBDIR = "eval"
EVALUATING = ("validate", "test", "predict")


def is_fit_run(directory: Path) -> bool:
    """A directory a fit writes into: it has saved checkpoints or a fit holds its lock."""
    return (directory / LAST_CHECKPOINT.parent).is_dir() or (directory / LOCK_FILE).exists()


def fit_run_written_by(
    save_dir: str, name: str, version: int | str | None, ckpt_path: str | None
) -> Path | None:
    """The fit's run directory an evaluation with this logger would write into, else None."""
    root = Path(save_dir) / name
    if version is not None:
        target = root / version_dir(version)
        return target if is_fit_run(target) else None
    if ckpt_path is None:
        return None
    ckpt = Path(ckpt_path)
    if ckpt.parent.name != LAST_CHECKPOINT.parent.name:
        return None
    run = ckpt.parent.parent
    if run.parent.resolve() != root.resolve() or not is_fit_run(run):
        return None  # the logger writes elsewhere: a fresh version of its own
    return run


def last_checkpoint(save_dir: str, name: str, version: int | str | None) -> Path | None:
    """``--ckpt_path last`` for an evaluation: the pinned run's, else the newest run's."""
    if version is not None:
        ckpt = Path(save_dir) / name / version_dir(version) / LAST_CHECKPOINT
        return ckpt if ckpt.is_file() else None
    found = newest_resumable_run(save_dir, name)
    return found.checkpoint if found else None


def new_eval_version(run: Path, subcommand: str) -> str:
    """A name under ``<run>/eval`` that no earlier evaluation used."""
    base = f"{subcommand}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, n = base, 1
    while (run / EVAL_SUBDIR / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name
