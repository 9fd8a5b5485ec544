"""``CurriculumCallback``: drives ProVQ's warmup -> k-means seeding -> soft transition -> hard VQ.

Everything it sets is a function of the module's curriculum step (``trainer.global_step`` by
default), and everything it accumulates (the k-means reservoir, the "seeded" flag) is saved in
the checkpoint, so a run killed at any point and resumed follows the uninterrupted trajectory.

The four variants of the paper are configurations of this one callback:

============  ============  ================  ==========
variant       warmup_steps  transition_steps  kmeans_init
============  ============  ================  ==========
vanilla       0             0                 False  (or no callback at all)
deferred      > 0           0                 True
soft          0             > 0               False
provq         > 0           > 0               True
============  ============  ================  ==========
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from provq_lightning.errors import ProvqError
from provq_lightning.reporting.curriculum_tags import log_phase_legend, route_warmup_validation
from provq_lightning.schedules import SCHEDULES, Phase, alpha_at, omega, phase_at
from provq_lightning.tokenizer import VQTokenizer
from provq_lightning.vq import distributed
from provq_lightning.vq.kmeans import kmeans

# The settings that shape a run's trajectory: saved in every checkpoint, fixed for the run.
TRAJECTORY_SETTINGS = (
    "warmup_steps",
    "transition_steps",
    "schedule",
    "lam",
    "kmeans_init",
    "kmeans_samples",
    "kmeans_collect_batches",
    "kmeans_iters",
    "kmeans_seed",
)


class CurriculumError(ProvqError, ValueError):
    """A curriculum setting that cannot work, found at construction, setup or resume."""


def _bad(key: str, value: Any, allowed: str) -> CurriculumError:
    return CurriculumError(f"CurriculumCallback {key}: {value!r} is not allowed; {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_settings(
    *,
    warmup_steps: int,
    transition_steps: int,
    schedule: str,
    lam: float,
    kmeans_init: bool,
    kmeans_samples: int | None,
    kmeans_collect_batches: int,
    kmeans_iters: int,
) -> None:
    """Raise one ``CurriculumError`` line (key, value, allowed range) for the first bad setting."""
    for key, value in (("warmup_steps", warmup_steps), ("transition_steps", transition_steps)):
        if not _is_int(value) or value < 0:
            raise _bad(key, value, "use an integer >= 0 (steps)")
    if schedule not in SCHEDULES:
        raise _bad("schedule", schedule, f"choose one of {', '.join(SCHEDULES)}")
    if not isinstance(lam, (int, float)) or not 0.0 <= float(lam) <= 1.0:
        raise _bad("lam", lam, "use a number in [0, 1] (the paper uses 0.5)")
    if kmeans_init and warmup_steps == 0:
        raise _bad(
            "kmeans_init",
            kmeans_init,
            "k-means runs on warmup encoder outputs, so it needs warmup_steps > 0; set "
            "kmeans_init: false for the vanilla and soft-only variants",
        )
    if kmeans_samples is not None and (not _is_int(kmeans_samples) or kmeans_samples < 1):
        raise _bad(
            "kmeans_samples",
            kmeans_samples,
            "use a positive count of vectors (at least num_codes), or leave it unset for "
            "16 x num_codes",
        )
    if not _is_int(kmeans_collect_batches) or kmeans_collect_batches < 1:
        raise _bad("kmeans_collect_batches", kmeans_collect_batches, "use an integer >= 1")
    if not _is_int(kmeans_iters) or kmeans_iters < 1:
        raise _bad("kmeans_iters", kmeans_iters, "use an integer >= 1 (Lloyd iterations)")


class CurriculumCallback(Callback):
    """Set alpha/omega/phase every training step and seed the codebook once by k-means.

    Args:
        warmup_steps: steps of continuous-autoencoder training (quantizer bypassed).
        transition_steps: steps of the soft transition after warmup.
        schedule: alpha ramp during the transition: ``cosine``, ``linear``, ``exponential`` or
            ``hard``.
        lam: lambda in ``omega = lam + (1 - lam) * (1 - alpha)``, the VQ-loss weight floor.
        kmeans_init: seed the codebook by k-means on encoder outputs at the end of warmup.
        kmeans_samples: reservoir size (vectors, gathered across ranks); default 16 x K.
        kmeans_collect_batches: the last this many warmup batches feed the reservoir.
        kmeans_iters: maximum Lloyd iterations.
        kmeans_seed: seed of the reservoir sampling and of k-means++.
    """

    def __init__(
        self,
        warmup_steps: int = 0,
        transition_steps: int = 0,
        schedule: str = "cosine",
        lam: float = 0.5,
        kmeans_init: bool = True,
        kmeans_samples: int | None = None,
        kmeans_collect_batches: int = 8,
        kmeans_iters: int = 100,
        kmeans_seed: int = 0,
    ) -> None:
        check_settings(
            warmup_steps=warmup_steps,
            transition_steps=transition_steps,
            schedule=schedule,
            lam=lam,
            kmeans_init=kmeans_init,
            kmeans_samples=kmeans_samples,
            kmeans_collect_batches=kmeans_collect_batches,
            kmeans_iters=kmeans_iters,
        )
        self.warmup_steps = warmup_steps
        self.transition_steps = transition_steps
        self.schedule = schedule
        self.lam = lam
        self.kmeans_init = kmeans_init
        self.kmeans_samples = kmeans_samples
        self.kmeans_collect_batches = kmeans_collect_batches
        self.kmeans_iters = kmeans_iters
        self.kmeans_seed = kmeans_seed
        # State saved in checkpoints.
        self.seeded = False
        self.seed_count = 0
        self.seeded_at_step: int | None = None
        self.reservoir: torch.Tensor | None = None
        self.reservoir_keys: torch.Tensor | None = None
        self.reservoir_batches = 0
        self._batch_step = 0
        self._reservoir_checked = False
        self._seeding = kmeans_init  # setup() turns it off for a loaded codebook
        # Warmup encoder outputs of the current batch, caught by a forward hook on the quantizer.
        self._latents: list[torch.Tensor] = []
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    # -- pure views of the schedule ---------------------------------------------------------
    def values_at(self, step: int) -> tuple[float, float, Phase]:
        """(alpha, omega, phase) at a curriculum step."""
        phase = phase_at(step, self.warmup_steps, self.transition_steps)
        alpha = alpha_at(step, self.warmup_steps, self.transition_steps, self.schedule)
        return alpha, omega(alpha, self.lam), phase

    def _collecting(self, step: int) -> bool:
        return (
            self._seeding
            and not self.seeded
            and self.warmup_steps - self.kmeans_collect_batches <= step < self.warmup_steps
        )

    # -- hooks ------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(pl_module, VQTokenizer):
            raise TypeError(
                f"CurriculumCallback drives a provq VQTokenizer; got {type(pl_module).__name__}"
            )
        # The model's loaded codebook is kept: seeding over it would discard what was loaded.
        # A decision of this run, not a setting, so checkpoints keep kmeans_init as configured.
        self._seeding = self.kmeans_init and not pl_module.codebook_loaded
        if self.kmeans_init and not self._seeding:
            rank_zero_info(
                "[provq] the model's codebook was loaded from a file, so the curriculum's "
                "k-means seeding is off"
            )
        num_codes = pl_module.quantizer.num_codes
        if self._seeding and self.kmeans_samples is not None and self.kmeans_samples < num_codes:
            raise _bad(
                "kmeans_samples",
                self.kmeans_samples,
                f"k-means needs at least num_codes={num_codes} vectors; raise kmeans_samples to "
                f">= {num_codes} or leave it unset for 16 x num_codes = {16 * num_codes}",
            )
        if self.warmup_steps > 0:
            # Warmup validations (a codebook not yet seeded) get their own curves: val_warmup/.
            for logger in trainer.loggers:
                route_warmup_validation(logger, pl_module.validating_in_warmup)
        strategy = trainer.strategy
        if (
            self.warmup_steps > 0
            and isinstance(strategy, DDPStrategy)
            and not strategy._ddp_kwargs.get("find_unused_parameters", False)
            and type(pl_module).quantize is not VQTokenizer.quantize
        ):
            # VQTokenizer.quantize gives the bypassed codebook a zero-weight term, so plain DDP
            # sees it used; an overriding quantize may not, and plain DDP would then stop at the
            # first warmup step with an opaque "expected to have finished reduction" error.
            raise ValueError(
                f"warmup_steps={self.warmup_steps}: {type(pl_module).__name__} overrides "
                "VQTokenizer.quantize, so its bypassed quantizer may get no gradient in warmup, "
                "which plain DDP does not allow; set `trainer.strategy: "
                "ddp_find_unused_parameters_true` in the config"
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # curriculum/phase is logged as a number: say once what its values mean.
        if trainer.is_global_zero:
            log_phase_legend(trainer.loggers, trainer.global_step)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: VQTokenizer, batch: Any, batch_idx: int
    ) -> None:
        step = pl_module.curriculum_step()
        self._batch_step = step
        alpha, omega_now, phase = self.values_at(step)
        if phase is not Phase.WARMUP and self._seeding and not self.seeded:
            self._seed_codebook(trainer, pl_module, step)
        pl_module.set_curriculum(alpha, omega_now, phase)
        if phase is Phase.WARMUP and self._seeding and not self.seeded:
            self._hook = pl_module.quantizer.register_forward_hook(
                self._catch_latents, with_kwargs=True
            )
        pl_module.log_train(
            {
                "curriculum/alpha": alpha,
                "curriculum/omega": omega_now,
                "curriculum/phase": float(phase),
            },
            batch_size=1,
        )

    def _catch_latents(
        self, quantizer: torch.nn.Module, args: tuple, kwargs: dict, out: Any
    ) -> None:
        """Forward hook: keep the (masked) encoder outputs of a bypassed training forward."""
        call = inspect.signature(quantizer.forward).bind(*args, **kwargs).arguments
        if not call.get("bypass", False):
            return
        flat = out.z_tilde.detach().reshape(-1, quantizer.code_dim)
        mask = call.get("mask")
        if mask is not None:
            flat = flat[mask.reshape(-1).bool()]
        self._latents.append(flat)

    def _release_hook(self) -> list[torch.Tensor]:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        latents, self._latents = self._latents, []
        return latents

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: VQTokenizer, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        caught = self._release_hook()
        step = self._batch_step  # the counter may already have advanced past this batch
        if not caught:
            return
        latents = torch.cat(caught) if len(caught) > 1 else caught[0]
        if not self._reservoir_checked:
            self._check_reservoir_fills(latents, pl_module, step)
        if not self._collecting(step):
            return
        self._add_to_reservoir(distributed.gather_rows(latents.float()), pl_module)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._release_hook()

    def _check_reservoir_fills(
        self, latents: torch.Tensor, pl_module: VQTokenizer, step: int
    ) -> None:
        """On the first warmup batch: will the collection window gather K vectors at all?"""
        self._reservoir_checked = True
        rows = torch.tensor([float(latents.shape[0])], device=latents.device)
        if distributed.is_distributed():
            torch.distributed.all_reduce(rows)
        # A step of a model that accumulates gradients feeds the reservoir that many batches.
        per_batch = int(rows.item()) * pl_module.batches_per_step
        batches = min(self.kmeans_collect_batches, self.warmup_steps)
        k = pl_module.quantizer.num_codes
        if per_batch * batches >= k:
            return
        need = -(-k // max(per_batch, 1))
        raise CurriculumError(
            f"CurriculumCallback at step {step}: k-means seeding needs at least num_codes={k} "
            f"encoder vectors, but the last {batches} warmup batches give only {per_batch} x "
            f"{batches} = {per_batch * batches} (batch size x latents per sample x ranks); raise "
            f"kmeans_collect_batches to >= {need}"
            + (
                f" (and warmup_steps with it, now {self.warmup_steps})"
                if need > self.warmup_steps
                else ""
            )
            + ", raise the batch size, or use fewer codes"
        )

    # -- reservoir and seeding ------------------------------------------------------------
    def _capacity(self, pl_module: VQTokenizer) -> int:
        return self.kmeans_samples or 16 * pl_module.quantizer.num_codes

    def _add_to_reservoir(self, rows: torch.Tensor, pl_module: VQTokenizer) -> None:
        # Bottom-k sampling: every vector gets a random key, the reservoir keeps the smallest
        # keys. That is a uniform sample of everything seen, identical on all ranks because the
        # rows are gathered first and the keys come from a generator seeded by a saved counter.
        generator = torch.Generator().manual_seed(
            self.kmeans_seed * 1_000_003 + self.reservoir_batches
        )
        self.reservoir_batches += 1
        keys = torch.rand(rows.shape[0], generator=generator, dtype=torch.float64)
        rows = rows.detach().cpu()
        if self.reservoir is not None:
            rows = torch.cat([self.reservoir, rows])
            keys = torch.cat([self.reservoir_keys, keys])
        capacity = self._capacity(pl_module)
        if rows.shape[0] > capacity:
            keep = keys.topk(capacity, largest=False).indices.sort().values
            rows, keys = rows[keep], keys[keep]
        self.reservoir, self.reservoir_keys = rows, keys

    def _seed_codebook(self, trainer: Trainer, pl_module: VQTokenizer, step: int) -> None:
        k = pl_module.quantizer.num_codes
        if self.reservoir is None:
            raise RuntimeError(
                f"k-means seeding at step {step} found no encoder outputs: the reservoir is "
                f"filled during the last {self.kmeans_collect_batches} warmup steps (before "
                f"step {self.warmup_steps}). Was the run resumed from a checkpoint written "
                "without this callback? Start it again, or set kmeans_init: false."
            )
        bad_rows = int((~torch.isfinite(self.reservoir).all(dim=1)).sum())
        if bad_rows:
            raise ProvqError(
                f"k-means seeding at step {step}: {bad_rows} of {self.reservoir.shape[0]} "
                "collected encoder outputs are NaN or infinite (the warmup diverged); the "
                "codebook is not seeded from them: lower the learning rate and start again"
            )
        if self.reservoir.shape[0] < k:
            raise ProvqError(
                f"k-means seeding needs at least {k} vectors for {k} codes but collected "
                f"{self.reservoir.shape[0]}; raise kmeans_collect_batches (now "
                f"{self.kmeans_collect_batches}) or the batch size, or use fewer codes"
            )
        device = pl_module.device
        centers = torch.empty(k, pl_module.quantizer.code_dim, device=device)
        if distributed.rank() == 0:
            started = time.perf_counter()
            result = kmeans(
                self.reservoir.to(device), k, iters=self.kmeans_iters, seed=self.kmeans_seed
            )
            centers = result.centers.to(device)
            rank_zero_info(
                f"[provq] step {step}: seeded {k} codes by k-means on "
                f"{self.reservoir.shape[0]} vectors in {time.perf_counter() - started:.1f}s "
                f"({result.iterations} iterations, inertia {result.inertia:.4g}, "
                f"{result.reseeded} empty clusters re-seeded)"
            )
            distinct = int(torch.unique(self.reservoir, dim=0).shape[0])
            if distinct < k:
                # Not an error (training can still spread the codes), but the user should know.
                rank_zero_warn(
                    f"k-means seeding at step {step}: the reservoir holds only {distinct} distinct "
                    f"encoder outputs for num_codes={k}, so {k - distinct} codes start as "
                    "duplicates; the data has fewer distinct latents than codes (use fewer codes "
                    "or more data)"
                )
        centers = distributed.broadcast_tensor(centers, src=0)
        pl_module.quantizer.set_codebook(centers)
        self.seeded = True
        self.seed_count += 1
        self.seeded_at_step = step
        self.reservoir = self.reservoir_keys = None

    # -- checkpointing ----------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The settings that shape the trajectory; a resumed run must use the same."""
        return {key: getattr(self, key) for key in TRAJECTORY_SETTINGS}

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings(),
            "seeded": self.seeded,
            "seed_count": self.seed_count,
            "seeded_at_step": self.seeded_at_step,
            "reservoir": self.reservoir,
            "reservoir_keys": self.reservoir_keys,
            "reservoir_batches": self.reservoir_batches,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Older checkpoints arrive upgraded (provq_lightning.runs.migrations); a setting added
        # since one was written is not in its record, so it is not compared.
        saved = state_dict["settings"]
        changed = [
            f"{key} {saved[key]!r} -> {value!r}"
            for key, value in self.settings().items()
            if key in saved and saved[key] != value
        ]
        if changed:
            raise CurriculumError(
                "the checkpoint was trained with other curriculum settings ("
                + ", ".join(changed)
                + "); a run's curriculum is fixed: resume with the run's own settings, or "
                "start a new run (no --ckpt_path, or another logger version)"
            )
        self.seeded = bool(state_dict["seeded"])
        self.seed_count = int(state_dict["seed_count"])
        self.seeded_at_step = state_dict["seeded_at_step"]
        self.reservoir = state_dict["reservoir"]
        self.reservoir_keys = state_dict["reservoir_keys"]
        self.reservoir_batches = int(state_dict["reservoir_batches"])
