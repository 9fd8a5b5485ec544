"""A full disk during a save stops the run with one line and keeps the last good checkpoint.

A TopoDisc provq-fit trains to step 10 on a 4 MiB tmpfs; the disk is then filled so that the
next checkpoint (about 1 MiB) cannot fit while small writes (logs, config) still can. The
resumed run must stop at its first save with ``provq-fit: error: ...`` naming the checkpoint,
the size needed and the space free, leave ``last.ckpt`` at step 10 and no temporary, and, once
the space is freed, resume from it to the end.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from provq_lightning.runs.checkpoint_io import free_bytes
from tests.reliability.helpers import finish, run_dir, start_fit, write_config

FIRST, MAX_STEPS, EVERY = 10, 20, 5
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20}
ERROR = re.compile(
    r"^provq-fit: error: cannot save checkpoint (?P<path>\S+): it needs (?P<needs>[\d.]+ \w+) "
    r"but its file system has (?P<free>[\d.]+ \w+) free.*--ckpt_path last$",
    re.MULTILINE,
)


def size(text: str) -> float:
    value, unit = text.split()
    return float(value) * UNITS[unit]


def step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_a_full_disk_stops_the_run_and_keeps_last_ckpt(tmpfs, tmp_path: Path) -> None:
    disk = tmpfs("4m")
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    config = str(write_config(tmp_path / "fit.yaml", disk, MAX_STEPS, EVERY, ballast_mib=1))
    checkpoints = run_dir(disk) / "checkpoints"
    last = checkpoints / "last.ckpt"
    log = tmp_path / "fit.log"
    first = ["fit", "--config", config, f"--trainer.max_steps={FIRST}"]
    assert finish(start_fit(first, tmpdir, log)) == 0, log.read_text()[-3000:]
    assert step(last) == FIRST
    # Leave room for logs and config, not for a checkpoint (> 1 MiB of ballast).
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (free_bytes(disk) - (512 << 10)))

    log.write_text("")
    resume = ["fit", "--config", config, "--ckpt_path", str(last)]
    assert finish(start_fit(resume, tmpdir, log)) == 1
    output = log.read_text()
    match = ERROR.search(output)
    assert match, output[-3000:]
    assert match["path"] == str(last)
    assert size(match["needs"]) > size(match["free"]) > 0
    assert size(match["needs"]) > 1 << 20  # the checkpoint with its ballast
    assert "Traceback" not in output
    assert step(last) == FIRST  # the good checkpoint survived
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]

    filler.unlink()
    assert finish(start_fit(resume, tmpdir, log)) == 0, log.read_text()[-3000:]
    assert step(last) == MAX_STEPS
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    assert list(tmpdir.iterdir()) == []
