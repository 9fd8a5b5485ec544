"""Where a stop asked for during a training step takes effect.

A signal (SIGUSR1, SIGTERM, Ctrl-C) arrives in the middle of a step; saving there would mix the
weights, the curriculum and the data position of different steps. A callback that stops on a
signal records the request and acts in ``stop_at_boundary``, which this base calls after the
step's other hooks and its validation (the resumed run skips a validation due at the saved
step), at the end of an epoch, and before the next batch.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class StepBoundaryStop(Callback):
    """Calls ``stop_at_boundary(trainer)`` at every step boundary (see the module docstring)."""

    def stop_at_boundary(self, trainer: Trainer) -> None:
        raise NotImplementedError

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.stop_at_boundary(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stop_at_boundary(trainer)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.stop_at_boundary(trainer)
