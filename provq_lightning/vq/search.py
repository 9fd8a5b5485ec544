"""Exact nearest-code search: a blocked fp32 matmul, a plain argmin, and a proven error bound
that sends only the rows with a near-tie to an fp64 re-score.

For every row ``z`` the search minimises ``s_j = |c_j|^2 / 2 - z . c_j`` (``|z - c_j|^2 / 2``
minus a per-row constant) over the codes:

* inputs and codes are shifted by the codebook mean first (distances are translation
  invariant), which removes most of the cancellation in the expansion;
* the product runs in fp32 with autocast off and TF32/bf16 matmul disabled (under bf16 or TF32
  a large share of vectors pick the wrong code once latents sit away from the origin);
* codes x rows score blocks of about ``CPU_BLOCK_BYTES`` stay in cache between the matmul that
  writes them and the one reduction that reads them, to per-group minima (groups of about
  sqrt(K) consecutive codes); then, rows sorted by their best group, one small matmul per group
  gives the argmin and the runner-up inside it. No top-k over K, no N x K matrix;
* on CPU tensors with at most ``MAX_KERNEL_DIM`` dimensions and at least
  ``cpu_kernel.MIN_PAIRS`` rows x codes, the fused kernel of ``cpu_kernel`` replaces both
  stages: it keeps each row's best and runner-up scores in registers and never writes a score
  block (about 2x faster; same scores up to evaluation order, which the bound below allows;
  smaller searches gain too little to be worth its one-time build);
* a row whose best and second-best fp32 scores are closer than the bound below may have been
  decided by rounding: only those rows are re-scored, against the codes within the bound of
  their best, with the direct fp64 ``sum((z - c)^2)`` of the original values.

Why the bound is safe (u = 2^-24, gamma_n = n u / (1 - n u), norms are Euclidean):
let ``a = z - m`` and ``b_j = c_j - m`` be the exact shifted vectors and ``a^, b^_j`` the fp32
values the search uses. Rounding the shift (and, for fp64 inputs, the cast to fp32) gives
``|a^ - a| <= u' (|a^| + [fp64] |z^|)`` with ``u' = u / (1 - u)``, and the same for each code,
so ``e_j = (a^ - a) - (b^_j - b_j)`` has ``|e_j| <= rho = u' (A + [fp64] |z^| + B + [fp64] C)``
where ``A = |a^|``, ``B = max_j |b^_j|``, ``C = max_j |c^_j|``. Then, up to a constant of the
row, ``s*_j = (|a^ - b^_j|^2 - |a|^2) / 2`` differs from the exact ``s_j`` by at most
``E2 = (A + B + rho) rho + rho^2 / 2`` (expand ``|(a - b_j) + e_j|^2``, use
``|a - b_j| <= A + B + rho``). The stored half norm ``h_j = fl(|b^_j|^2 / 2)`` and the matmul's
``fl(h_j - sum_i a^_i b^_ij)`` are sums of D and D + 1 terms in some order (any BLAS blocking,
FMA or split-K included), so ``|s^_j - s*_j| <= gamma_{D+1} (h_j + A |b^_j|) + gamma_D |b^_j|^2
/ 2 <= E1 = gamma_{D+1} (B^2 + A B)`` (Cauchy-Schwarz on ``sum |a^_i b^_ij|``). With
``E = E1 + E2`` every computed score is within ``E`` of the exact one (shared row constant
aside), so if ``i`` is the computed argmin and ``j*`` an exact one,
``s^_{j*} <= s_{j*} + E <= s_i + E <= s^_i + 2E``: every exact minimiser lies within ``2E``
of the computed minimum. A row whose runner-up is further than ``2E`` away is therefore decided
exactly (and uniquely); the others are re-scored over the candidates within ``2E``. The bound
holds for every fp32 evaluation, so mixing the block's group minima with the second stage's
recomputed scores of the winning group is safe too.
``TIE_SAFETY`` doubles the threshold to cover the neglected O(u^2) terms and the rounding of
the threshold itself. The bound assumes IEEE fp32 arithmetic without flush-to-zero of results
that matter (a tiny absolute term covers underflow of products of near-zero values).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from provq_lightning.vq import cpu_kernel

DEFAULT_MAX_CHUNK_BYTES = 128 * 2**20
# About the size of a score block that stays in the L2/L3 cache of a CPU core between the
# matmul that writes it and the min that reads it (4 MiB was fastest on the benchmark machine;
# 1 MiB and 16 MiB blocks were 10-20% slower). GPUs use the whole ``max_chunk_bytes`` budget:
# there, fewer and larger kernels win.
CPU_BLOCK_BYTES = 4 * 2**20
MIN_CPU_BLOCK_ROWS = 64
UNIT_ROUNDOFF = 2.0**-24
TIE_SAFETY = 2.0
# Absolute slack for underflow: products of near-zero values lose their relative accuracy.
UNDERFLOW_SLACK = 1e-30
# Widest codes the fused CPU kernel takes: past this the sgemm path is compute-bound anyway.
MAX_KERNEL_DIM = 32


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
    """Rows whose fp32 score block against ``num_codes`` codes fits in ``max_chunk_bytes``."""
    return max(1, max_chunk_bytes // (4 * max(num_codes, 1)))


def group_size(num_codes: int) -> int:
    """Codes per group: about sqrt(K), so both reduction stages stay short."""
    if num_codes <= 32:
        return max(num_codes, 1)
    return min(num_codes, 2 ** round(math.log2(math.sqrt(num_codes))))


@dataclass(frozen=True)
class PreparedCodes:
    """A codebook laid out for the blocked search.

    ``codes`` (K_pad x D, fp32) are shifted by ``shift`` and padded with zero rows to whole
    groups of ``group`` codes; ``half_sq`` (K_pad x 1) holds ``|code|^2 / 2`` and ``+inf`` on the
    padding, so padding never wins. ``max_norm`` is B of the error bound, ``cast_norm`` is C
    when casting the codebook to fp32 rounded (fp64 codebooks), else 0.
    """

    codes: torch.Tensor
    half_sq: torch.Tensor
    shift: torch.Tensor
    num_codes: int
    group: int
    max_norm: float
    cast_norm: float


def _cast_is_inexact(t: torch.Tensor) -> bool:
    # bf16, fp16 and fp32 values are all exactly representable in fp32.
    return t.dtype not in (torch.float32, torch.bfloat16, torch.float16)


def prepare_codes(codebook: torch.Tensor, shift: torch.Tensor | None = None) -> PreparedCodes:
    """Shift (by the codebook mean unless ``shift`` is given), pad and pre-compute half norms."""
    k, d = codebook.shape
    original = codebook.detach().float()
    if shift is None:
        shift = original.mean(dim=0, keepdim=True)
    shifted = original - shift
    size = group_size(k)
    padded = -(-k // size) * size
    codes = torch.zeros(padded, d, dtype=torch.float32, device=codebook.device)
    codes[:k] = shifted
    half_sq = torch.full((padded, 1), math.inf, dtype=torch.float32, device=codebook.device)
    half_sq[:k, 0] = 0.5 * (shifted * shifted).sum(dim=1)
    max_norm = float(shifted.double().norm(dim=1).max()) if k else 0.0
    cast_norm = float(original.double().norm(dim=1).max()) if _cast_is_inexact(codebook) else 0.0
    return PreparedCodes(codes, half_sq, shift, k, size, max_norm, cast_norm)


def default_block_rows(
    device: torch.device, padded_codes: int, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
) -> int:
    """Rows per score block: cache-sized on CPU, the whole memory budget elsewhere."""
    budget = rows_per_chunk(padded_codes, max_chunk_bytes)
    if device.type == "cpu":
        # Below 64 rows MKL's sgemm falls off a cliff (16 rows: 7x slower per score, measured).
        return min(budget, max(MIN_CPU_BLOCK_ROWS, rows_per_chunk(padded_codes, CPU_BLOCK_BYTES)))
    return budget


def blocked_argmin(
    a: torch.Tensor,
    prepared: PreparedCodes,
    rows: int,
    want_second: bool = False,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Best code, its fp32 score and (optionally) the runner-up score for every row of ``a``.

    ``a`` (N x D, fp32) is already shifted by ``prepared.shift``. Two stages: cache-sized
    codes x rows score blocks (``rows`` rows each) reduced to per-group minima (the only N x K
    work), then, with rows sorted by their best group, one small matmul per group for the
    argmin and runner-up inside it. The second stage recomputes those scores; that is fine for
    the error bound, which holds for any fp32 evaluation order. The per-group minima of at most
    ``max_chunk_bytes`` are held at once. Call inside ``exact_fp32_matmul``.
    """
    fused = _fused_cpu_argmin(a, prepared, want_second)
    if fused is not None:
        return fused
    groups = prepared.codes.shape[0] // prepared.group
    span = max(rows, rows_per_chunk(groups, max_chunk_bytes))
    n = a.shape[0]
    if n <= span:
        return _two_stage(a, prepared, rows, want_second)
    parts = [_two_stage(a[i : i + span], prepared, rows, want_second) for i in range(0, n, span)]
    index = torch.cat([p[0] for p in parts])
    best = torch.cat([p[1] for p in parts])
    second = torch.cat([p[2] for p in parts]) if want_second else None
    return index, best, second


def _fused_cpu_argmin(
    a: torch.Tensor, prepared: PreparedCodes, want_second: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """The same three results from ``cpu_kernel`` for CPU rows of up to ``MAX_KERNEL_DIM``
    dimensions in searches of at least ``cpu_kernel.MIN_PAIRS`` rows x codes; None when it does
    not apply or is unavailable. Its scores are the same ``fl(h_j - sum_i a_i b_ij)`` (FMA or
    not), so the error bound holds unchanged."""
    k = prepared.num_codes
    if a.device.type != "cpu" or a.shape[1] > MAX_KERNEL_DIM or a.shape[0] == 0 or k == 0:
        return None
    if not cpu_kernel.pays_off(a.shape[0], k):  # too small to be worth a build (TopoDisc)
        return None
    # The half norms prepare_codes already computed: the very h_j the error bound is about.
    codes_t, half_sq = cpu_kernel.pad_codes(prepared.codes[:k], prepared.half_sq[:k, 0])
    fused = cpu_kernel.nearest_two(a, codes_t, half_sq)
    if fused is None:
        return None
    index, best, second = fused
    index.clamp_(max=k - 1)  # NaN rows: keep the index valid, as the torch path does
    return index, best, second if want_second else None


def _two_stage(
    a: torch.Tensor, prepared: PreparedCodes, rows: int, want_second: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    n = a.shape[0]
    padded, size = prepared.codes.shape[0], prepared.group
    groups = padded // size
    if groups == 1:
        winner = torch.zeros(n, dtype=torch.long, device=a.device)
        return _within_groups(a, prepared, winner, None, want_second)
    group_min = torch.empty(n, groups, dtype=torch.float32, device=a.device)
    rows = max(1, min(rows, n))
    buffer = torch.empty(padded * rows, dtype=torch.float32, device=a.device)
    for start in range(0, n, rows):
        block = a[start : start + rows]
        r = block.shape[0]
        # Codes x rows: MKL's fastest layout for an inner dimension of D (measured).
        scores = buffer[: padded * r].view(padded, r)
        torch.addmm(prepared.half_sq, prepared.codes, block.t(), beta=1.0, alpha=-1.0, out=scores)
        # Stored rows x groups: reductions along the last dimension are the fast ones.
        group_min[start : start + r] = scores.view(groups, size, r).amin(dim=1).t()
    winner = group_min.argmin(dim=1)
    other_groups = None
    if want_second:
        other_groups = group_min.scatter_(1, winner.unsqueeze(1), math.inf).amin(dim=1)
    return _within_groups(a, prepared, winner, other_groups, want_second)


def _within_groups(
    a: torch.Tensor,
    prepared: PreparedCodes,
    winner: torch.Tensor,
    other_groups: torch.Tensor | None,
    want_second: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    size, d = prepared.group, a.shape[1]
    groups = prepared.codes.shape[0] // size
    codes = prepared.codes.view(groups, size, d)
    half_sq = prepared.half_sq.view(groups, size)
    sorted_winner, order = torch.sort(winner, stable=True)
    a_sorted = a.index_select(0, order)
    top = 2 if want_second and size > 1 else 1
    values = torch.empty(a.shape[0], top, dtype=torch.float32, device=a.device)
    local = torch.empty(a.shape[0], top, dtype=torch.long, device=a.device)
    start = 0
    for group, count in enumerate(torch.bincount(sorted_winner, minlength=groups).tolist()):
        if count == 0:
            continue
        stop = start + count
        scores = torch.addmm(
            half_sq[group], a_sorted[start:stop], codes[group].t(), beta=1.0, alpha=-1.0
        )
        if top == 2:
            torch.topk(scores, 2, dim=1, largest=False, out=(values[start:stop], local[start:stop]))
        else:
            torch.min(scores, dim=1, keepdim=True, out=(values[start:stop], local[start:stop]))
        start = stop
    index = torch.empty_like(winner)
    index[order] = torch.add(local[:, 0], sorted_winner, alpha=size)
    best = torch.empty_like(values[:, 0])
    best[order] = values[:, 0]
    second = None
    if want_second:
        second = torch.full_like(best, math.inf)
        if top == 2:
            second[order] = values[:, 1]
        if other_groups is not None:
            torch.minimum(second, other_groups, out=second)
    # Only NaN scores can point into the padding; keep such indices valid.
    index.clamp_(max=max(prepared.num_codes - 1, 0))
    return index, best, second


def tie_threshold(a: torch.Tensor, z: torch.Tensor, prepared: PreparedCodes) -> torch.Tensor:
    """Per-row fp64 ``TIE_SAFETY * 2E``: scores closer than this to the best may be tied.

    ``a`` is the shifted fp32 input, ``z`` the input as given (its fp32 norm enters when the cast
    to fp32 rounded). See the module docstring for the derivation.
    """
    d = a.shape[1]
    u = UNIT_ROUNDOFF
    gamma = (d + 1) * u / (1 - (d + 1) * u)
    u_prime = u / (1 - u)
    big_a = a.double().norm(dim=1)
    big_b, big_c = prepared.max_norm, prepared.cast_norm
    cast = z.detach().float().double().norm(dim=1) if _cast_is_inexact(z) else 0.0
    rho = u_prime * (big_a + cast + big_b + big_c)
    e1 = gamma * (big_b * big_b + big_a * big_b)
    e2 = (big_a + big_b + rho) * rho + 0.5 * rho * rho
    return TIE_SAFETY * 2.0 * (e1 + e2) + UNDERFLOW_SLACK


def rescore_fp64(
    z: torch.Tensor,
    codebook: torch.Tensor,
    a: torch.Tensor,
    prepared: PreparedCodes,
    threshold: torch.Tensor,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> torch.Tensor:
    """Exact nearest code for the rows of ``z`` (the near-tied ones), lowest index on ties.

    The fp32 scores are recomputed and every code within ``threshold`` of a row's best becomes
    a candidate; candidates are ranked by the direct fp64 ``sum((z - c)^2)`` of the original
    values, which has no cancellation. ``a`` and ``threshold`` belong to the same rows as ``z``.
    """
    k, d = prepared.num_codes, a.shape[1]
    # MPS has no fp64: re-score there on the CPU (few rows, so the copy is cheap).
    exact_device = torch.device("cpu") if z.device.type == "mps" else z.device
    codes64 = codebook.detach().to(exact_device, torch.float64)
    codes32, half_sq = prepared.codes[:k], prepared.half_sq[:k, 0]
    # Per candidate pair: two int64 indices, the fp64 row and code gathered, one distance.
    rows = max(1, max_chunk_bytes // (k * (24 + 16 * d)))
    out = []
    for start in range(0, z.shape[0], rows):
        block = a[start : start + rows]
        scores = torch.addmm(half_sq, block, codes32.t(), beta=1.0, alpha=-1.0)
        limit = scores.amin(dim=1).double() + threshold[start : start + rows]
        # Round the fp64 limit up to fp32 so no candidate within it is dropped.
        limit32 = torch.nextafter(limit.float(), torch.tensor(math.inf, device=limit.device))
        row, col = (scores <= limit32.unsqueeze(1)).nonzero(as_tuple=True)
        z64 = z[start : start + rows].detach().to(exact_device, torch.float64)
        row, col = row.to(exact_device), col.to(exact_device)
        dist = (z64[row] - codes64[col]).pow(2).sum(dim=1)
        count = block.shape[0]
        nearest = torch.full((count,), math.inf, dtype=torch.float64, device=exact_device)
        nearest.scatter_reduce_(0, row, dist, "amin")
        hit = dist == nearest[row]
        winner = torch.full((count,), k, dtype=torch.long, device=exact_device)
        winner.scatter_reduce_(0, row[hit], col[hit], "amin")
        out.append(winner.clamp_(max=k - 1).to(z.device))
    return torch.cat(out)


@torch.no_grad()
def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    chunk_rows: int | None = None,
    rescore: bool = True,
) -> torch.Tensor:
    """Nearest code (squared L2) in ``codebook`` (K x D) for every row of ``z`` (N x D).

    Equal to an fp64 reference on every row. ``chunk_rows`` overrides the rows per score
    block; ``rescore=False`` skips the exact re-scoring of near-ties (k-means assignment,
    where a near-tie decided either way changes nothing that matters).
    """
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_code expects z (N, D) and codebook (K, D); got {tuple(z.shape)} "
            f"and {tuple(codebook.shape)}"
        )
    n = z.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=z.device)
    with exact_fp32_matmul(z.device):
        prepared = prepare_codes(codebook)
        a = z.detach().float() - prepared.shift
        padded = prepared.codes.shape[0]
        rows = chunk_rows or default_block_rows(z.device, padded, max_chunk_bytes)
        index, best, second = blocked_argmin(a, prepared, rows, rescore, max_chunk_bytes)
        if second is None:
            return index
        threshold = tie_threshold(a, z, prepared)
        tied = ((second.double() - best.double()) <= threshold).nonzero().squeeze(1)
        if tied.numel():
            index[tied] = rescore_fp64(
                z[tied], codebook, a[tied], prepared, threshold[tied], max_chunk_bytes
            )
    return index
