"""Write the latest validation/test metrics and how the run ended to ``<log_dir>/metrics.json``.

Scripts and sweep reports read this flat file instead of parsing TensorBoard event files. It is
rewritten after every validation/test run, so it always holds the latest (at the end of a fit:
the final) metrics, and a crashed run still leaves its last ones. Keys:

- ``val/...``, ``test/...``: numbers; a NaN/inf metric (JSON has none) is written as the string
  ``"nan"``, ``"inf"`` or ``"-inf"`` (``float()`` reads them back) and its name is listed in
  ``nonfinite`` (present only then);
- ``global_step``: the step of the latest write; for ``provq-fit validate|test``, the step
  of the evaluated checkpoint;
- ``checkpoint`` (evaluations only): the evaluated checkpoint's path;
- ``status`` (fit runs only): ``running`` from the first training step on (also before the
  first validation), then ``finished``, ``failed``
  (an exception; ``error`` holds its first line) or ``interrupted`` (Ctrl-C, SIGTERM, or a
  callback with a public ``requeued`` attribute set True, e.g. on SLURM preemption). The final
  status is written even when the run ends before any validation. A fit that fails or is
  refused before it begins (a resume whose checkpoint does not fit) leaves the file untouched.
  ``provq-fit validate|test`` leave it as the fit left it (in a directory without a fit they
  write ``finished``); the CLI gives them their own directory
  (``provq_lightning.runs.eval_dir``), so a fit's file is its own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from provq_lightning.runs.checkpoint_io import write_json_atomic

PREFIXES = ("val/", "test/")
# Keys that are not metrics; readers that want numbers only skip them.
NON_METRIC_KEYS = ("global_step", "status", "error", "nonfinite", "checkpoint")
RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"


def encode_number(number: float) -> float | str:
    """``number`` itself when finite; ``"nan"``/``"inf"``/``"-inf"`` otherwise (valid JSON)."""
    return number if math.isfinite(number) else str(number)


def collect_metrics(trainer: Trainer) -> dict[str, float | str]:
    out: dict[str, float | str] = {}
    for name, value in trainer.callback_metrics.items():
        if not name.startswith(PREFIXES):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        out[name] = encode_number(number)
    return dict(sorted(out.items()))


def _read(path: Path) -> dict[str, Any]:
    try:
        existing = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return existing if isinstance(existing, dict) else {}


def was_interrupted(trainer: Trainer, exception: BaseException | None = None) -> bool:
    """Ctrl-C, SIGTERM, or a callback (e.g. a preemption handler) that says it requeued."""
    if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
        return True
    if getattr(trainer, "received_sigterm", False):
        return True
    return any(getattr(cb, "requeued", False) is True for cb in trainer.callbacks)


class MetricsJsonCallback(Callback):
    """Keep ``metrics.json`` in the run's log directory up to date."""

    def __init__(self, filename: str = "metrics.json") -> None:
        self.filename = filename
        self._log_dir: str | None = None
        self._checkpoint_step: int | None = None  # of the checkpoint an evaluation restored
        self._fit_started = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._fit_started = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # `trainer.log_dir` is a broadcast under DDP, which every rank must join: ask here, where
        # all ranks are, not in `on_exception`, which may run on one rank only.
        self._log_dir = trainer.log_dir
        self._fit_started = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After the whole restore: a resumed run shows its own step, its metrics kept.
        path = self._path(trainer, ask=False)
        if path is not None:
            self._update(path, trainer, {}, RUNNING)

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # validate/test restore only the weights, so trainer.global_step stays 0 there.
        step = checkpoint.get("global_step")
        self._checkpoint_step = int(step) if step is not None else None

    def _path(self, trainer: Trainer, ask: bool) -> Path | None:
        log_dir = trainer.log_dir if ask else self._log_dir
        if log_dir is None and trainer.world_size == 1:
            log_dir = trainer.log_dir  # no collective with one process
        if not trainer.is_global_zero or log_dir is None:
            return None
        return Path(log_dir) / self.filename

    def _update(
        self,
        path: Path,
        trainer: Trainer,
        metrics: dict,
        status: str,
        error: str = "",
        keep_status: bool = False,
        step: int | None = None,
    ) -> None:
        existing = _read(path)
        # Keep test metrics written by an earlier `provq-fit test` next to new val metrics.
        existing.update(metrics)
        nonfinite = sorted(
            k for k, v in existing.items() if k not in NON_METRIC_KEYS and isinstance(v, str)
        )
        existing.pop("nonfinite", None)
        if nonfinite:
            existing["nonfinite"] = nonfinite
        existing["global_step"] = float(trainer.global_step if step is None else step)
        if not (keep_status and "status" in existing):
            existing["status"] = status
            existing.pop("error", None)
            if error:
                existing["error"] = error
        write_json_atomic(path, existing)

    def _write(self, trainer: Trainer) -> None:
        if trainer.sanity_checking:
            return
        # Every rank asks for the log dir (see on_fit_start).
        path = self._path(trainer, ask=True)
        if path is None:
            return
        metrics = collect_metrics(trainer)
        if not metrics:
            return
        if trainer.state.fn == TrainerFn.FITTING:
            self._update(path, trainer, metrics, RUNNING)
        else:  # validate/test: the fit's status stays; without one the evaluation's is recorded
            if trainer.ckpt_path:
                metrics["checkpoint"] = str(Path(trainer.ckpt_path).resolve())
            step = self._checkpoint_step if trainer.ckpt_path else None
            self._update(path, trainer, metrics, FINISHED, keep_status=True, step=step)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = self._path(trainer, ask=False)
        if path is not None:
            status = INTERRUPTED if was_interrupted(trainer) else FINISHED
            self._update(path, trainer, {}, status)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        if trainer.state.fn != TrainerFn.FITTING or not self._fit_started:
            return  # failed or refused before the fit began (a resume): the file stays as it was
        path = self._path(trainer, ask=False)
        if path is None:
            return
        if was_interrupted(trainer, exception):
            self._update(path, trainer, {}, INTERRUPTED)
            return
        lines = str(exception).strip().splitlines()
        error = f"{type(exception).__name__}: {lines[0] if lines else ''}"[:1000]
        # An error that names its step (NonFiniteError) is recorded at that step, so the file
        # and the message agree.
        step = exception.step if isinstance(getattr(exception, "step", None), int) else None
        self._update(path, trainer, {}, FAILED, error, step=step)
