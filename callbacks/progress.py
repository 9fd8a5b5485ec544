"""``ProvqProgressBar``: Lightning's rich progress bar, showing what a provq fit is counted in.

provq runs are counted in optimizer steps (``max_steps``, ``max_epochs: -1``), so Lightning's
bar read ``Epoch 1/-2`` with the logger's version (``v_num``) and no loss. This bar shows the
step out of ``max_steps``, the curriculum phase (warmup, transition, hard), the latest logged
``train/loss``, and the other values modules log with ``prog_bar=True``; no ``v_num``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.trainer.states import TrainerFn

from provq_lightning.reporting.curriculum_tags import PHASE_NAMES
from provq_lightning.tokenizer import VQTokenizer

LOSS = "train/loss"


def fit_progress(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """``step`` (``global_step/max_steps``), ``phase`` and ``loss`` of a running fit."""
    if trainer.state.fn != TrainerFn.FITTING:
        return {}
    step = trainer.global_step
    shown: dict[str, Any] = {
        "step": f"{step}/{trainer.max_steps}" if trainer.max_steps > 0 else str(step)
    }
    if isinstance(pl_module, VQTokenizer):
        shown["phase"] = PHASE_NAMES[pl_module.phase]
    loss = trainer.callback_metrics.get(LOSS)
    if loss is not None:
        shown["loss"] = float(loss)
    return shown


class ProvqProgressBar(RichProgressBar):
    """A ``RichProgressBar`` with step/max_steps, phase and loss instead of ``v_num``."""

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {**fit_progress(trainer, pl_module), **items}

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning writes "Epoch 1/<max_epochs - 1>", i.e. "Epoch 1/-2" for max_epochs -1
        # (unlimited: provq counts steps).
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"
