"""``ResumeCallback``: what a resumed fit keeps from its checkpoint and what it takes anew.

Lightning restores an optimizer's ``param_groups`` from the checkpoint, so a learning rate (or
betas, weight decay) changed on the command line for a resume used to land in ``config.yaml``
while the optimizer kept the old one. This callback applies the configured optimizer
hyper-parameters after the restore (keeping the optimizer's moments) and says so; curriculum
settings are fixed for a run and refused by ``CurriculumCallback`` instead. It also lets a
changed checkpoint interval keep writing ``last.ckpt`` (Lightning started a ``last-v1.ckpt``
when the checkpoint callback's state key changed), and prints what was restored. A resume that
fails or is refused before training starts (a checkpoint that does not fit the model, changed
curriculum settings) leaves the run directory as it was: the TensorBoard event file Lightning
opened for it at setup is removed again.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

# Optimizer hyper-parameters a user may change between a run and its resume.
OPTIMIZER_SETTINGS = ("lr", "betas", "weight_decay", "eps", "momentum", "dampening")


def _base_lr(group: dict[str, Any]) -> float:
    # With an LR scheduler, "lr" is the scheduled value; "initial_lr" is the configured one.
    return group.get("initial_lr", group["lr"])


def _group_settings(group: dict[str, Any]) -> dict[str, Any]:
    out = {key: group[key] for key in OPTIMIZER_SETTINGS if key in group and key != "lr"}
    out["lr"] = _base_lr(group)
    return out


def apply_optimizer_settings(
    optimizer: Any, configured: list[dict[str, Any]], schedulers: list[Any]
) -> list[str]:
    """Set the configured hyper-parameters on a restored optimizer; returns what changed.

    A changed learning rate rescales the current (scheduled) rate and the schedulers' base
    rates by new/old, so a warmup or decay schedule continues from where it was.
    """
    changes = []
    for index, (group, wanted) in enumerate(zip(optimizer.param_groups, configured, strict=True)):
        restored = _group_settings(group)
        for key, value in wanted.items():
            old = restored.get(key)
            if old == value or (isinstance(old, tuple) and tuple(value) == old):
                continue
            changes.append(f"group {index} {key} {old!r} -> {value!r}")
            if key != "lr":
                group[key] = value
                continue
            scale = value / old if old else 1.0
            group["lr"] = group["lr"] * scale if old else value
            if "initial_lr" in group:
                group["initial_lr"] = value
            for scheduler in schedulers:
                if getattr(scheduler, "optimizer", None) is optimizer and hasattr(
                    scheduler, "base_lrs"
                ):
                    scheduler.base_lrs[index] = value
                    if hasattr(scheduler, "_last_lr"):
                        scheduler._last_lr[index] = group["lr"]
    return changes


class ResumeCallback(Callback):
    """Apply configured optimizer settings after a restore and report the resume."""

    def __init__(self) -> None:
        self._configured: list[list[dict[str, Any]]] | None = None
        self._log_dir: str | None = None
        self._fit_started = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            # A collective under DDP: asked here, where every rank is (not in on_exception).
            self._log_dir, self._fit_started = trainer.log_dir, False

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        if self._fit_started or not trainer.ckpt_path or not trainer.is_global_zero:
            return
        if self._log_dir is None:
            return
        # Lightning opened the loggers' writers at setup, before the checkpoint was restored:
        # a refused resume would leave an empty event file in the run it refused to touch.
        pattern = f"events.out.tfevents.*.{socket.gethostname()}.{os.getpid()}.*"
        for path in Path(self._log_dir).glob(pattern):
            path.unlink(missing_ok=True)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_started = True
        # Between building the optimizers from the config and restoring their checkpoint state.
        self._configured = [
            [_group_settings(group) for group in optimizer.param_groups]
            for optimizer in trainer.optimizers
        ]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.ckpt_path:
            return
        rank_zero_info(
            f"[provq] resumed from {trainer.ckpt_path} at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch})"
        )
        self._keep_writing_last_ckpt(trainer)
        if self._configured is None:
            return
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        for index, (optimizer, configured) in enumerate(
            zip(trainer.optimizers, self._configured, strict=True)
        ):
            if len(configured) != len(optimizer.param_groups):
                continue  # the model changed its groups; Lightning's restore already complained
            for change in apply_optimizer_settings(optimizer, configured, schedulers):
                rank_zero_info(
                    f"[provq] resume: optimizer {index} {change} (the configured value now "
                    "applies; config.yaml records it, the earlier config is kept beside it)"
                )

    @staticmethod
    def _keep_writing_last_ckpt(trainer: Trainer) -> None:
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or not callback.save_last:
                continue
            if callback.last_model_path or not callback.dirpath:
                continue
            name = callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION
            last = Path(callback.dirpath) / name
            if last.is_file():
                callback.last_model_path = str(last)
