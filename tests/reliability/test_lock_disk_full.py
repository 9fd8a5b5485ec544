"""A full disk when a fit takes its run directory's lock: one line, and no empty lock left to
block every later start (a requeued task would fail again)."""

from __future__ import annotations

import errno
import json
import os

import pytest

from provq_lightning.errors import ProvqError
from provq_lightning.runs.lock import RunLock


def fill(folder) -> None:
    """Write until the file system refuses another byte."""
    with open(folder / "filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"x" * 4096)
                os.fsync(handle.fileno())
        except OSError as err:
            assert err.errno == errno.ENOSPC


def test_full_disk_at_the_lock_is_one_line_and_leaves_no_lock(tmpfs):
    disk = tmpfs("256k")
    run = disk / "run"
    run.mkdir()
    fill(disk)
    with pytest.raises(ProvqError) as err:
        RunLock(run).acquire()
    assert "free disk space" in str(err.value) and "\n" not in str(err.value)
    assert list(run.iterdir()) == []  # no empty .provq.lock, no staged file
    (disk / "filler").unlink()
    lock = RunLock(run)
    lock.acquire()  # with space again, the next start takes it
    assert json.loads((run / ".provq.lock").read_text())["pid"] == os.getpid()
    lock.release()
