"""``AtomicCheckpointIO``: atomic replace, space check, stale temporaries, bad files, wiring."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy

from provq_lightning.errors import ProvqError
from provq_lightning.runs import checkpoint_io as cio
from provq_lightning.runs.checkpoint_io import AtomicCheckpointIO, remove_stale_temporaries
from provq_lightning.runs.safe_load import UnsafeFileError
from provq_lightning.tools.fit import provq_plugins

OLD = {"global_step": 1, "state_dict": {"w": torch.zeros(4)}}
NEW = {"global_step": 2, "state_dict": {"w": torch.ones(1000)}}


def provq_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".provq-" in p.name)


def step(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


@pytest.fixture
def empty_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$TMPDIR`` pointed at an empty directory, so a test sees anything written there."""
    path = tmp_path / "tmpdir"
    path.mkdir()
    monkeypatch.setenv("TMPDIR", str(path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its answer
    return path


def test_save_replaces_through_a_fsynced_temporary_in_the_same_directory(
    tmp_path: Path, empty_tmpdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ckpts" / "last.ckpt"
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint(OLD, target)
    seen: list[tuple[Path, int]] = []
    synced: list[int] = []
    real_replace, real_fsync = os.replace, os.fsync

    def spy_replace(src: str, dst: str) -> None:
        # At the moment of the swap the target still holds the old checkpoint, whole.
        assert step(target) == 1
        seen.append((Path(src), Path(src).stat().st_size))
        real_replace(src, dst)

    def spy_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(cio.os, "replace", spy_replace)
    monkeypatch.setattr(cio.os, "fsync", spy_fsync)
    io_.save_checkpoint(NEW, target)
    ((src, size),) = seen
    assert src.parent == target.parent
    assert src.name == f".last.ckpt.provq-{os.getpid()}@{cio._host()}.tmp"
    assert size == target.stat().st_size
    assert len(synced) == 2  # the file, then its directory
    assert step(target) == 2
    assert provq_files(target.parent) == []
    assert list(empty_tmpdir.iterdir()) == []


def test_a_failed_write_keeps_the_old_checkpoint_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "last.ckpt"
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint(OLD, target)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(cio.os, "replace", broken_replace)
    with pytest.raises(OSError, match="I/O error"):
        io_.save_checkpoint(NEW, target)
    assert step(target) == 1
    assert provq_files(tmp_path) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_no_space_while_writing_is_one_line_and_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    target = tmp_path / "last.ckpt"
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint(OLD, target)

    def full_fsync(fd: int) -> None:  # e.g. NFS reports a full quota only when flushing
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(cio.os, "fsync", full_fsync)
    with pytest.raises(ProvqError) as err:
        io_.save_checkpoint(NEW, target)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(target) in msg and "needs" in msg and "free" in msg and "--ckpt_path" in msg
    assert step(target) == 1
    assert provq_files(tmp_path) == []


def test_too_little_space_is_refused_before_the_disk_is_touched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "last.ckpt"
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint(OLD, target)
    before = target.stat()
    monkeypatch.setattr(cio, "free_bytes", lambda directory: 1536)
    full = r"needs \d+\.\d KiB but its file system has 1\.5 KiB free"
    with pytest.raises(ProvqError, match=full):
        io_.save_checkpoint(NEW, target)
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert provq_files(tmp_path) == []


def test_a_real_full_file_system_keeps_the_old_checkpoint(
    tmpfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = tmpfs("256k")
    target = disk / "last.ckpt"
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint(OLD, target)
    big = {"global_step": 2, "state_dict": {"w": torch.ones(200_000)}}  # 800 KB > 256 KiB
    buffer = io.BytesIO()
    torch.save(big, buffer)
    needs = f"needs {cio.human_size(len(buffer.getvalue()))} but"
    with pytest.raises(ProvqError, match=needs):
        io_.save_checkpoint(big, target)  # refused by the size check
    # Past the check (a quota statvfs cannot see): the kernel's ENOSPC mid-write.
    monkeypatch.setattr(cio, "free_bytes", lambda directory: 1 << 40)
    with pytest.raises(ProvqError, match=needs) as err:
        io_.save_checkpoint(big, target)
    assert isinstance(err.value.__cause__, OSError)
    assert err.value.__cause__.errno == errno.ENOSPC
    assert step(target) == 1
    assert provq_files(disk) == []


def test_human_size() -> None:
    assert [cio.human_size(n) for n in (0, 1023, 1536, 3 << 20, 5 << 30)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "3.0 MiB",
        "5.0 GiB",
    ]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_on_this_host_are_removed(tmp_path: Path) -> None:
    host = cio._host()
    zombie = subprocess.Popen(["true"])  # exits, but is not reaped until wait()
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{zombie.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        names = {
            "dead": f".last.ckpt.provq-{dead_pid()}@{host}.tmp",
            "zombie": f".step=3.ckpt.provq-{zombie.pid}@{host}.tmp",
            "mine": f".last.ckpt.provq-{os.getpid()}@{host}.tmp",  # an earlier process's: PID reuse
            "alive": f".last.ckpt.provq-{os.getppid()}@{host}.tmp",
            "other_host": f".last.ckpt.provq-{dead_pid()}@{host}x.tmp",
            "not_ours": ".last.ckpt.tmp",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"partial")
        removed = remove_stale_temporaries(tmp_path)
    finally:
        zombie.wait()
    keep = {names["alive"], names["other_host"], names["not_ours"]}
    assert {p.name for p in removed} == set(names.values()) - keep
    assert {p.name for p in tmp_path.iterdir()} == keep


def test_saving_and_loading_clean_up_killed_saves(tmp_path: Path) -> None:
    stale = tmp_path / f".last.ckpt.provq-{dead_pid()}@{cio._host()}.tmp"
    stale.write_bytes(b"partial")
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint(OLD, tmp_path / "last.ckpt")
    assert not stale.exists()
    stale.write_bytes(b"partial")
    assert io_.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 1
    assert not stale.exists()
    remove_stale_temporaries(tmp_path / "missing")  # nothing to do, no error


class NotAllowed:
    """A class ``torch.load(weights_only=True)`` refuses to unpickle."""


@pytest.mark.parametrize("content", ["empty", "truncated", "text"])
def test_an_unreadable_checkpoint_is_one_line_naming_it(tmp_path: Path, content: str) -> None:
    good = tmp_path / "good.ckpt"
    AtomicCheckpointIO().save_checkpoint(NEW, good)
    data = {
        "empty": b"",
        "truncated": good.read_bytes()[: good.stat().st_size // 2],
        "text": b"model: 1\n",
    }[content]
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(data)
    with pytest.raises(ProvqError) as err:
        AtomicCheckpointIO().load_checkpoint(bad)
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg and "truncated or not a checkpoint" in msg


def test_loading_refuses_code_and_keeps_lightnings_missing_file_error(tmp_path: Path) -> None:
    io_ = AtomicCheckpointIO()
    with pytest.raises(FileNotFoundError):
        io_.load_checkpoint(tmp_path / "missing.ckpt")
    path = tmp_path / "obj.ckpt"
    io_.save_checkpoint({"global_step": 3, "extra": NotAllowed()}, path)
    # A sound file that needs unpickling is refused, naming the global, whatever the caller
    # asks for: provq never unpickles a checkpoint (it may come from a colleague).
    for weights_only in (True, False, None):
        with pytest.raises(UnsafeFileError, match="NotAllowed"):
            io_.load_checkpoint(path, weights_only=weights_only)
    io_.remove_checkpoint(path)
    assert not path.exists()


def test_provq_plugins_adds_it_unless_the_config_brings_a_checkpoint_io() -> None:
    (plugin,) = provq_plugins({}, [])
    assert isinstance(plugin, AtomicCheckpointIO)
    assert provq_plugins({}, [TorchCheckpointIO()]) == []
    wrapper = AsyncCheckpointIO()
    assert provq_plugins({}, [wrapper]) == []
    assert isinstance(wrapper.checkpoint_io, AtomicCheckpointIO)  # ours under the async one
    own = DDPStrategy(checkpoint_io=TorchCheckpointIO())
    assert provq_plugins({"strategy": own}, []) == []


@pytest.mark.parametrize(
    "strategy,devices", [("auto", 1), ("ddp", 2), ("ddp_find_unused_parameters_true", 2)]
)
def test_the_trainer_uses_it_under_every_strategy(strategy: str, devices: int) -> None:
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        plugins=provq_plugins({"strategy": strategy}, []),
        logger=False,
    )
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_model_checkpoint_and_save_checkpoint_go_through_it(
    tmp_path: Path, empty_tmpdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    real_save = AtomicCheckpointIO.save_checkpoint
    real_remove = AtomicCheckpointIO.remove_checkpoint

    def save(self, checkpoint, path, storage_options=None):  # noqa: ANN001, ANN202
        calls.append(("save", Path(path).name))
        real_save(self, checkpoint, path, storage_options)

    def remove(self, path):  # noqa: ANN001, ANN202
        calls.append(("remove", Path(path).name))
        real_remove(self, path)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save)
    monkeypatch.setattr(AtomicCheckpointIO, "remove_checkpoint", remove)
    every_step = ModelCheckpoint(
        dirpath=tmp_path,
        filename="{step}",
        every_n_train_steps=1,
        save_top_k=1,
        save_last=True,
        monitor="step",
        mode="max",
    )
    trainer = Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=0,
        callbacks=[every_step],
        plugins=provq_plugins({}, []),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(BoringModel())
    trainer.save_checkpoint(tmp_path / "manual.ckpt")
    assert ("save", "step=1.ckpt") in calls and ("save", "step=2.ckpt") in calls
    assert ("save", "last.ckpt") in calls and ("remove", "step=1.ckpt") in calls
    assert calls[-1] == ("save", "manual.ckpt")
    assert step(tmp_path / "last.ckpt") == 2
    assert provq_files(tmp_path) == [] and list(empty_tmpdir.iterdir()) == []
