"""``VQTokenizer``: the contract every modality implements, and the curriculum state it carries.

A modality subclasses ``VQTokenizer``, builds its encoder/decoder and losses, passes its
``VectorQuantizer`` to ``super().__init__`` and calls ``self.quantize(z)`` between them. It must
implement the members named in ``CONTRACT`` (``missing_contract`` lists what a class lacks;
``tests/core/test_contract.py`` checks every shipped modality).

Where the curriculum lives (``docs/architecture.md``): the schedules are pure functions
(``schedules.py``); the ``CurriculumCallback`` owns the k-means reservoir and the "seeded" flag
and pushes alpha/omega/phase here before every training batch; this module owns those values
(buffers, so checkpoints carry them), ``quantization_start`` and the ``on_quantization_start``
hook. Nothing else holds curriculum state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchmetrics import Metric

from provq_lightning.reporting.curriculum_tags import VAL_WARMUP
from provq_lightning.reporting.figures import log_histogram
from provq_lightning.runs.migrations import mark_format, upgrade_checkpoint
from provq_lightning.schedules import Phase
from provq_lightning.vq.codebook_metrics import CodebookUsage, mean_pairwise_distance
from provq_lightning.vq.quantizer import QuantizerOutput, VectorQuantizer

# What a modality must implement (beyond the quantizer handed to ``VQTokenizer.__init__``):
# training, evaluation, and the hooks provq-tokenize, provq-decode and provq-fit predict call.
CONTRACT = (
    "training_step",  # (batch, batch_idx) -> loss: recon + self.omega * quantizer loss
    "validation_step",  # (batch, batch_idx): update metrics, always hard quantization
    "configure_optimizers",
    "encode_codes",  # (inputs) -> int64 code ids, hard, no grad
    "decode_codes",  # (code ids) -> the modality's output (images, backbones, points)
    "tokenize_batch",  # (batch) -> [(key, int64 codes)] per item
    "decode_tokens_to_file",  # (key, codes, out_dir) -> path of the written file
)

SPLITS = ("val", "test")


def missing_contract(cls: type) -> list[str]:
    """The ``CONTRACT`` members ``cls`` does not implement (inherits from a base unchanged)."""
    missing = []
    for name in CONTRACT:
        member = getattr(cls, name, None)
        if not callable(member) or member is getattr(VQTokenizer, name, None) or (
            member is getattr(LightningModule, name, None)
        ):
            missing.append(name)
    return missing


def zero_weight_term(module: torch.nn.Module) -> torch.Tensor:
    """0 x the sum of ``module``'s trainable parameters: a zero gradient for each, so that DDP
    without ``find_unused_parameters`` sees an idle module (bypassed codebook, waiting
    discriminator) used."""
    params = [p.sum() for p in module.parameters() if p.requires_grad]
    return torch.stack(params).sum() * 0.0 if params else torch.zeros(())


class VQTokenizer(LightningModule):
    """Encoder -> ``VectorQuantizer`` -> decoder, with ProVQ's curriculum state.

    Without a ``CurriculumCallback`` the module is plain hard VQ (phase discrete, alpha 0,
    omega 1), i.e. the vanilla baseline.

    Args:
        quantizer: the modality's codebook; built by the subclass (after its encoder, so the
            random initialisation order is the modality's own).
        modules_before_quantizer: modules (name -> module) to register ahead of the quantizer.

    What provq's callbacks read of a model is declared here, so a modality sets it by these
    names (a callback given another ``LightningModule`` reads none of it): ``quantizer``,
    ``phase``, ``curriculum_step()``, ``set_curriculum()``, ``log_train()``, ``grads_pending``
    and ``batches_per_step``. A modality that overrides ``on_save_checkpoint`` or
    ``on_load_checkpoint`` calls ``super()``: checkpoint formats are kept there.
    """

    quantizer: VectorQuantizer  # the codebook: the curriculum seeds it, predict writes its codes

    grads_pending: bool = False
    """True inside a gradient-accumulation window (after a batch's backward, before the window's
    optimizer step): a checkpoint now would lose those gradients, so ``PreemptionCheckpoint``
    waits for the window's end. A modality that accumulates by hand keeps it up to date."""

    codebook_loaded: bool = False
    """True when the codebook came from a file (ESM3, StructTokenBench, ...): the
    ``CurriculumCallback`` then keeps it and skips its k-means seeding."""

    batches_per_step: int = 1
    """Training batches per optimizer step (a modality that accumulates gradients by hand sets
    it): the ``CurriculumCallback`` counts what one step feeds the k-means reservoir by it."""

    def __init__(
        self,
        quantizer: VectorQuantizer,
        modules_before_quantizer: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        # Registered first, in order: a modality keeps the parameter order of its earlier
        # releases, since an optimizer state in a checkpoint maps to parameters by position.
        for name, module in (modules_before_quantizer or {}).items():
            self.add_module(name, module)
        self.quantizer = quantizer
        self.codebook_usage = CodebookUsage(quantizer.num_codes)
        self.register_buffer("curriculum_alpha", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("curriculum_omega", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("curriculum_phase", torch.tensor(int(Phase.DISCRETE)))
        # First step that quantized (-1 = not yet); a buffer, so resumed runs keep it.
        self.register_buffer("quantization_start", torch.tensor(-1, dtype=torch.long))
        self.split_metrics = nn.ModuleDict()

    # -- curriculum -------------------------------------------------------------------------
    def set_curriculum(self, alpha: float, omega: float, phase: Phase) -> None:
        """Called by the ``CurriculumCallback`` before every training batch."""
        self.curriculum_alpha.fill_(alpha)
        self.curriculum_omega.fill_(omega)
        self.curriculum_phase.fill_(int(phase))

    @property
    def phase(self) -> Phase:
        """The curriculum phase of this training batch (``NonFiniteGuard`` names it)."""
        return Phase(int(self.curriculum_phase))

    @property
    def omega(self) -> float:
        """The weight of ``QuantizerOutput.loss`` in the total loss."""
        return float(self.curriculum_omega)

    def curriculum_step(self) -> int:
        """The step the schedules are evaluated at: optimizer steps (``global_step``)."""
        return self.trainer.global_step

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning calls callbacks' hooks first, so the phase here is this batch's.
        if self.phase is not Phase.WARMUP and int(self.quantization_start) < 0:
            step = self.curriculum_step()
            self.quantization_start.fill_(step)
            self.on_quantization_start(step)

    def on_quantization_start(self, step: int) -> None:
        """Called once per run, before the first training batch that quantizes (after k-means
        seeding, when the curriculum seeds); a modality restarts what depends on the codebook."""

    def quantize(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantize per the curriculum: bypass in warmup, mix in transition, hard otherwise.

        Evaluation (``self.training`` False) always quantizes hard, whatever the phase.
        """
        if not self.training:
            return self.quantizer(z, alpha=0.0, mask=mask)
        phase = self.phase
        if phase is Phase.WARMUP:
            out = self.quantizer(z, mask=mask, bypass=True)
            # The bypassed codebook gets a zero-weight term, so plain DDP (no
            # find_unused_parameters) sees it used; on_before_optimizer_step drops its zeros.
            out.loss = out.loss + zero_weight_term(self.quantizer)
            return out
        alpha = float(self.curriculum_alpha) if phase is Phase.TRANSITION else 0.0
        return self.quantizer(z, alpha=alpha, mask=mask)

    # -- checkpoints: their format, and the upgrade of older ones (runs/migrations.py) -----------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        mark_format(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Called before Lightning restores weights, datamodule and callbacks from the dict, so
        # each of them reads it in this provq's format.
        trainer = self._trainer
        upgrade_checkpoint(checkpoint, trainer.ckpt_path if trainer is not None else None)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The warmup's zero-weight codebook term (see quantize) exists for DDP's bookkeeping
        # only: without a gradient the optimizer skips the codebook, as before that term (no
        # weight decay, no Adam step count).
        if self.training and self.phase is Phase.WARMUP:
            for param in self.quantizer.parameters():
                param.grad = None

    # -- shared pieces ------------------------------------------------------------------------
    def should_log_step(self) -> bool:
        """True on the steps Lightning writes to the logger; skips per-step logging cost."""
        # Lightning's own decision (what `self.log(on_step=True)` obeys); a private attribute,
        # so tests/core/test_lightning_private.py fails loudly if a Lightning release drops it.
        return self.trainer._logger_connector.should_update_logs

    def validating_in_warmup(self) -> bool:
        """A validation inside a fit while the curriculum is in warmup: hard quantization with a
        codebook not yet seeded, whose metrics the loggers get under ``val_warmup/``
        (``reporting.curriculum_tags``)."""
        trainer = self._trainer
        return (
            trainer is not None
            and trainer.validating
            and trainer.state.fn == TrainerFn.FITTING
            and self.phase is Phase.WARMUP
        )

    def log_train(self, values: dict[str, torch.Tensor], batch_size: int) -> None:
        """Per-step training scalars, on the steps Lightning logs."""
        if self.should_log_step():
            revival = self.quantizer.revival
            if revival is not None:
                # Cumulative, so a curve shows when codes died and were moved.
                values = {**values, "train/revived_codes": revival.revived_total.float()}
            self.log_dict(values, on_step=True, on_epoch=False, batch_size=batch_size)

    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Evaluation mode for a tokenize/decode call, restoring the previous mode after."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def figures_due(self, count: int = 1, every_n_steps: int = 1) -> bool:
        """Whether this process draws figures now: ``count`` pictures wanted (> 0), a step that
        is a multiple of ``every_n_steps`` (> 0), rank 0, a logger to receive them (PNGs for
        loggers without images, see ``reporting.figures``), not Lightning's sanity check."""
        trainer = self._trainer  # the public property raises without a trainer
        return (
            count > 0
            and every_n_steps > 0
            and trainer is not None
            and trainer.global_step % every_n_steps == 0
            and trainer.is_global_zero
            and not trainer.sanity_checking
            and len(trainer.loggers) > 0
        )

    def add_split_metrics(self, factory: Callable[[], dict[str, Metric]]) -> None:
        """One set of metrics per evaluation split (``val``, ``test``), logged as
        ``<split>/<name>`` and reset at the end of each evaluation epoch."""
        self.split_metrics = nn.ModuleDict({s: nn.ModuleDict(factory()) for s in SPLITS})

    def _log_split_metrics(self, prefix: str) -> None:
        metrics = self.split_metrics[prefix] if prefix in self.split_metrics else {}
        for name, metric in metrics.items():
            if metric.update_called:
                self.log(f"{prefix}/{name}", metric.compute())
            metric.reset()

    # -- codebook metrics -------------------------------------------------------------------
    def update_codebook_metrics(
        self, indices: torch.Tensor, mask: torch.Tensor | None = None
    ) -> None:
        """Add one evaluation batch's code ids to the set-wide histogram."""
        self.codebook_usage.update(indices, mask)

    @torch.no_grad()
    def codebook_metrics(self, prefix: str = "val") -> dict[str, torch.Tensor]:
        """Usage statistics of the accumulated (rank-reduced) histogram plus codebook geometry."""
        stats = dict(self.codebook_usage.compute())
        histogram = stats.pop("histogram")
        codes = self.quantizer.codebook()
        out = {f"{prefix}/{name}": value for name, value in stats.items()}
        out[f"{prefix}/codebook_distance"] = mean_pairwise_distance(codes)
        out[f"{prefix}/codebook_distance_used"] = mean_pairwise_distance(codes, histogram > 0)
        return out

    def _log_codebook_metrics(self, prefix: str) -> None:
        # Every rank updates in each eval step, so all ranks take part in the reduction.
        if not self.codebook_usage.update_called:
            return
        self.log_dict(self.codebook_metrics(prefix), sync_dist=False)
        # Uses per code: the shape shows dead and over-used codes at a glance. Computed on every
        # rank (a collective); log_histogram itself logs on rank 0 only, to every logger.
        counts = self.codebook_usage.compute()["histogram"].float().cpu()
        if prefix == "val" and self.validating_in_warmup():
            prefix = VAL_WARMUP
        # Each code's share of the uses (sums to 1, comparable across set sizes), and the counts.
        share = counts / counts.sum().clamp(min=1.0)
        log_histogram(self, f"{prefix}/code_usage", share, ylabel="share of uses")
        log_histogram(self, f"{prefix}/code_use_counts", counts, ylabel="uses")
        self.codebook_usage.reset()

    def on_validation_epoch_start(self) -> None:
        self.codebook_usage.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_split_metrics("val")
        self._log_codebook_metrics("val")

    def on_test_epoch_start(self) -> None:
        self.codebook_usage.reset()

    def on_test_epoch_end(self) -> None:
        self._log_split_metrics("test")
        self._log_codebook_metrics("test")

    def test_step(self, batch: Any, batch_idx: int) -> Any:
        """Testing evaluates as validation does (metrics land under ``test/``)."""
        return self.validation_step(batch, batch_idx)

    @property
    def eval_prefix(self) -> str:
        """``test`` while testing, else ``val``: the split an evaluation step reports to."""
        trainer = self._trainer
        return "test" if trainer is not None and trainer.testing else "val"

    # -- provq-fit predict --------------------------------------------------------------------
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """``(key, codes)`` per item of a batch (the model's ``tokenize_batch``), for
        ``provq_lightning.callbacks.prediction_writer.CodePredictionWriter``."""
        return self.tokenize_batch(batch)

    # -- the contract (see CONTRACT): a modality overrides each ------------------------------
    def encode_codes(self, inputs: Any) -> torch.Tensor:
        """Hard code ids of a batch of model inputs, without gradients."""
        raise NotImplementedError(f"{type(self).__name__} must implement encode_codes")

    def decode_codes(self, codes: torch.Tensor) -> Any:
        """The modality's output decoded from code ids (exact codebook entries)."""
        raise NotImplementedError(f"{type(self).__name__} must implement decode_codes")

    def tokenize_batch(self, batch: Any) -> list[tuple[str, torch.Tensor]]:
        """``(key, int64 code ids)`` per item of a batch."""
        raise NotImplementedError(f"{type(self).__name__} must implement tokenize_batch")

    def decode_tokens_to_file(self, key: str, codes: torch.Tensor, out_dir: Path) -> Path:
        """Decode one item's codes and write them under ``out_dir`` (name: ``safe_file_name``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement decode_tokens_to_file")
