"""Where a stop asked for during a training step takes effect, and the handlers given back.

A signal (SIGUSR1, SIGTERM, Ctrl-C) arrives in the middle of a step; saving there would mix the
weights, the curriculum and the data position of different steps. A callback that stops on a
signal records the request and acts in ``stop_at_boundary``, which this base calls after the
step's other hooks and its validation (the resumed run skips a validation due at the saved
step), at the end of an epoch, and before the next batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class StepBoundaryStop(Callback, ABC):
    """Calls ``stop_at_boundary(trainer)`` at every step boundary (see the module docstring),
    and ``uninstall_handlers()`` when the fit ends, normally or by an exception."""

    @abstractmethod
    def stop_at_boundary(self, trainer: Trainer) -> None:
        """Stop the fit here if a stop was agreed during the step."""

    @abstractmethod
    def uninstall_handlers(self) -> None:
        """Give back the signal handlers this callback installed for the fit."""

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.uninstall_handlers()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        # teardown is not called when a fit ends in an exception. A failed fit saves nothing:
        # its state is that of no completed step.
        self.uninstall_handlers()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.stop_at_boundary(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stop_at_boundary(trainer)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.stop_at_boundary(trainer)
