"""What the checkpoint acceptance tests share: a TopoDisc config and a provq-fit child process.

Children come from ``tests.distributed.launch``'s fork server (torch, Lightning and provq already
imported), so a run costs its training time, not ~5 s of imports; each runs exactly what the
``provq-fit`` entry point runs, with its own ``$TMPDIR``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

from tests.distributed.launch import REPO, forkserver
from tests.helpers import effective_config

RUN_NAME, RUN_VERSION = "run", "v"


class Ballast(Callback):
    """Adds ``mib`` MiB of zeros to every checkpoint: a save takes long enough to be hit."""

    def __init__(self, mib: int) -> None:
        self.mib = mib
        self._payload: torch.Tensor | None = None

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._payload is None:
            self._payload = torch.zeros(self.mib << 20, dtype=torch.uint8)
        checkpoint["ballast"] = self._payload


def write_config(
    path: Path, save_dir: Path, max_steps: int, every: int, ballast_mib: int = 0
) -> Path:
    """A short TopoDisc ProVQ run into ``save_dir/run/v``, checkpointing every ``every`` steps."""
    config = effective_config(REPO / "experiments" / "topodisc_provq.yaml")
    trainer = config["trainer"]
    trainer.update(
        max_steps=max_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer["logger"]["init_args"].update(
        save_dir=str(save_dir), name=RUN_NAME, version=RUN_VERSION
    )
    (checkpoint,) = trainer["callbacks"]
    config["curriculum"].update(warmup_steps=5, transition_steps=5, kmeans_collect_batches=2)
    checkpoint["init_args"].update(every_n_train_steps=every)
    if ballast_mib:
        trainer["callbacks"].append(
            {
                "class_path": "tests.reliability.helpers.Ballast",
                "init_args": {"mib": ballast_mib},
            }
        )
    config["model"]["init_args"].update(figure_every_n_steps=0)
    path.write_text(yaml.safe_dump(config))
    return path


def run_dir(save_dir: Path) -> Path:
    return save_dir / RUN_NAME / RUN_VERSION


def _child(argv: list[str], tmpdir: str, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    for key in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_"))]:
        del os.environ[key]
    os.environ.update(OMP_NUM_THREADS="1", TMPDIR=tmpdir)
    tempfile.tempdir = None  # the fork server may have cached its own answer
    os.chdir(REPO)
    torch.set_num_threads(1)
    from provq_lightning.tools.fit import main

    main(argv)


def start_fit(argv: list[str], tmpdir: Path, log: Path) -> mp.Process:
    """``provq-fit argv`` in a child with ``$TMPDIR=tmpdir``, output appended to ``log``."""
    proc = forkserver().Process(target=_child, args=(argv, str(tmpdir), str(log)), daemon=False)
    proc.start()
    return proc


def finish(proc: mp.Process, timeout: float = 240) -> int:
    """The child's exit code; kills it and fails if it outlives ``timeout``."""
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise TimeoutError(f"provq-fit did not finish within {timeout}s")
    assert proc.exitcode is not None
    return proc.exitcode
