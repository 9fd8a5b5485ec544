"""The lock that keeps two fits out of one run directory.

The lock file records host, PID, SLURM job and SLURM restart count. A holder is stale only when
its process is gone: on this host its PID is dead; under SLURM the holder belongs to an earlier
incarnation of this same job (a requeue: ``SLURM_RESTART_COUNT`` is higher now, possibly on
another node). Two live fits of one job (two ``srun`` steps, two background fits in one batch
script) refuse like any other pair. The file is created with its content in one step (written
beside it, then hard-linked into place), so a full disk or a kill never leaves an empty lock.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from provq_lightning.errors import ProvqError
from provq_lightning.runs.checkpoint_io import pid_alive
from provq_lightning.runs.run_dir import LOCK_FILE


def _slurm_job() -> str | None:
    job = os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if job and task else job


def _restart_count() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


class RunLock:
    """An exclusive lock on a run directory, held by one fit (its rank 0) at a time."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def _record(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": _slurm_job(),
            "slurm_restart": _restart_count(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def _read_holder(self) -> dict[str, Any] | None:
        """The holder's record; None when the lock vanished meanwhile; one line when unreadable."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise ProvqError(f"lock file {self.path} cannot be read ({err.strerror}); check the "
                             "run directory's permissions, or delete it if no fit is running") \
                from None
        try:
            holder = json.loads(text)
            if not isinstance(holder, dict):
                raise ValueError(f"a JSON {type(holder).__name__}, not an object")
            holder["pid"] = int(holder["pid"])
        except (ValueError, KeyError, TypeError) as err:
            raise ProvqError(
                f"lock file {self.path} is not a provq lock ({type(err).__name__}: {err}); "
                "delete it if no fit is running in that directory"
            ) from None
        return holder

    def _is_stale(self, holder: dict[str, Any]) -> bool:
        me = self._record()
        job = holder.get("slurm_job")
        if job is not None and job == me["slurm_job"] and int(holder.get("slurm_restart") or 0) < me["slurm_restart"]:
            return True  # a requeue of this job: its earlier incarnation no longer runs
        return holder.get("host") == me["host"] and not pid_alive(holder["pid"])

    def _create(self, record: str) -> bool:
        """Create the lock holding ``record`` in one step; False when it exists already."""
        fd, staged = tempfile.mkstemp(prefix=".provq.lock.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(record)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(staged, self.path)  # fails if the lock exists: the atomic test-and-set
            except OSError as err:
                if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                return self._create_in_place(record)  # a file system without hard links
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(staged)

    def _create_in_place(self, record: str) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, record.encode())
            os.fsync(fd)
        except OSError:
            os.close(fd)
            self.path.unlink(missing_ok=True)  # never leave an empty lock behind
            raise
        os.close(fd)
        return True

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(3):
                if self._create(json.dumps(self._record())):
                    self.held = True
                    return
                holder = self._read_holder()
                if holder is None:
                    continue  # released between our attempt and the read
                if not self._is_stale(holder):
                    raise ProvqError(
                        f"run directory {self.path.parent} is in use by PID {holder['pid']} on "
                        f"host {holder.get('host')} since {holder.get('since')}"
                        + (f" (SLURM job {holder['slurm_job']})" if holder.get("slurm_job") else "")
                        + "; wait for that fit to end, choose another "
                        f"--trainer.logger.init_args.version, or delete {self.path} if that "
                        "process is gone"
                    )
                warnings.warn(
                    f"taking over the stale lock {self.path} of PID {holder['pid']} on "
                    f"{holder.get('host')} (that process is gone)",
                    stacklevel=2,
                )
                self.path.unlink(missing_ok=True)
        except OSError as err:
            raise ProvqError(
                f"cannot take the lock {self.path} ({err.strerror or err}); "
                + ("free disk space and re-run" if err.errno in (errno.ENOSPC, errno.EDQUOT)
                   else "check that the run directory is writable")
            ) from None
        raise ProvqError(f"could not take the lock {self.path}; delete it if no fit is running")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return
        if isinstance(holder, dict) and holder.get("pid") == os.getpid() \
                and holder.get("host") == socket.gethostname():
            try:
                self.path.unlink()
            except OSError as err:
                if err.errno != errno.ENOENT:
                    raise


# Released however the fit ends (atexit alone misses forked children's os._exit).
_HELD: list[RunLock] = []


def hold_run_lock(run_dir: str | Path) -> RunLock:
    """Take ``run_dir``'s lock for this process until ``release_held_locks`` or exit."""
    lock = RunLock(run_dir)
    lock.acquire()
    _HELD.append(lock)
    atexit.register(lock.release)
    return lock


def release_held_locks() -> None:
    """Release every lock ``hold_run_lock`` took in this process."""
    while _HELD:
        _HELD.pop().release()
