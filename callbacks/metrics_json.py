"""Write the latest validation/test metrics to ``<log_dir>/metrics.json``.

Scripts and sweep reports read this flat ``{name: float}`` file instead of parsing TensorBoard
event files. It is rewritten after every validation/test run, so the file always holds the
latest (at the end of a fit: the final) metrics, and a crashed run still leaves its last ones.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

PREFIXES = ("val/", "test/")


def collect_metrics(trainer: Trainer) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in trainer.callback_metrics.items():
        if not name.startswith(PREFIXES):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[name] = number
    return dict(sorted(out.items()))


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)  # a reader never sees a half-written file


class MetricsJsonCallback(Callback):
    """Keep ``metrics.json`` in the run's log directory up to date."""

    def __init__(self, filename: str = "metrics.json") -> None:
        self.filename = filename

    def _write(self, trainer: Trainer) -> None:
        if trainer.sanity_checking:
            return
        # `trainer.log_dir` is a broadcast from rank 0 under DDP: every rank must ask for it,
        # or rank 0 waits forever for the others.
        log_dir = trainer.log_dir
        if not trainer.is_global_zero or log_dir is None:
            return
        metrics = collect_metrics(trainer)
        if not metrics:
            return
        path = Path(log_dir) / self.filename
        existing = {}
        if path.exists():
            try:
                existing = json.loads(path.read_text())
            except json.JSONDecodeError:
                existing = {}
        # Keep test metrics written by an earlier `provq-fit test` next to new val metrics.
        existing.update(metrics)
        existing["global_step"] = float(trainer.global_step)
        write_json_atomic(path, existing)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)
