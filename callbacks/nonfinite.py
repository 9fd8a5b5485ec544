"""Stop a run at its first non-finite loss, and never write a checkpoint with non-finite weights.

A diverged run otherwise trains on to ``max_steps``, seeds the codebook by k-means on NaN latents
and overwrites ``last.ckpt`` with NaN weights, all with exit status 0. ``provq-fit`` adds a
``NonFiniteGuard`` to every run; it raises ``NonFiniteError`` (a ``ProvqError``: one line, exit 1)
naming the step, the loss term, the curriculum phase and the last checkpoint with finite weights.

What it checks, every training step, with one host sync (under DDP the verdict is all-reduced
first, so every rank stops at the same step instead of waiting in a collective):

- the ``training_step`` output (a tensor, or every tensor in the returned dict),
- under manual optimization, every loss passed to ``manual_backward`` in the step (a GAN's
  discriminator loss is not part of the returned generator loss),
- the ``train/...`` values in ``trainer.callback_metrics`` (the per-term losses, e.g.
  ``train/recon``; the shipped tokenizers log them every ``log_every_n_steps``, so on other steps
  the error names the total loss only).

On every checkpoint save it also scans the model's and optimizers' floating-point tensors and
refuses the save (same kind of error) when any is non-finite: weights can turn NaN in the very
update that produced the first NaN loss.

Turn it off with a guard of your own in the config (provq then adds none)::

    trainer:
      callbacks:
        - class_path: provq_lightning.callbacks.nonfinite.NonFiniteGuard
          init_args: {enabled: false}

or on the command line: ``--trainer.callbacks+=provq_lightning.callbacks.nonfinite.NonFiniteGuard
--trainer.callbacks.enabled=false``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from provq_lightning.errors import ProvqError
from provq_lightning.tokenizer import VQTokenizer

TRAIN_PREFIX = "train/"
MAX_NAMED = 4  # terms listed in the error; the line stays short when everything is NaN


class NonFiniteError(ProvqError):
    """A loss or a weight became NaN/inf; the message names where and the checkpoint to use.

    ``step``: the global step the message names (the step whose loss was not finite; the
    trainer's counter is one further once its optimizer stepped), for ``metrics.json``.
    """

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


def _fmt(value: torch.Tensor) -> str:
    """``nan``/``inf``/``-inf`` for a scalar; the first non-finite element otherwise."""
    flat = value.detach().reshape(-1)
    bad = flat[~torch.isfinite(flat)]
    return str(float(bad[0])) if bad.numel() else "finite"


def _floating_tensors(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every floating-point tensor in nested dicts/lists, with a dotted name."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _floating_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _floating_tensors(value, f"{prefix}.{i}" if prefix else str(i))


def _finite_flag(tensors: list[torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """1 when every tensor is finite, else 0, computed on ``device`` without a host sync."""
    flags = [torch.isfinite(t.detach()).all().to(device) for t in tensors]
    if not flags:
        return torch.ones((), dtype=torch.int32, device=device)
    return torch.stack(flags).all().to(torch.int32)


def _all_finite(tensors: list[torch.Tensor], device: torch.device | str) -> bool:
    """One sync for any number of tensors."""
    return bool(_finite_flag(tensors, device))


def _all_ranks_finite(tensors: list[torch.Tensor], device: torch.device) -> bool:
    """Like ``_all_finite`` but False on every rank when any rank sees a non-finite value.

    Under DDP all ranks must stop at the same step: a rank that raised alone would leave the
    others waiting in the next gradient all-reduce until the collective times out.
    """
    flag = _finite_flag(tensors, device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag)  # the step's one host sync


def _phase_name(pl_module: LightningModule) -> str:
    return pl_module.phase.name.lower() if isinstance(pl_module, VQTokenizer) else "n/a"


class NonFiniteGuard(Callback):
    """Raise ``NonFiniteError`` at the first non-finite loss term or checkpointed weight.

    ``enabled: false`` turns every check off (listed in a config, it also stops provq-fit from
    adding its default guard).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._backward_losses: list[torch.Tensor] = []
        self._batch_step = 0
        self._batch_phase = "n/a"
        self._resumed: tuple[str, int] | None = None
        self._previous: dict[str, torch.Tensor] = {}

    # -- bookkeeping ------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A resumed run's last good checkpoint, until it writes one of its own.
        path = trainer.ckpt_path
        self._resumed = (str(path), trainer.global_step) if path else None

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Step and phase the batch trains at: by batch end the step counter has moved on.
        self._backward_losses = []
        self._batch_step = trainer.global_step
        self._batch_phase = _phase_name(pl_module)

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor
    ) -> None:
        # Manual optimization only: with automatic optimization the backward loss is the
        # training_step output, checked anyway. Checked at batch end: no sync here.
        if self.enabled and not pl_module.automatic_optimization:
            self._backward_losses.append(loss.detach())

    # -- the per-step check -----------------------------------------------------------------
    def _fresh_logged(self, trainer: Trainer) -> list[tuple[str, torch.Tensor]]:
        """The ``train/`` values logged in this step, not those left from an earlier step.

        ``callback_metrics`` keeps a term's last value until it is logged again; the previous
        step's tensors are held here, so an identity test tells the new ones apart.
        """
        logged = {
            name: value
            for name, value in trainer.callback_metrics.items()
            if name.startswith(TRAIN_PREFIX) and isinstance(value, torch.Tensor)
        }
        fresh = [(n, v) for n, v in logged.items() if self._previous.get(n) is not v]
        self._previous = logged
        # The total last, so the error leads with the term that broke it.
        return sorted(fresh, key=lambda item: item[0] == f"{TRAIN_PREFIX}loss")

    @staticmethod
    def _outputs(outputs: Any, backward_losses: list[torch.Tensor]) -> list[tuple[str, Any]]:
        """The ``training_step`` output's tensors, then the losses given to backward."""
        terms: list[tuple[str, torch.Tensor]] = []
        if isinstance(outputs, torch.Tensor):
            terms.append(("loss", outputs))
        elif isinstance(outputs, dict):
            terms.extend(
                (str(key), value)
                for key, value in outputs.items()
                if isinstance(value, torch.Tensor) and value.is_floating_point()
            )
        terms.extend((f"backward #{i + 1}", loss) for i, loss in enumerate(backward_losses))
        return terms

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Runs before ModelCheckpoint's hook (Lightning orders checkpoint callbacks last), so a
        # step whose loss is NaN never reaches its save.
        losses, self._backward_losses = self._backward_losses, []
        if not self.enabled:
            return
        logged = self._fresh_logged(trainer)
        terms = logged + self._outputs(outputs, losses)
        if _all_ranks_finite([value for _, value in terms], pl_module.device):
            return
        # The failure path: syncing once per term is fine here.
        bad = [f"{name}={_fmt(value)}" for name, value in terms if not _all_finite([value], "cpu")]
        named = ", ".join(bad[:MAX_NAMED]) or f"on another rank than {trainer.global_rank}"
        if len(bad) > MAX_NAMED:
            named += f" (+{len(bad) - MAX_NAMED} more)"
        hint = ""
        if not logged:
            hint = (
                " (no train/ terms logged at this step: --trainer.log_every_n_steps 1 names them)"
            )
        raise NonFiniteError(
            f"non-finite loss at step {self._batch_step} (curriculum phase {self._batch_phase}): "
            f"{named}{hint}; {self._advice(trainer)}",
            step=self._batch_step,
        )

    # -- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self.enabled:
            return
        tensors = list(_floating_tensors(checkpoint.get("state_dict", {}), ""))
        tensors += list(_floating_tensors(checkpoint.get("optimizer_states", []), "optimizer"))
        if _all_finite([t for _, t in tensors], pl_module.device):
            return
        name, value = next((n, t) for n, t in tensors if not _all_finite([t], "cpu"))
        raise NonFiniteError(
            f"refusing to write a checkpoint at step {trainer.global_step} (curriculum phase "
            f"{_phase_name(pl_module)}): {name} holds {_fmt(value)}; {self._advice(trainer)}",
            step=trainer.global_step,
        )

    def last_good_checkpoint(self, trainer: Trainer) -> tuple[str, int] | None:
        """(path, step) of the newest checkpoint this run wrote or resumed from, if it exists."""
        found: list[tuple[int, str]] = []
        for cb in trainer.checkpoint_callbacks:
            # Set only after a save went through, so a save refused above never counts.
            path = getattr(cb, "_last_checkpoint_saved", "") or ""
            if path:
                found.append((int(getattr(cb, "_last_global_step_saved", 0)), path))
        if self._resumed is not None:
            found.append((self._resumed[1], self._resumed[0]))
        found = [(step, path) for step, path in found if os.path.isfile(path)]
        if not found:
            return None
        step, path = max(found)
        return path, step

    def _advice(self, trainer: Trainer) -> str:
        good = self.last_good_checkpoint(trainer)
        where = (
            f"last checkpoint with finite weights: {good[0]} (step {good[1]}); lower the learning "
            "rate or check the data, then resume from it or start over"
            if good is not None
            else "no checkpoint written yet; lower the learning rate or check the data and restart"
        )
        return where + " (NonFiniteGuard enabled: false turns this check off)"
