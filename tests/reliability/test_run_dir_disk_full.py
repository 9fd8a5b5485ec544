"""A full disk in a run directory: one line, and nothing left half-done (no empty lock to
block every later start, a config.yaml always present)."""

from __future__ import annotations

import errno
import json
import os

import pytest

from provq_lightning.errors import ProvqError
from provq_lightning.runs.config_history import write_config_history
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


def test_full_disk_at_resume_keeps_the_runs_config(tmpfs):
    # A resume with changed settings keeps the old config as config.1.yaml; on a full disk the
    # run must still have its config.yaml (provq-tokenize and the next resume read it).
    disk = tmpfs("256k")
    path = disk / "run" / "config.yaml"
    path.parent.mkdir()
    path.write_text("model: {num_codes: 32}\n")
    fill(disk)
    with pytest.raises(ProvqError) as err:
        write_config_history(path, "model: {num_codes: 64}\n" + "#" * 8192)
    assert "cannot save file" in str(err.value) and "\n" not in str(err.value)
    assert path.read_text() == "model: {num_codes: 32}\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]
