"""Callbacks used by the tests, importable by the provq-fit subprocesses the tests start.

Paths may contain ``{rank}``: under DDP every rank then writes its own file.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from provq_lightning.callbacks.curriculum import CurriculumCallback


def read_records(path: Path) -> dict[str, list[dict[str, Any]]]:
    """A ``RecordCurriculum`` file's rows by kind: ``train``, ``val`` and ``end``."""
    out: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "end": []}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out[row["kind"]].append(row)
    return out


def _curriculum(trainer: Trainer) -> CurriculumCallback:
    return next(cb for cb in trainer.callbacks if isinstance(cb, CurriculumCallback))


def _rank_path(path: str, trainer: Trainer) -> Path:
    return Path(path.format(rank=trainer.global_rank))


class RecordCurriculum(Callback):
    """Append what a run did to a JSON-lines file, one row per event, floats bit-exact.

    ``train`` rows: step, epoch, alpha, omega, phase and the effective codebook the step starts with
    (after the curriculum callback ran, so it includes a k-means seeding at that step);
    ``val`` rows: the step and every ``val/`` metric; ``end`` row: the curriculum callback's
    state when training stops. List it after ``CurriculumCallback``.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def _append(self, trainer: Trainer, row: dict[str, Any]) -> None:
        with _rank_path(self.path, trainer).open("a") as fh:
            fh.write(json.dumps(row) + "\n")  # json writes floats with repr: exact round trip

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        row = {
            "kind": "train",
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "alpha": float(pl_module.curriculum_alpha),
            "omega": float(pl_module.curriculum_omega),
            "phase": int(pl_module.curriculum_phase),
            "codebook": pl_module.quantizer.codebook().detach().cpu().tolist(),
        }
        self._append(trainer, row)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {
            k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")
        }
        self._append(trainer, {"kind": "val", "step": trainer.global_step, "metrics": metrics})

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        cb = _curriculum(trainer)
        state = {
            "seeded": cb.seeded,
            "seed_count": cb.seed_count,
            "seeded_at_step": cb.seeded_at_step,
            "reservoir_batches": cb.reservoir_batches,
            "reservoir_empty": cb.reservoir is None,
        }
        self._append(trainer, {"kind": "end", "step": trainer.global_step, "state": state})


class RecordSeeding(Callback):
    """Save (``torch.save``) this rank's k-means inputs and the reservoir just before seeding.

    ``latents``: the encoder outputs this rank produced in each reservoir-collection step;
    ``reservoir``: the callback's reservoir after the last warmup step, i.e. exactly what
    k-means runs on at the next step. List it after ``CurriculumCallback``.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.latents: list[torch.Tensor] = []

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor
    ) -> None:
        # After training_step, before the curriculum callback consumes the latents its forward
        # hook on the quantizer caught in this step.
        cb = _curriculum(trainer)
        if cb._latents and cb._collecting(trainer.global_step):
            self.latents.append(torch.cat(cb._latents).detach().cpu().clone())

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        cb = _curriculum(trainer)
        # global_step has already advanced past this batch here.
        if trainer.global_step == cb.warmup_steps and cb.reservoir is not None and not cb.seeded:
            payload = {"latents": self.latents, "reservoir": cb.reservoir.clone()}
            torch.save(payload, _rank_path(self.path, trainer))


class KillAtStep(Callback):
    """SIGKILL the process at a global step: no cleanup, no checkpoint, like an OOM kill.

    Under DDP every rank first waits for the others to reach the step, so all ranks die at
    the same step instead of the survivors failing in a collective with a dead peer. List it
    after ``CurriculumCallback`` to kill after that step's curriculum update (and seeding).
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            trainer.strategy.barrier("kill_at_step")
            os.kill(os.getpid(), signal.SIGKILL)


class SlowSteps(Callback):
    """Sleep ``seconds`` after every training step: a short run then lasts long enough to meet
    a real SLURM time limit. The trajectory is unchanged (sleeping touches no state)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        import time

        time.sleep(self.seconds)


class SigintAtStep(Callback):
    """Send this process SIGINT (a Ctrl-C) ``times`` times at the end of a global step, from
    inside the step's hooks, as a Ctrl-C that lands mid-run would; under DDP on ``rank`` only
    (None: every rank). List it before provq's own callbacks (any place in the config's list)."""

    def __init__(self, step: int, times: int = 1, rank: int | None = None) -> None:
        self.step = step
        self.times = times
        self.rank = rank
        # A terminal's Ctrl-C: a process started in the background (nohup, `cmd &` in a script,
        # some CI runners) inherits SIGINT ignored, and a fit rightly leaves it ignored. Built
        # with the config, so before the fit's callbacks look at the handler.
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if trainer.global_step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)
