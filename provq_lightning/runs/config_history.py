"""``config.yaml`` in a run directory, with the configs of earlier invocations kept beside it."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback

from provq_lightning.runs.checkpoint_io import write_atomically


def write_config_history(path: Path, text: str) -> Path | None:
    """Write ``text`` to ``path``; a different earlier config is kept as ``config.N.yaml``.

    Returns where the earlier config went, or None when there was none or it was the same.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = None
    if path.is_file():
        if path.read_text() == text:
            return None
        n = 1
        while (kept := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
            n += 1
        # Copy, then replace: a full disk at either step leaves the run its config.yaml.
        write_atomically(kept, path.read_bytes())
    write_atomically(path, text.encode())  # a reader never sees a half-written config
    return kept


class ConfigHistoryCallback(SaveConfigCallback):
    """Write ``config.yaml`` into the run directory, keeping earlier configs as ``config.N.yaml``.

    A resumed fit writes it only after the checkpoint restored, so a resume that fails (another
    ``num_codes``, changed curriculum settings) leaves the run's config as it was.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved or (stage == "fit" and self.config.get("ckpt_path")):
            return
        self._write(trainer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.already_saved:
            self._write(trainer)

    def _write(self, trainer: Trainer) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank asks
        if trainer.is_global_zero and log_dir is not None:
            text = self.parser.dump(self.config, skip_none=False)
            write_config_history(Path(log_dir) / self.config_filename, text)
        self.already_saved = True
