"""SIGKILL inside a checkpoint write never leaves an unreadable ``last.ckpt`` nor a temporary.

A TopoDisc provq-fit saves ``last.ckpt`` every step into a run directory on a tmpfs, another
file system than its ``$TMPDIR`` (where Lightning's own save copies over the target in place).
The test watches for provq's temporary of that save and SIGKILLs the process while it exists,
then resumes from ``last.ckpt``; a kill counts only if the temporary outlived the process, i.e.
the process died inside the write. After the kills, a last run finishes the training.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from provq_lightning.runs.checkpoint_io import _host
from tests.reliability.helpers import finish, run_dir, start_fit, write_config

KILLS = 10
# A kill that misses the write lets the run advance a step: room for every attempt.
MAX_STEPS = 3 * KILLS
# Bytes added to each checkpoint so that its write lasts a few tens of milliseconds here.
BALLAST_MIB = 8
# Kill at different depths of the write: as soon as the temporary appears, or a little later.
DELAYS = (0.0, 0.002, 0.004)


def wait_for(path: Path, proc, timeout: float = 120) -> bool:  # noqa: ANN001
    """Poll (busy) until ``path`` exists; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if not proc.is_alive():
            return False
        assert time.monotonic() < deadline, f"{path} never appeared"
    return True


def test_sigkill_inside_checkpoint_writes_keeps_last_ckpt_readable(tmpfs, tmp_path: Path) -> None:
    disk = tmpfs("96m")
    tmpdir = tmp_path / "tmpdir"  # on the root file system, not the tmpfs
    tmpdir.mkdir()
    assert os.stat(disk).st_dev != os.stat(tmpdir).st_dev
    config = write_config(tmp_path / "fit.yaml", disk, MAX_STEPS, every=1, ballast_mib=BALLAST_MIB)
    checkpoints = run_dir(disk) / "checkpoints"
    last = checkpoints / "last.ckpt"
    log = tmp_path / "fit.log"
    kills: list[tuple[int, int]] = []  # (bytes of the temporary at the kill, step of last.ckpt)
    attempts = 0
    while len(kills) < KILLS:
        attempts += 1
        assert attempts <= 3 * KILLS, f"only {len(kills)} kills inside a write: {kills}"
        resume = ["--ckpt_path", str(last)] if last.exists() else []
        proc = start_fit(["fit", "--config", str(config), *resume], tmpdir, log)
        temporary = checkpoints / f".last.ckpt.provq-{proc.pid}@{_host()}.tmp"
        if not resume:  # hunt only saves that replace an existing last.ckpt
            assert wait_for(last, proc), log.read_text()[-3000:]
        # Every step saves: a run that ends without provq's temporary ever showing up did not
        # save through AtomicCheckpointIO.
        assert wait_for(temporary, proc), f"no {temporary.name} seen: {log.read_text()[-3000:]}"
        time.sleep(DELAYS[attempts % len(DELAYS)])
        os.kill(proc.pid, signal.SIGKILL)
        assert finish(proc) == -signal.SIGKILL
        # The last good checkpoint is whole, whether or not the kill hit the write.
        state = torch.load(last, map_location="cpu", weights_only=True)
        if temporary.exists():  # died with the temporary still there: inside the write
            kills.append((temporary.stat().st_size, state["global_step"]))
    # The kills hit the write at different depths.
    assert len({size for size, _ in kills}) > 1, kills
    # A later run finishes the training from the surviving checkpoint and leaves nothing behind.
    proc = start_fit(["fit", "--config", str(config), "--ckpt_path", str(last)], tmpdir, log)
    assert finish(proc) == 0, log.read_text()[-3000:]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == MAX_STEPS
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    assert list(tmpdir.iterdir()) == []
