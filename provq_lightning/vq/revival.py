"""Dead-code revival: codes that stop being chosen are moved onto latents the codebook fits worst.

A code that no latent picks gets no codebook-loss gradient, so it never moves again: the
codebook's effective size shrinks. Each training step that quantizes, ``CodeRevival`` updates an
exponential moving average of every code's use; a code whose average falls below
``threshold`` x the mean use is replaced by one of the step's latents, drawn with probability
proportional to its squared distance from its code (the k-means++ rule, so new codes go where
the quantization error is), and its average is reset to the mean so it has time to be picked.

Under DDP every rank sees the same counts (summed) and the same candidate latents (gathered),
and draws with the same generator, so the codebooks stay identical without a broadcast.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from provq_lightning.vq import distributed


def dead_codes(usage: torch.Tensor, threshold: float) -> torch.Tensor:
    """Ids of codes whose use average is below ``threshold`` x the mean use."""
    return torch.nonzero(usage < threshold * usage.mean()).flatten()


def draw_replacements(
    latents: torch.Tensor, sq_error: torch.Tensor, count: int, generator: torch.Generator
) -> torch.Tensor:
    """``count`` rows of ``latents`` drawn without replacement, probability ~ ``sq_error``
    (uniform when every error is zero); fewer rows when there are fewer latents."""
    count = min(count, latents.shape[0])
    weights = sq_error.double().clamp_min(0.0)
    if not bool(weights.sum() > 0):
        weights = torch.ones_like(weights)
    # Zero-weight rows can still fill the draw once the positive ones are used up.
    weights = weights + weights.max() * 1e-6
    rows = torch.multinomial(weights.cpu(), count, replacement=False, generator=generator)
    return latents[rows.to(latents.device)]


class CodeRevival(nn.Module):
    """Use averages of ``num_codes`` codes and the revival rule (see the module docstring).

    Args:
        num_codes: K.
        threshold: a code is dead below this fraction of the mean use average (0 < t < 1).
        decay: per-step decay of the use average (0.99: about a 100-step memory).
        seed: seed of the replacement draws (the step count is added, so resumes repeat them).
    """

    def __init__(self, num_codes: int, threshold: float, decay: float = 0.99, seed: int = 0):
        super().__init__()
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"dead_code_threshold must be in (0, 1), got {threshold}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"dead_code_decay must be in (0, 1), got {decay}")
        self.threshold = threshold
        self.decay = decay
        self.seed = seed
        # Checkpointed, so a resumed run revives exactly as the uninterrupted one.
        self.register_buffer("usage", torch.zeros(num_codes))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("revived_total", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def reset(self) -> None:
        """Forget the use history (a newly seeded codebook): no code counts as dead until the
        averages have built up again."""
        self.usage.zero_()
        self.steps.zero_()

    @torch.no_grad()
    def step(
        self,
        latents: torch.Tensor,
        indices: torch.Tensor,
        codes: torch.Tensor,
        weight: torch.Tensor,
    ) -> int:
        """Count one step's assignments and move dead codes; returns how many were moved.

        ``latents`` (N x D) and ``indices`` (N) are the step's real (unmasked) items, ``codes``
        the effective codebook they were matched against, ``weight`` the parameter to write
        (the effective codebook itself: revival needs codes that are their own parameters).
        """
        counts = torch.bincount(indices, minlength=self.usage.shape[0]).to(self.usage)
        if distributed.is_distributed():
            dist.all_reduce(counts)
        steps = int(self.steps)
        if steps == 0:
            self.usage.copy_(counts)
        else:
            self.usage.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        steps += 1
        self.steps.fill_(steps)
        # Averages need about 1 / (1 - decay) steps before a low one means an unused code.
        if steps < 1.0 / (1.0 - self.decay):
            return 0
        dead = dead_codes(self.usage, self.threshold)
        # Every rank holds the same averages (summed counts), so all agree to stop here, and
        # all take part in the gathers below.
        if dead.numel() == 0:
            return 0
        pool = distributed.gather_rows(latents.float())
        pool_idx = distributed.gather_rows(indices.unsqueeze(1)).squeeze(1)
        if pool.shape[0] == 0:
            return 0
        sq_error = (pool - codes.float()[pool_idx]).pow(2).sum(dim=1)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + steps)
        fresh = draw_replacements(pool, sq_error, dead.numel(), generator)
        dead = dead[: fresh.shape[0]]
        weight[dead] = fresh.to(weight)
        self.usage[dead] = self.usage.mean()
        self.revived_total += dead.numel()
        return int(dead.numel())
