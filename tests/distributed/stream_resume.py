"""Kill a provq-fit run mid-epoch, resume it from ``last.ckpt``, compare the batches it trained on.

Used by ``tests/image/test_stream_resume.py`` and ``tests/protein/test_stream_resume.py``. A
run writes one JSON line per training step and rank (``RecordBatchKeys``): the step, the epoch
and the sample keys of the batch. The killed-and-resumed run must train every step on exactly
the keys the uninterrupted run used at that step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

from tests.distributed import launch


class RecordBatchKeys(Callback):
    """Append {step, epoch, keys} per training batch to ``path`` (``{rank}`` per rank).

    ``field``: the batch entry holding the sample keys (``key`` for images, ``ids`` for
    protein chains).
    """

    def __init__(self, path: str, field: str = "key") -> None:
        self.path = path
        self.field = field

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch,
               "keys": list(batch[self.field])}
        with Path(self.path.format(rank=trainer.global_rank)).open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_config(tmp: Path, name: str, model: dict, data: dict, field: str, max_steps: int,
                 kill_at: int | None) -> Path:
    callbacks: list[dict] = [
        # A checkpoint after every step: the kill then lands between two saved step boundaries.
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 1}},
        {"class_path": "tests.distributed.stream_resume.RecordBatchKeys",
         "init_args": {"path": str(tmp / f"{name}_rank{{rank}}.jsonl"), "field": field}},
    ]
    if kill_at is not None:
        callbacks.append({"class_path": "tests.core.helpers.KillAtStep",
                          "init_args": {"step": kill_at}})
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": max_steps,
            "accelerator": "cpu",
            "logger": False,
            "default_root_dir": str(tmp / "run"),
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": callbacks,
        },
        "model": model,
        "data": data,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(tmp: Path, name: str, world_size: int, config: Path, *extra: str) -> tuple[list[int], str]:
    argv = ["fit", "--config", str(config), *extra]
    logs = [tmp / f"{name}_rank{r}.log" for r in range(world_size)]
    if world_size == 1:
        codes = [launch.fit(argv, logs[0])]
    else:
        codes = launch.ddp_fit(argv, logs, mode="devices2")
    return codes, "".join(log.read_text() for log in logs if log.exists())


def check_kill_and_resume(tmp: Path, model: dict, data: dict, *, field: str, world_size: int,
                          max_steps: int, kill_at: int) -> list[list[dict]]:
    """Reference run, a run SIGKILLed at step ``kill_at``, its resume from ``last.ckpt``.

    Asserts every step of the interrupted pair trained on the reference's keys at that step
    (on every rank) and that the resume started at ``kill_at``; returns the reference rows.
    """
    def go(name: str, kill: int | None, *extra: str) -> tuple[list[int], str]:
        sub = tmp / name
        sub.mkdir(exist_ok=True)
        config = write_config(sub, "keys", model, data, field, max_steps, kill)
        return fit(sub, "fit", world_size, config, *extra)

    codes, logs = go("reference", None)
    assert codes == [0] * world_size, logs[-3000:]
    codes, logs = go("resumed", kill_at)
    assert codes == [-9] * world_size, logs[-3000:]  # SIGKILL, no checkpoint on the way out
    # The resumed run reuses the killed run's directory, so it finds its last.ckpt.
    last = tmp / "resumed" / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file(), logs[-3000:]
    codes, logs = go("resumed", None, "--ckpt_path", str(last))
    assert codes == [0] * world_size, logs[-3000:]
    assert "not resumable" not in logs  # Lightning's warning for a plain loader
    references = []
    for rank in range(world_size):
        ref = read_rows(tmp / "reference" / f"keys_rank{rank}.jsonl")
        assert [r["step"] for r in ref] == list(range(max_steps))
        got = read_rows(tmp / "resumed" / f"keys_rank{rank}.jsonl")
        steps = [r["step"] for r in got]
        # Killed run: steps 0..kill_at (the kill comes after this step's row); resumed: from
        # kill_at, the step after the last checkpoint, to the end.
        assert steps == list(range(kill_at + 1)) + list(range(kill_at, max_steps))
        for row in got:
            assert row == ref[row["step"]], f"rank {rank} step {row['step']}"
        references.append(ref)
    return references
