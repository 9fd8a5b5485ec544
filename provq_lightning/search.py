"""Exact nearest-code search, bounded in memory and robust to reduced-precision settings.

Three decisions make the assignments match an fp64 reference:

* the product runs in fp32 with autocast off and TF32/bf16 matmul disabled, because under bf16
  or TF32 a large share of vectors pick the wrong code once latents sit away from the origin;
* inputs and codes are shifted by the codebook mean first (distances are translation invariant),
  which removes most of the cancellation in ``|z|^2 - 2 z.c + |c|^2``;
* the best few candidates are re-scored with the direct ``sum((z - c)^2)``, which has no
  cancellation at all, so near-ties are decided exactly.

Rows are processed in chunks so the distance block never exceeds ``max_chunk_bytes``; there is no
dense N x K one-hot anywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DEFAULT_MAX_CHUNK_BYTES = 128 * 2**20
RESCORE_CANDIDATES = 4


@contextlib.contextmanager
def exact_fp32_matmul(device: torch.device) -> Iterator[None]:
    """Disable autocast and TF32 / bf16 fp32-matmul shortcuts inside the block."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


def rows_per_chunk(num_codes: int, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> int:
    # The distance block is rows x K fp32; topk adds a small rows x c block on top.
    return max(1, max_chunk_bytes // (4 * max(num_codes, 1)))


@torch.no_grad()
def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    chunk_rows: int | None = None,
    rescore: bool = True,
) -> torch.Tensor:
    """Nearest code (squared L2) in ``codebook`` (K x D) for every row of ``z`` (N x D).

    ``rescore=False`` skips the exact re-scoring of near-ties (k-means assignment, where a
    near-tie decided either way changes nothing that matters).
    """
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_code expects z (N, D) and codebook (K, D); got {tuple(z.shape)} "
            f"and {tuple(codebook.shape)}"
        )
    n, k = z.shape[0], codebook.shape[0]
    out = torch.empty(n, dtype=torch.long, device=z.device)
    if n == 0:
        return out
    rows = chunk_rows or rows_per_chunk(k, max_chunk_bytes)
    candidates = min(RESCORE_CANDIDATES, k) if rescore else 1
    with exact_fp32_matmul(z.device):
        codes = codebook.detach().float()
        shift = codes.mean(dim=0, keepdim=True)
        codes = codes - shift
        half_sq_norms = 0.5 * (codes * codes).sum(dim=1)
        for start in range(0, n, rows):
            block = z[start : start + rows].detach().float() - shift
            # argmin |z - c|^2 == argmin (|c|^2 / 2 - z.c); |z|^2 is constant per row.
            scores = torch.addmm(half_sq_norms, block, codes.t(), beta=1.0, alpha=-1.0)
            if candidates == 1:
                out[start : start + rows] = scores.argmin(dim=1)
                continue
            top = scores.topk(candidates, dim=1, largest=False).indices
            exact = (block.unsqueeze(1) - codes[top]).pow(2).sum(dim=-1)
            out[start : start + rows] = top.gather(1, exact.argmin(dim=1, keepdim=True)).squeeze(1)
    return out
