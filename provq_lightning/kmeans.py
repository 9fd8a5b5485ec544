"""K-means with k-means++ seeding, on whatever device the data lives on.

Used once per run to seed the codebook from encoder outputs at the end of warmup. Assignment
reuses the quantizer's exact, chunked nearest-code search, so memory stays bounded for
K = 16384 codes and hundreds of thousands of vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from provq_lightning.errors import ProvqError
from provq_lightning.search import DEFAULT_MAX_CHUNK_BYTES, exact_fp32_matmul, nearest_code


class NonFiniteInputError(ProvqError, ValueError):
    """k-means was given NaN/inf vectors: centres seeded from them would poison the codebook."""


def check_finite_rows(x: torch.Tensor) -> None:
    """Raise ``NonFiniteInputError`` naming how many rows of ``x`` (N x D) hold NaN/inf."""
    bad = ~torch.isfinite(x).all(dim=1)
    count = int(bad.sum())
    if count:
        first = int(bad.nonzero()[0, 0])
        raise NonFiniteInputError(
            f"k-means input has {count} non-finite rows of {x.shape[0]} (first: row {first}); "
            "the encoder outputs went NaN/inf: lower the learning rate or check the data, "
            "then restart from a checkpoint written before the divergence"
        )


@dataclass
class KMeansResult:
    centers: torch.Tensor
    inertia: float
    iterations: int
    reseeded: int


def kmeans_plus_plus(
    x: torch.Tensor,
    k: int,
    generator: torch.Generator,
    batch: int | None = None,
    local_trials: int | None = None,
    chunk_rows: int = 8192,
) -> torch.Tensor:
    """Greedy k-means++ initial centres.

    Each new centre is the best of ``local_trials`` candidates drawn with probability
    proportional to D(x)^2 (best = largest drop in total squared distance), as in
    scikit-learn's k-means++. ``batch`` centres are chosen per round before the distances are
    updated, so K = 16384 needs a few hundred passes over the data instead of 16384; small
    codebooks (K <= 256) keep one centre per round, i.e. exact greedy k-means++.
    """
    n, d = x.shape
    batch = batch or max(1, k // 256)
    trials = local_trials or 2 + int(math.log(k))
    gen_device = generator.device
    centers = torch.empty(k, d, dtype=x.dtype, device=x.device)
    first = int(torch.randint(n, (1,), generator=generator, device=gen_device))
    centers[0] = x[first]
    x_sq = (x * x).sum(dim=1)
    min_sq = (x - centers[0]).pow(2).sum(dim=1).clamp_min(0)
    filled = 1
    while filled < k:
        take = min(batch, k - filled)
        total = float(min_sq.sum())
        if total <= 0:  # fewer distinct points than centres: uniform picks
            cand = torch.randint(n, (take, trials), generator=generator, device=gen_device)
        else:
            cdf = min_sq.double().cumsum(0)
            u = torch.rand(
                take * trials, generator=generator, device=gen_device, dtype=torch.float64
            )
            cand = torch.searchsorted(cdf, u.to(x.device) * cdf[-1]).clamp_max(n - 1)
        cand = cand.to(x.device).reshape(take, trials)
        points = x[cand.reshape(-1)]
        p_sq = (points * points).sum(dim=1)
        gain = torch.zeros(take * trials, dtype=torch.float64, device=x.device)
        slack = min_sq - x_sq  # drop of x's squared distance = relu(slack + 2 x.p - |p|^2)
        for s in range(0, n, chunk_rows):
            drop = torch.addmm(-p_sq, x[s : s + chunk_rows], points.t(), alpha=2.0)
            drop += slack[s : s + chunk_rows, None]
            gain += drop.relu_().sum(dim=0).double()
        best = gain.view(take, trials).argmax(dim=1)
        new = x[cand[torch.arange(take, device=x.device), best]]
        centers[filled : filled + take] = new
        filled += take
        n_sq = (new * new).sum(dim=1)
        for s in range(0, n, chunk_rows):
            dist = torch.addmm(n_sq, x[s : s + chunk_rows], new.t(), alpha=-2.0)
            dist += x_sq[s : s + chunk_rows, None]
            min_sq[s : s + chunk_rows] = torch.minimum(
                min_sq[s : s + chunk_rows], dist.min(dim=1).values.clamp_min(0)
            )
    return centers


def _assign(x: torch.Tensor, centers: torch.Tensor, max_chunk_bytes: int):
    idx = nearest_code(x, centers, max_chunk_bytes, rescore=False)
    sq = (x - centers[idx]).pow(2).sum(dim=1)
    return idx, sq


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    progress: Callable[[int, float], None] | None = None,
    init: torch.Tensor | None = None,
) -> KMeansResult:
    """Lloyd's k-means on ``x`` (N x D) with k-means++ init; empty clusters are re-seeded.

    Stops after ``iters`` iterations or when the relative inertia change falls below ``tol``.
    ``progress(iteration, inertia)`` is called after each iteration; ``init`` replaces the
    k-means++ starting centres. Raises ``NonFiniteInputError`` when a row holds NaN/inf.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans expects an (N, D) tensor, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n < k:
        raise ValueError(
            f"k-means needs at least as many vectors as codes: got {n} vectors for {k} codes; "
            "collect more (raise kmeans_samples or the number of collection batches)"
        )
    x = x.float()
    check_finite_rows(x)  # one pass; NaN would otherwise win every k-means++ draw silently
    gen_device = x.device if x.device.type != "mps" else torch.device("cpu")
    generator = torch.Generator(device=gen_device).manual_seed(seed)
    if init is not None:
        centers = init.to(x).clone()
    else:
        with exact_fp32_matmul(x.device):
            centers = kmeans_plus_plus(x, k, generator)
    previous = float("inf")
    reseeded = 0
    iteration = 0
    inertia = float("inf")
    for iteration in range(1, iters + 1):
        idx, sq = _assign(x, centers, max_chunk_bytes)
        inertia = float(sq.sum())
        counts = torch.bincount(idx, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, idx, x)
        nonempty = counts > 0
        centers[nonempty] = sums[nonempty] / counts[nonempty].unsqueeze(1).to(x.dtype)
        empty = (~nonempty).nonzero().squeeze(1)
        if empty.numel():
            # Move each empty centre onto one of the worst-fit points: the largest inertia drop.
            worst = sq.topk(min(empty.numel(), n)).indices
            centers[empty[: worst.numel()]] = x[worst]
            reseeded += int(empty.numel())
        if progress is not None:
            progress(iteration, inertia)
        converged = previous - inertia <= tol * previous if previous < float("inf") else False
        if empty.numel() == 0 and converged:
            break
        previous = inertia
    _, sq = _assign(x, centers, max_chunk_bytes)
    return KMeansResult(
        centers=centers, inertia=float(sq.sum()), iterations=iteration, reseeded=reseeded
    )
