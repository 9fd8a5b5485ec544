"""``FitTimeCallback``: CPU and wall seconds of a fit, written to ``<log_dir>/timing.json``;
the chain and residue counts that Lightning's ``ThroughputMonitor`` turns into residues/s.

The comparison tables report the compute each run took next to its metrics. CPU time is the
process's (all threads: torch's intra-op pool included; data loading runs in-process with
``num_workers: 0``), so it is a fairer cost measure than wall time on a shared machine. Both
are summed over resumed segments: the totals so far travel in the checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from provq_lightning.runs.checkpoint_io import write_json_atomic


class FitTimeCallback(Callback):
    """Track CPU/wall seconds of ``fit`` (validation included) and write ``timing.json``."""

    def __init__(self, filename: str = "timing.json") -> None:
        self.filename = filename
        self.prior_cpu_s = 0.0  # from earlier segments of a resumed run
        self.prior_wall_s = 0.0
        self._cpu0: float | None = None
        self._wall0 = 0.0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._cpu0 = time.process_time()
        self._wall0 = time.perf_counter()

    def totals(self) -> tuple[float, float]:
        if self._cpu0 is None:
            return self.prior_cpu_s, self.prior_wall_s
        return (
            self.prior_cpu_s + time.process_time() - self._cpu0,
            self.prior_wall_s + time.perf_counter() - self._wall0,
        )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or trainer.log_dir is None:
            return
        cpu_s, wall_s = self.totals()
        payload = {"cpu_s": cpu_s, "wall_s": wall_s, "global_step": trainer.global_step}
        write_json_atomic(Path(trainer.log_dir) / self.filename, payload)

    def state_dict(self) -> dict[str, Any]:
        cpu_s, wall_s = self.totals()
        return {"cpu_s": cpu_s, "wall_s": wall_s}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.prior_cpu_s = float(state_dict.get("cpu_s", 0.0))
        self.prior_wall_s = float(state_dict.get("wall_s", 0.0))


def batch_chains(batch: dict[str, Any]) -> int:
    """Chains in a batch: the ``batch_size_fn`` of Lightning's ``ThroughputMonitor``."""
    return int(batch["residue_mask"].shape[0])


def batch_residues(batch: dict[str, Any]) -> int:
    """Real (unpadded) residues in a batch: the ``length_fn`` of ``ThroughputMonitor``, whose
    ``items_per_sec`` is then residues/s."""
    return int(batch["residue_mask"].sum())
