"""``PreemptionCheckpoint``: on SLURM's warning signal, save ``last.ckpt`` at a step boundary,
requeue the job and stop, so a preempted run loses no finished step.

SLURM sends SIGUSR1 ``--signal=SIGUSR1@<seconds>`` before a job's time limit. The signal handler
only sets a flag: a checkpoint written inside the handler can be mid-step (Lightning's own
``hpc_ckpt`` is; resuming from it left the batch counter one ahead of the global step). At the
end of the next training step (``on_train_batch_end``, the point where ``ModelCheckpoint``
saves its periodic ``last.ckpt``) the ranks agree on the flag with one 1-element all-reduce,
save into the ``ModelCheckpoint``'s own ``last.ckpt``, and stop before the next step trains
(after this step's validation, if one is due: the resumed run skips it). Before, rank 0 runs
``scontrol requeue`` for the job (array task) under SLURM; the process then exits with
``EX_TEMPFAIL`` (75), "try again", also outside SLURM.

SIGTERM is a preemption too: ``scancel``, and SLURM preemption without ``--signal``, send it
(then SIGKILL after ``KillWait``/``GraceTime``). It is handled the same way, a flag and a save
at the next step boundary, and the run exits with 75 so SLURM never records it COMPLETED, but
without a requeue: the job was cancelled, or SLURM's own preemption requeues it. Lightning's
SIGTERM handler (which stops with exit 0 and saves nothing) is replaced for the fit.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from provq_lightning.callbacks.step_boundary import StepBoundaryStop
from provq_lightning.tokenizer import VQTokenizer

EXIT_PREEMPTED = 75  # os.EX_TEMPFAIL: "temporary failure, retry" (EX_* is POSIX-only in os)


class Preempted(SystemExit):
    """Raised on every rank to end a preempted fit; the process exits with ``EXIT_PREEMPTED``."""


def parse_signal(value: str | int | signal.Signals) -> signal.Signals:
    """``"SIGUSR1"``, ``"USR1"``, ``10`` or ``signal.SIGUSR1`` as a ``signal.Signals``."""
    try:
        if isinstance(value, str) and not value.isdigit():
            name = value.upper()
            return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
        return signal.Signals(int(value))
    except (KeyError, ValueError):
        raise ValueError(
            f"PreemptionCheckpoint: signal={value!r} is not a signal; use a name such as "
            "SIGUSR1 (the one given to sbatch --signal)"
        ) from None


def slurm_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The id ``scontrol requeue`` takes for this job: ``<array job>_<task>`` for an array task,
    else ``SLURM_JOB_ID``; None outside SLURM."""
    env = os.environ if environ is None else environ
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return env.get("SLURM_JOB_ID") or None


def requeue_slurm_job(job_id: str) -> bool:
    """``scontrol requeue job_id``; True when SLURM accepted it (a warning says why not)."""
    try:
        done = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        rank_zero_warn(f"could not requeue SLURM job {job_id}: {exc}; resubmit it to resume")
        return False
    if done.returncode != 0:
        rank_zero_warn(
            f"scontrol requeue {job_id} failed (exit {done.returncode}): "
            f"{done.stderr.strip()}; resubmit the job to resume (sbatch --requeue allows it)"
        )
        return False
    return True


def last_checkpoint_path(trainer: Trainer) -> tuple[Path, ModelCheckpoint | None]:
    """Where ``last.ckpt`` is: the path the (first ``save_last``) ``ModelCheckpoint`` writes."""
    checkpoints = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    saving_last = [cb for cb in checkpoints if cb.save_last]
    owner = (saving_last or checkpoints or [None])[0]
    if owner is not None and owner.dirpath is not None:
        if owner.last_model_path:  # the file it already writes (it may have chosen last-vN)
            return Path(owner.last_model_path), owner
        candidates = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        return Path(owner.format_checkpoint_name(candidates, owner.CHECKPOINT_NAME_LAST)), owner
    # No ModelCheckpoint: where a default one would write (`log_dir` is a collective under DDP,
    # and every rank is here).
    root = trainer.log_dir or trainer.default_root_dir
    return Path(root) / "checkpoints" / f"last{ModelCheckpoint.FILE_EXTENSION}", None


def save_last_checkpoint(trainer: Trainer) -> Path:
    """Write ``last.ckpt`` at the current step (every rank: a collective) and return its path."""
    path, owner = last_checkpoint_path(trainer)
    if owner is not None:
        # Part of the saved state: a resumed ModelCheckpoint then keeps writing this file
        # instead of starting last-v1.ckpt next to it.
        owner.last_model_path = str(path)
    trainer.save_checkpoint(path)
    return path


class PreemptionCheckpoint(StepBoundaryStop):
    """Save ``last.ckpt`` at the step boundary after ``signal`` arrives, requeue, stop.

    Args:
        signal: the signal SLURM sends before the time limit (``sbatch --signal``).
        check_every_n_steps: how often the ranks agree on the flag (one 1-element all-reduce,
            the size of the one Lightning already broadcasts every step for SIGTERM); the
            checkpoint is written at most this many steps after the signal.
        requeue: run ``scontrol requeue`` for the job under SLURM before stopping (on
            ``signal`` only; never on SIGTERM).
        sigterm: treat SIGTERM as a preemption too (save, stop, exit 75).

    Public state: ``signal_received`` (this rank got the signal), ``requeued`` (the run saved
    ``last.ckpt`` and stopped to be resumed, and under SLURM asked to be requeued),
    ``checkpoint_path`` (the checkpoint it saved) and ``saved_at_step``.
    """

    def __init__(
        self,
        signal: str | int = "SIGUSR1",
        check_every_n_steps: int = 1,
        requeue: bool = True,
        sigterm: bool = True,
    ) -> None:
        if int(check_every_n_steps) < 1:
            raise ValueError(
                f"PreemptionCheckpoint: check_every_n_steps={check_every_n_steps} must be >= 1"
            )
        self.signal = parse_signal(signal)
        self.check_every_n_steps = int(check_every_n_steps)
        self.requeue = requeue
        self.sigterm = sigterm
        self.signal_received = False
        self.sigterm_received = False  # the signal was SIGTERM (no requeue then)
        self.requeued = False
        self.checkpoint_path: Path | None = None
        self.saved_at_step: int | None = None
        self._stop_pending = False
        self._previous_handler: Any = None
        self._installed = False
        self._previous_sigterm: Any = None
        self._sigterm_installed = False

    # -- the signal: only a flag ---------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Nothing else here: the step in flight must finish before anything is saved.
        self.signal_received = True

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.sigterm_received = self.signal_received = True

    def _install_sigterm(self) -> None:
        if not self.sigterm or signal.getsignal(signal.SIGTERM) is self._on_sigterm:
            return
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        if not self._sigterm_installed:
            self._previous_sigterm, self._sigterm_installed = previous, True

    def _install(self) -> None:
        current = signal.getsignal(self.signal)
        if current is self._on_signal:
            return
        previous = signal.signal(self.signal, self._on_signal)
        if not self._installed:
            self._previous_handler, self._installed = previous, True

    def uninstall_handlers(self) -> None:
        if self._installed:
            signal.signal(self.signal, self._previous_handler or signal.SIG_DFL)
            self._installed = False
        if self._sigterm_installed:
            signal.signal(signal.SIGTERM, self._previous_sigterm or signal.SIG_DFL)
            self._sigterm_installed = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Installed before Lightning registers its handlers (after `setup`): Lightning's SLURM
        # auto-requeue handler, which writes a mid-step hpc_ckpt, is only set on a signal
        # nobody handles yet.
        self._install()
        self.signal_received = self.requeued = self._stop_pending = False
        self.sigterm_received = False
        rank_zero_info(
            f"[provq] preemption: on {self.signal.name}"
            + (" or SIGTERM" if self.sigterm else "")
            + ", last.ckpt is saved at the next step boundary, then the run stops"
            + (f" (and requeues its SLURM job on {self.signal.name})"
               if self.requeue and slurm_job_id() else "")
        )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install()  # in case anything replaced it since `setup`
        # After Lightning registered its own SIGTERM handler (which would end the fit with
        # exit 0 at the next step and save nothing): ours replaces it for the fit.
        self._install_sigterm()

    # -- the step boundary: agree, save ---------------------------------------------------------

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._stop_pending or trainer.global_step % self.check_every_n_steps:
            return
        # Every rank takes part every time, so all ranks decide at the same step even when the
        # signal reaches them at different steps.
        if not trainer.strategy.reduce_boolean_decision(self.signal_received, all=False):
            return
        if isinstance(pl_module, VQTokenizer) and pl_module.grads_pending:
            # Inside a gradient-accumulation window (same on every rank): the pending gradients
            # are not in a checkpoint, so save at the window's optimizer step instead.
            return
        # The ranks agree on which signal it was: SIGTERM on any rank means no requeue.
        self.sigterm_received = trainer.strategy.reduce_boolean_decision(
            self.sigterm_received, all=False
        )
        name = "SIGTERM" if self.sigterm_received else self.signal.name
        if 0 < trainer.max_steps <= trainer.global_step:
            rank_zero_info(f"[provq] preemption: {name} at the last step: finishing the run")
            self._stop_pending = True  # nothing to resume: stop checking, let the run end
            self.checkpoint_path = None
            return
        self.checkpoint_path = save_last_checkpoint(trainer)
        self.saved_at_step = trainer.global_step
        self._stop_pending = True
        rank_zero_info(
            f"[provq] preemption: saved {self.checkpoint_path} at step {trainer.global_step}"
        )

    # -- stop at the first hook after the step (and its validation) ended -----------------------
    # The step's train metrics reach the loggers after `on_train_batch_end`, and a validation
    # due at the saved step runs after it too; the resumed run skips that validation, as after
    # a periodic checkpoint, so it must run here. No training step starts: the next batch stops
    # at its `on_train_batch_start` (hooks of callbacks listed before this one, which run
    # first, are the only work done past the checkpoint). ModelCheckpoint runs after every
    # other callback, so stopping in these hooks also keeps it from writing last.ckpt again
    # with a later state (at validation or epoch end).

    def stop_at_boundary(self, trainer: Trainer) -> None:
        if not self._stop_pending or self.checkpoint_path is None:
            return
        self._stop_pending = False
        for logger in trainer.loggers:
            logger.save()  # flushed before the requeue, whose SIGTERM/SIGKILL may come early
        job = slurm_job_id() if self.requeue and not self.sigterm_received else None
        requeued = False
        if job is not None and trainer.is_global_zero:
            requeued = requeue_slurm_job(job)
        self.requeued = True
        resume = f"--ckpt_path {self.checkpoint_path}"
        then = f"requeued SLURM job {job}" if requeued else f"resume with {resume}"
        if self.sigterm_received:
            then = f"SIGTERM: exit {EXIT_PREEMPTED}, not requeued; {then}"
        rank_zero_info(f"[provq] preemption: stopping at step {self.saved_at_step}; {then}")
        # No rank exits before rank 0 has requeued: srun --kill-on-bad-exit would end the job
        # (not requeued) as soon as one task exits with an error.
        trainer.strategy.barrier("provq_preemption")
        raise Preempted(EXIT_PREEMPTED)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Training ended right after the save (e.g. max_epochs): the run is complete, not
        # preempted; its last.ckpt is the final state.
        self._stop_pending = False
