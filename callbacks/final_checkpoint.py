"""``FinalCheckpoint``: a fit that ends leaves ``last.ckpt`` at its last completed step.

``ModelCheckpoint`` writes ``last.ckpt`` every ``every_n_train_steps``; Lightning saves it at the
end only when nothing was saved before. A run whose ``max_steps`` is not a multiple of the
interval ended with an old ``last.ckpt`` (400 steps every 250: step 250), and ``predict``,
``provq-tokenize`` and ``validate`` of the finished run silently used weights 150 steps old.

- Training ends (``max_steps``, ``max_epochs``, a callback's stop): ``on_train_end`` saves
  ``last.ckpt`` when its last save in this run was at an earlier step.
- Ctrl-C (SIGINT): as ``PreemptionCheckpoint`` does with its signals, the handler only sets a
  flag. A ``KeyboardInterrupt`` raised mid-step would leave weights, optimizer, curriculum and
  data position of different steps, and a checkpoint of them would resume into neither. At the
  end of the step in flight the ranks agree, save ``last.ckpt`` and stop as Ctrl-C always
  stopped a fit (``KeyboardInterrupt``: ``metrics.json`` says ``interrupted``, exit 1). A second
  Ctrl-C stops at once without saving: ``last.ckpt`` keeps its last save.
- Preemption (SIGUSR1, SIGTERM): ``PreemptionCheckpoint`` saves at the step boundary already.

Saves go through ``trainer.save_checkpoint`` on every rank (a collective: the strategy's
``CheckpointIO``, ``AtomicCheckpointIO`` under ``provq-fit``, writes it on rank 0), into the file
the ``save_last`` ``ModelCheckpoint`` writes. A run without one keeps no ``last.ckpt``, and
nothing is saved.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from provq_lightning.callbacks.preemption import PreemptionCheckpoint, save_last_checkpoint
from provq_lightning.callbacks.step_boundary import StepBoundaryStop
from provq_lightning.tokenizer import VQTokenizer


def last_owner(trainer: Trainer) -> ModelCheckpoint | None:
    """The ``ModelCheckpoint`` that writes ``last.ckpt`` (the first with ``save_last``)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last:
            return callback
    return None


def saved_steps(owner: ModelCheckpoint, callbacks: list[Callback]) -> list[int]:
    """Steps at which this run wrote ``last.ckpt``: the owner's saves (it saves ``last.ckpt``
    with each of its files), a preemption save, a ``FinalCheckpoint`` save."""
    steps = [owner._last_global_step_saved] if owner._last_checkpoint_saved else []
    for callback in callbacks:
        if isinstance(callback, (PreemptionCheckpoint, FinalCheckpoint)):
            if callback.saved_at_step is not None:
                steps.append(callback.saved_at_step)
    return steps


class FinalCheckpoint(StepBoundaryStop):
    """Save ``last.ckpt`` at the last completed step when a fit ends or is stopped by Ctrl-C.

    Args:
        ctrl_c: handle Ctrl-C: save at the end of the step in flight, then stop. Off, a Ctrl-C
            stops at once and ``last.ckpt`` keeps its last periodic save.

    Public state: ``interrupted`` (a Ctrl-C reached this rank) and ``saved_at_step``.
    """

    def __init__(self, ctrl_c: bool = True) -> None:
        self.ctrl_c = ctrl_c
        self.interrupted = False
        self.saved_at_step: int | None = None
        self._stop_pending = False
        self._previous: Any = None
        self._installed = False
        self._speaks = True  # global rank 0 prints the Ctrl-C notice

    # -- Ctrl-C: only a flag ----------------------------------------------------------------
    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.interrupted:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.interrupted = True
        if self._speaks:  # os.write: safe inside a handler, unlike print or logging
            os.write(2, b"\n[provq] Ctrl-C: saving last.ckpt at the end of this step, then "
                        b"stopping (Ctrl-C again: stop now, without saving)\n")

    def _install(self) -> None:
        # Only over Python's own handler: a fit started with SIGINT ignored (nohup, a
        # background job) keeps ignoring it; signals can be set from the main thread only.
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        self._installed = True

    def uninstall_handlers(self) -> None:
        if self._installed:
            if signal.getsignal(signal.SIGINT) is self._on_sigint:
                signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.interrupted = self._stop_pending = False
        self.saved_at_step = None
        self._speaks = trainer.is_global_zero
        if self.ctrl_c:
            self._install()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.ctrl_c or self._stop_pending:
            return
        # Every rank takes part every step: one rank's Ctrl-C stops all at the same step.
        if not trainer.strategy.reduce_boolean_decision(self.interrupted, all=False):
            return
        if isinstance(pl_module, VQTokenizer) and pl_module.grads_pending:
            return  # inside a gradient-accumulation window: save at its optimizer step
        if 0 < trainer.max_steps <= trainer.global_step:
            return  # the last step: the fit ends now anyway, and on_train_end saves
        self.save_if_behind(trainer, at_end=False)
        self._stop_pending = True

    # After the step's other hooks and its validation (the resumed run skips a validation due
    # at the saved step), as PreemptionCheckpoint stops; no training step starts past the save.
    def stop_at_boundary(self, trainer: Trainer) -> None:
        if not self._stop_pending:
            return
        self._stop_pending = False
        rank_zero_info(f"[provq] Ctrl-C: stopped at step {trainer.global_step}, which "
                       "last.ckpt holds; resume with --ckpt_path last")
        raise KeyboardInterrupt

    # -- the end ------------------------------------------------------------------------------
    def save_if_behind(self, trainer: Trainer, at_end: bool) -> None:
        """Save ``last.ckpt`` unless it already holds ``trainer.global_step`` (every rank)."""
        owner = last_owner(trainer)
        if owner is None:
            return
        steps = saved_steps(owner, trainer.callbacks)
        if not steps and at_end:
            return  # nothing saved in this run: ModelCheckpoint's own on_train_end saves it
        if steps and max(steps) == trainer.global_step:
            return
        path = save_last_checkpoint(trainer)
        self.saved_at_step = trainer.global_step
        rank_zero_info(f"[provq] saved {path} at step {trainer.global_step}, the last completed "
                       "step")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.uninstall_handlers()
        self.save_if_behind(trainer, at_end=True)
