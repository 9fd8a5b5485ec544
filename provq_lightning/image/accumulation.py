"""Gradient accumulation for a ``LightningModule`` that steps its own optimizers.

Lightning refuses ``Trainer(accumulate_grad_batches=...)`` under manual optimization, so
``GradientAccumulation`` does what Lightning does in automatic mode: each batch's loss is
divided by N, DDP's all-reduce waits for the window's last backward (it then reduces the
accumulated ``.grad``), and a window closes every N-th batch of the epoch and at the epoch's
last batch, even if short. It keeps the members ``VQTokenizer`` declares for callbacks:
``batches_per_step`` is N, and ``grads_pending`` is True inside a window (a checkpoint then
would lose gradients: the preemption callback waits); there Lightning's ``zero_grad`` before
validation is skipped.

What counts optimizer steps: Lightning's ``global_step`` counts ``LightningOptimizer.step``
calls (the image tokenizer steps its discriminator's optimizer raw, so generator steps), and so
do ``max_steps``, checkpoint intervals, the curriculum, ``disc_start`` and the EMA, as LlamaGen
counts iterations. Lightning's ``val_check_interval``, ``log_every_n_steps`` and the x-axis of
logged scalars still count batches.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def check_accumulate_grad_batches(value: object) -> None:
    """Refuse anything but an integer >= 1 (a bool is not one)."""
    if isinstance(value, bool) or not (isinstance(value, int) and value >= 1):
        raise ValueError(f"model.init_args.accumulate_grad_batches: {value!r} is not allowed; "
                         "use an integer >= 1 (batches per optimizer step)")


class GradientAccumulation:
    """Mixin for a ``VQTokenizer`` with ``automatic_optimization = False`` that accumulates
    ``batches_per_step`` (N) batches per optimizer step (its ``__init__`` sets N)."""

    def on_validation_model_zero_grad(self) -> None:
        # Lightning clears gradients before validation; inside a window they are still needed.
        if not self.grads_pending:
            super().on_validation_model_zero_grad()

    def backward_in_window(self, loss: torch.Tensor, batch_idx: int) -> bool:
        """Backward of ``loss / N``; True when this batch closes its window (step now)."""
        accumulate = self.batches_per_step
        trainer = self.trainer
        ends = (
            accumulate == 1
            or (batch_idx + 1) % accumulate == 0
            or batch_idx + 1 == trainer.num_training_batches
            or trainer.is_last_batch
        )
        block = getattr(trainer.strategy, "block_backward_sync", None)
        with nullcontext() if ends or block is None else block():
            self.manual_backward(loss / accumulate)
        self.grads_pending = not ends
        return ends
