"""K-means with k-means++ seeding, on whatever device the data lives on.

Used once per run to seed the codebook from encoder outputs at the end of warmup. Assignment
reuses the quantizer's exact, chunked nearest-code search, so memory stays bounded for
K = 16384 codes and hundreds of thousands of vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from provq_lightning.search import DEFAULT_MAX_CHUNK_BYTES, exact_fp32_matmul, nearest_code


@dataclass
class KMeansResult:
    centers: torch.Tensor
    inertia: float
    iterations: int
    reseeded: int


def kmeans_plus_plus(
    x: torch.Tensor, k: int, generator: torch.Generator, batch: int | None = None
) -> torch.Tensor:
    """k-means++ initial centres: new centres drawn with probability proportional to D(x)^2.

    ``batch`` centres are drawn per round before the distances are updated (one N x batch
    product instead of ``batch`` sequential passes). ``batch=1`` is exact k-means++; the
    default grows with K so K = 16384 seeds in seconds, while small codebooks stay exact.
    """
    n = x.shape[0]
    batch = batch or max(1, k // 256)
    centers = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    gen_device = generator.device
    first = int(torch.randint(n, (1,), generator=generator, device=gen_device))
    centers[0] = x[first]
    x_sq = (x * x).sum(dim=1)
    min_sq = (x - centers[0]).pow(2).sum(dim=1)
    filled = 1
    while filled < k:
        take = min(batch, k - filled)
        weights = min_sq.clamp_min(0).double()
        if float(weights.sum()) <= 0:  # fewer distinct points than centres: uniform picks
            picks = torch.randint(n, (take,), generator=generator, device=gen_device)
        else:
            cdf = weights.cumsum(0)
            u = torch.rand(take, generator=generator, device=gen_device, dtype=torch.float64)
            picks = torch.searchsorted(cdf, u.to(x.device) * cdf[-1]).clamp_max(n - 1)
        new = x[picks.to(x.device)]
        centers[filled : filled + take] = new
        filled += take
        d = x_sq.unsqueeze(1) - 2.0 * x @ new.t() + (new * new).sum(dim=1)
        min_sq = torch.minimum(min_sq, d.min(dim=1).values)
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
    k-means++ starting centres.
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
