"""The lock that keeps two fits out of one run directory."""

from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import time
import warnings
from pathlib import Path

from provq_lightning.errors import ProvqError
from provq_lightning.runs.checkpoint_io import pid_alive
from provq_lightning.runs.run_dir import LOCK_FILE

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
