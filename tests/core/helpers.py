"""Callbacks used by the tests, importable by the provq-fit subprocesses the tests start."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from lightning.pytorch import Callback


class RecordCurriculum(Callback):
    """Append (step, alpha, omega, phase) of every training step to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        row = {
            "step": trainer.global_step,
            "alpha": float(pl_module.curriculum_alpha),
            "omega": float(pl_module.curriculum_omega),
            "phase": int(pl_module.curriculum_phase),
        }
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


class KillAtStep(Callback):
    """SIGKILL the whole process at a global step: no cleanup, no checkpoint, like an OOM kill."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
