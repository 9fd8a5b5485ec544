"""A run directory's bookkeeping: which run ``--ckpt_path last`` resumes, the config history and
the lock that keeps two fits out of one directory.

Pure file-system helpers; the Lightning glue is in ``provq_lightning.tools.fit``.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from provq_lightning.checkpoint_io import pid_alive, write_atomically
from provq_lightning.errors import ProvqError

LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
LOCK_FILE = ".provq.lock"


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


def version_dir(version: int | str) -> str:
    """The directory name Lightning's TensorBoard/CSV loggers give ``version``."""
    return f"version_{version}" if isinstance(version, int) else str(version)


def version_from_dir_name(name: str) -> int | str:
    """Lightning's logger ``version`` argument for a run directory's name."""
    if name.startswith("version_") and name[len("version_") :].isdigit():
        return int(name[len("version_") :])
    return name


def write_config_history(path: Path, text: str) -> Path | None:
    """Write ``text`` to ``path``; a different earlier config is kept as ``config.N.yaml``.

    Returns where the earlier config went, or None when there was none or it was the same.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = None
    if path.is_file():
        if path.read_text() == text:
            return None
        n = 1
        while (kept := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
            n += 1
        os.replace(path, kept)
    write_atomically(path, text.encode())  # a reader never sees a half-written config
    return kept


def _slurm_job() -> str | None:
    job = os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if job and task else job


class RunLock:
    """An exclusive lock on a run directory, held by one fit (its rank 0) at a time.

    The lock file records host, PID and SLURM job. A lock whose process is gone (same host,
    dead PID) or that belongs to this same SLURM job (a requeue, possibly on another node) is
    stale and taken over with a warning; any other holder makes the fit refuse.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def _record(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": _slurm_job(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def _is_stale(self, holder: dict) -> bool:
        me = self._record()
        if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
            return True
        return holder.get("host") == me["host"] and not pid_alive(int(holder.get("pid", -1)))

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps(self._record())
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text() or "{}")
                except (OSError, json.JSONDecodeError):
                    holder = {}  # a lock being written right now, or a torn one
                if holder and self._is_stale(holder):
                    warnings.warn(
                        f"taking over the stale lock {self.path} of PID {holder.get('pid')} on "
                        f"{holder.get('host')} (that process is gone)",
                        stacklevel=2,
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                if not holder:
                    time.sleep(0.2)
                    continue
                raise ProvqError(
                    f"run directory {self.path.parent} is in use by PID {holder.get('pid')} on "
                    f"host {holder.get('host')} since {holder.get('since')}; wait for that fit to "
                    "end, choose another --trainer.logger.init_args.version, or delete "
                    f"{self.path} if that process is gone"
                ) from None
            try:
                os.write(fd, record.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self.held = True
            return
        raise ProvqError(f"could not take the lock {self.path}; delete it if no fit is running")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            try:
                self.path.unlink()
            except OSError as err:
                if err.errno != errno.ENOENT:
                    raise
