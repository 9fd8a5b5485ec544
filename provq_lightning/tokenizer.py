"""Base LightningModule for every tokenizer: quantizer plumbing and curriculum state.

A modality subclasses ``VQTokenizer``, builds ``self.quantizer`` plus its encoder/decoder and
losses, and calls ``self.quantize(z)`` between them. The ``CurriculumCallback`` drives the state
held here; the state lives in buffers, so checkpoints carry it.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule

from provq_lightning.codebook_metrics import CodebookUsage, mean_pairwise_distance
from provq_lightning.errors import ProvqError
from provq_lightning.image_log import log_histogram
from provq_lightning.quantizer import QuantizerOutput, VectorQuantizer
from provq_lightning.schedules import Phase


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
    """

    quantizer: VectorQuantizer

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("curriculum_alpha", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("curriculum_omega", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("curriculum_phase", torch.tensor(int(Phase.DISCRETE)))
        # Latents of the last training batch in warmup, read by the callback's k-means reservoir.
        self.seeding_latents: torch.Tensor | None = None

    # -- curriculum -------------------------------------------------------------------------
    def set_curriculum(self, alpha: float, omega: float, phase: Phase) -> None:
        self.curriculum_alpha.fill_(alpha)
        self.curriculum_omega.fill_(omega)
        self.curriculum_phase.fill_(int(phase))

    @property
    def phase(self) -> Phase:
        return Phase(int(self.curriculum_phase))

    @property
    def vq_loss_weight(self) -> float:
        """Omega: the weight of ``QuantizerOutput.loss`` in the total loss."""
        return float(self.curriculum_omega)

    def should_log_step(self) -> bool:
        """True on the steps Lightning writes to the logger; skips per-step logging cost."""
        # Lightning's own decision (it is also what `self.log(on_step=True)` obeys).
        return self.trainer._logger_connector.should_update_logs

    def curriculum_step(self) -> int:
        """The step the schedules are evaluated at; must count training batches."""
        return self.trainer.global_step

    def quantize(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantize per the curriculum: bypass in warmup, mix in transition, hard otherwise.

        Evaluation (``self.training`` False) always quantizes hard, whatever the phase.
        """
        if not self.training:
            return self.quantizer(z, alpha=0.0, mask=mask)
        phase = self.phase
        if phase is Phase.WARMUP:
            out = self.quantizer(z, mask=mask, bypass=True)
            flat = out.z_tilde.detach().reshape(-1, self.quantizer.code_dim)
            if mask is not None:
                flat = flat[mask.reshape(-1).bool()]
            self.seeding_latents = flat
            # The bypassed codebook gets a zero-weight term, so plain DDP (no
            # find_unused_parameters) sees it used; on_before_optimizer_step drops its zeros.
            out.loss = out.loss + zero_weight_term(self.quantizer)
            return out
        alpha = float(self.curriculum_alpha) if phase is Phase.TRANSITION else 0.0
        return self.quantizer(z, alpha=alpha, mask=mask)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The warmup's zero-weight codebook term (see quantize) exists for DDP's bookkeeping
        # only: without a gradient the optimizer skips the codebook, as before that term (no
        # weight decay, no Adam step count).
        if self.training and self.phase is Phase.WARMUP:
            for param in self.quantizer.parameters():
                param.grad = None

    # -- codebook metrics -------------------------------------------------------------------
    @property
    def codebook_usage(self) -> CodebookUsage:
        # Built lazily so subclasses need not order their __init__ around the quantizer.
        if "_codebook_usage" not in self._modules:
            self._codebook_usage = CodebookUsage(self.quantizer.num_codes).to(self.device)
        return self._codebook_usage

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
        self._log_usage_histogram(prefix)
        self.codebook_usage.reset()

    def _log_usage_histogram(self, prefix: str) -> None:
        # Uses per code: the shape shows dead and over-used codes at a glance. Computed on every
        # rank (a collective); log_histogram itself logs on rank 0 only, to every logger.
        counts = self.codebook_usage.compute()["histogram"].float().cpu()
        log_histogram(self, f"{prefix}/code_usage", counts)

    def on_validation_epoch_start(self) -> None:
        self.codebook_usage.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_codebook_metrics("val")

    def on_test_epoch_start(self) -> None:
        self.codebook_usage.reset()

    def on_test_epoch_end(self) -> None:
        self._log_codebook_metrics("test")

    # -- provq-fit predict --------------------------------------------------------------------
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """``(key, codes)`` per item of a batch, from the model's ``tokenize_batch`` (the hook
        ``provq-tokenize`` uses), for
        ``provq_lightning.callbacks.prediction_writer.CodePredictionWriter``."""
        tokenize = getattr(self, "tokenize_batch", None)
        if not callable(tokenize):
            raise ProvqError(
                f"{type(self).__name__} has no tokenize_batch(batch) -> [(key, codes)], so "
                "provq-fit predict has nothing to write; implement it (see VQTokenizer)"
            )
        return tokenize(batch)
