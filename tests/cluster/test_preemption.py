"""Zero-loss preemption without SLURM: SIGUSR1 or SIGTERM sent to a running provq-fit
(TopoDisc ProVQ).

The signal arrives mid-step, from outside the process (this test sends it while the run waits
inside a step). The run saves ``checkpoints/last.ckpt`` at the end of that step (the periodic
checkpoint is due only at the last step), finishes that step's validation if one is due, and
exits with 75; resumed from that file, it redoes no step and ends with the uninterrupted
run's metrics and codebook, bit for bit. Under 2 gloo DDP processes only rank 1 is signalled:
both ranks still stop together. The SLURM side (requeue) is in ``test_slurm.py``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

from provq_lightning.callbacks.preemption import (
    EXIT_PREEMPTED,
    PreemptionCheckpoint,
    parse_signal,
    slurm_job_id,
)
from tests.core.helpers import read_records
from tests.distributed import launch
from tests.helpers import effective_config

REPO = Path(__file__).resolve().parents[2]
WARMUP, TRANSITION, STEPS, VAL_EVERY, COLLECT = 20, 20, 60, 10, 4
SAVED = "[provq] preemption: saved "


class AwaitSignal(Callback):
    """At ``step`` on rank ``rank``: write this process's pid to ``ready`` and wait, inside the
    step, until the preemption callback has seen the signal the test sends to that pid."""

    def __init__(self, step: int, rank: int, ready: str) -> None:
        self.step, self.rank, self.ready = step, rank, ready

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step or trainer.global_rank != self.rank:
            return
        (cb,) = [c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)]
        Path(self.ready).write_text(str(os.getpid()))
        deadline = time.monotonic() + 60
        while not cb.signal_received:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {cb.signal.name} within 60 s at step {self.step}")
            time.sleep(0.01)


def write_config(tmp: Path, record: Path, world_size: int, wait: dict | None) -> Path:
    config = effective_config(REPO / "experiments" / "topodisc_provq.yaml")
    trainer = config["trainer"]
    trainer.update(
        max_steps=STEPS,
        val_check_interval=VAL_EVERY,
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer["logger"]["init_args"].update(save_dir=str(tmp), name="fit", version="run")
    (checkpoint,) = trainer["callbacks"]
    config["curriculum"].update(
        warmup_steps=WARMUP, transition_steps=TRANSITION, kmeans_collect_batches=COLLECT
    )
    # The periodic checkpoint only at the very end: every resume below starts from the
    # preemption checkpoint, and the final last.ckpt must replace it (not become last-v1).
    checkpoint["init_args"].update(every_n_train_steps=STEPS)
    trainer["callbacks"].append(
        {"class_path": "tests.core.helpers.RecordCurriculum", "init_args": {"path": str(record)}}
    )
    if wait is not None:
        trainer["callbacks"].append(
            {"class_path": "tests.cluster.test_preemption.AwaitSignal", "init_args": wait}
        )
    config["model"]["init_args"].update(num_codes=16, figure_every_n_steps=0)
    config["data"]["init_args"].update(steps_per_epoch=5 * world_size)
    path = tmp / f"{record.stem.replace('_rank{rank}', '')}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(tmp: Path, leg: str, world_size: int, *extra: str, signal_at: tuple | None = None,
        sig: signal.Signals = signal.SIGUSR1):
    """One provq-fit leg; with ``signal_at=(step, rank)`` ``sig`` goes to that rank mid-step.

    Returns (exit codes, logs of all ranks, records of rank 0).
    """
    record = tmp / f"{leg}_rank{{rank}}.jsonl"
    ready = tmp / f"{leg}.ready"
    wait = None if signal_at is None else {"step": signal_at[0], "rank": signal_at[1]}
    if wait is not None:
        wait["ready"] = str(ready)
    argv = ["fit", "--config", str(write_config(tmp, record, world_size, wait)), *extra]
    logs = [tmp / f"{leg}_rank{r}.log" for r in range(world_size)]
    codes: list[int] = []
    if world_size == 1:
        target = lambda: codes.append(launch.fit(argv, logs[0], timeout=180))  # noqa: E731
    else:
        target = lambda: codes.extend(launch.ddp_fit(argv, logs, timeout=180))  # noqa: E731
    runner = threading.Thread(target=target)
    runner.start()
    if signal_at is not None:
        deadline = time.monotonic() + 180
        while not (ready.exists() and ready.read_text()):
            assert runner.is_alive() and time.monotonic() < deadline, "the run never got there"
            time.sleep(0.05)
        os.kill(int(ready.read_text()), sig)
    runner.join()
    text = "".join(log.read_text() for log in logs if log.exists())
    records = [read_records(Path(str(record).format(rank=r))) for r in range(world_size)]
    for other in records[1:]:
        assert other == records[0]  # the ranks agree on every step and validation
    return codes, text, records[0]


def final_state(run_dir: Path) -> dict:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return {
        "codebook": state["state_dict"]["quantizer.embedding.weight"],
        "global_step": state["global_step"],
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """The uninterrupted run per world size: (records, run directory), computed once."""
    runs: dict[int, tuple[dict, Path]] = {}

    def get(world_size: int) -> tuple[dict, Path]:
        if world_size not in runs:
            tmp = tmp_path_factory.mktemp(f"reference{world_size}")
            codes, logs, records = fit(tmp, "ref", world_size)
            assert codes == [0] * world_size, logs[-3000:]
            assert [r["step"] for r in records["train"]] == list(range(STEPS))
            runs[world_size] = records, tmp / "fit" / "run"
        return runs[world_size]

    return get


@pytest.mark.parametrize(
    ("world_size", "signal_at", "sig"),
    [(1, (29, 0), signal.SIGUSR1), (2, (23, 1), signal.SIGUSR1), (1, (17, 0), signal.SIGTERM),
     (2, (23, 1), signal.SIGTERM)],
    ids=["1proc-at-validation-step", "ddp2-rank1-only", "sigterm-1proc", "sigterm-ddp2-rank1"],
)
def test_preemption_signal_saves_at_step_boundary_and_resume_matches(
    tmp_path, reference, world_size, signal_at, sig
):
    # SIGTERM (scancel, SLURM preemption without --signal) is a preemption like SIGUSR1: the
    # step finishes, last.ckpt is saved and the run exits 75, never 0 (SLURM: COMPLETED).
    ref, ref_dir = reference(world_size)
    run_dir = tmp_path / "fit" / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    codes, logs, pre = fit(tmp_path, "pre", world_size, signal_at=signal_at, sig=sig)
    # Every rank stops, with "try again" (only rank 1 got the signal under DDP).
    assert codes == [EXIT_PREEMPTED] * world_size, logs[-3000:]
    step = signal_at[0]
    # The step the signal interrupted finished; the next one stopped at its start (recorded
    # by a callback that runs before the preemption one) unless a validation ended the run.
    validated = (step + 1) % VAL_EVERY == 0
    assert [r["step"] for r in pre["train"]] == list(range(step + 1 + (not validated)))
    assert f"{SAVED}{last} at step {step + 1}" in logs, logs[-3000:]
    assert not list(run_dir.rglob("hpc_ckpt_*")) and not list(run_dir.rglob("last-v*"))
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == step + 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics.get("status") == "interrupted"

    codes, logs, res = fit(tmp_path, "res", world_size, "--ckpt_path", str(last))
    assert codes == [0] * world_size, logs[-3000:]
    # Resumed at the saved step: nothing redone, nothing skipped.
    assert [r["step"] for r in res["train"]] == list(range(step + 1, STEPS))
    # A validation due at the saved step ran before the stop; the resumed run does the rest.
    assert [r["step"] for r in pre["val"] + res["val"]] == [r["step"] for r in ref["val"]]
    # Exactly the uninterrupted trajectory: curriculum and codebook at every step, metrics.
    want = {r["step"]: r for r in ref["train"]}
    for row in pre["train"] + res["train"]:
        for key in ("alpha", "omega", "phase", "codebook"):
            assert row[key] == want[row["step"]][key], (row["step"], key)
    assert pre["val"] + res["val"] == ref["val"]
    got_metrics = json.loads((run_dir / "metrics.json").read_text())
    want_metrics = json.loads((ref_dir / "metrics.json").read_text())
    assert got_metrics == want_metrics
    # The periodic save at the end replaced the preemption checkpoint in place.
    assert not list(run_dir.rglob("last-v*"))
    got, expected = final_state(run_dir), final_state(ref_dir)
    assert got["global_step"] == STEPS
    assert torch.equal(got["codebook"], expected["codebook"])


def test_slurm_job_id_names_the_array_task():
    array_task = {"SLURM_JOB_ID": "57", "SLURM_ARRAY_JOB_ID": "50", "SLURM_ARRAY_TASK_ID": "7"}
    assert slurm_job_id(array_task) == "50_7"
    assert slurm_job_id({"SLURM_JOB_ID": "57"}) == "57"
    assert slurm_job_id({}) is None


def test_signal_names():
    assert parse_signal("SIGUSR1") is parse_signal("usr1") is parse_signal(10) is signal.SIGUSR1
    with pytest.raises(ValueError, match="signal='SIGFOO' is not a signal"):
        parse_signal("SIGFOO")
    with pytest.raises(ValueError, match="check_every_n_steps=0"):
        PreemptionCheckpoint(check_every_n_steps=0)


def test_signal_inside_an_accumulation_window_saves_at_the_window_end(tmp_path):
    from unittest import mock

    from lightning.pytorch.callbacks import ModelCheckpoint

    from provq_lightning.callbacks.preemption import PreemptionCheckpoint
    from provq_lightning.topodisc import TopoDiscTokenizer

    callback = PreemptionCheckpoint(requeue=False)
    callback.signal_received = True
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = mock.MagicMock(global_step=7, max_steps=100, checkpoint_callbacks=[checkpoint])
    trainer.strategy.reduce_boolean_decision.return_value = True
    model = TopoDiscTokenizer()
    model.grads_pending = True  # as a modality that accumulates gradients sets it
    callback.on_train_batch_end(trainer, model, None, None, 0)
    trainer.save_checkpoint.assert_not_called()  # gradients of the window would be lost
    model.grads_pending = False
    callback.on_train_batch_end(trainer, model, None, None, 1)
    trainer.save_checkpoint.assert_called_once()
    assert callback.saved_at_step == 7
