"""Structure reconstruction metrics: per-structure values averaged over the whole set.

Backbone RMSD and CA lDDT, equal to biotite's (``superimpose`` + ``rmsd``, ``lddt``;
``tests/protein/test_metric_parity.py``), and the standard CA TM-score, equal to TM-align's for
the same residue pairing (``tests/protein/test_tm_score.py``), batched on the device. Every
metric keeps a (sum, count) pair summed across DDP ranks, so the reported value is the
mean over every structure of the validation/test set, not a mean of per-batch means.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torchmetrics import Metric

from provq_lightning.protein.geometry import kabsch, kabsch_rmsd

LDDT_CUTOFF = 15.0
LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
TM_D0_MIN = 0.5  # Angstrom; the d0 floor biotite (and TM-score for short chains) uses
# TM-score's superposition search (Zhang & Skolnick 2004; the TM-score and TM-align programs).
TM_D0_SEARCH_RANGE = (4.5, 8.0)  # Angstrom; d0 clamped to this sets the selection cutoffs
TM_FRAGMENT_LEVELS = 6  # seed fragment lengths L, L/2, ..., at most this many
TM_MIN_FRAGMENT = 4  # residues in the shortest seed fragment
TM_MAX_ITERATIONS = 20  # re-superpositions per seed before giving up on convergence
TM_MIN_SELECTED = 3  # the cutoff grows until at least this many pairs are selected
TM_CUTOFF_STEP = 0.5  # Angstrom; by this much at a time
TM_SEED_CHUNK = 1 << 22  # seeds x residues refined at once (bounds memory for long chains)


def backbone_rmsd(pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Backbone (N, CA, C) RMSD per structure (B,) after Kabsch superposition, in Angstrom."""
    b = pred.shape[0]
    atom_mask = mask.unsqueeze(-1).expand(-1, -1, 3).reshape(b, -1)
    return kabsch_rmsd(pred.reshape(b, -1, 3), true.reshape(b, -1, 3), atom_mask)


def lddt_ca(
    pred_ca: torch.Tensor,
    true_ca: torch.Tensor,
    mask: torch.Tensor,
    cutoff: float = LDDT_CUTOFF,
    thresholds: tuple[float, ...] = LDDT_THRESHOLDS,
) -> torch.Tensor:
    """CA lDDT per structure (B,) in [0, 1], superposition-free.

    For every residue, the pairs within ``cutoff`` of it in the true structure (other residues
    only) are scored by the fraction of distance errors under each threshold; the per-residue
    scores are averaged over residues that have at least one such pair.
    """
    d_true = torch.cdist(true_ca.double(), true_ca.double())
    d_pred = torch.cdist(pred_ca.double(), pred_ca.double())
    n = mask.shape[1]
    pair = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    pair &= ~torch.eye(n, dtype=torch.bool, device=mask.device)
    pair &= d_true < cutoff
    err = (d_true - d_pred).abs()
    kept = torch.stack([(err < t) for t in thresholds]).double().mean(0)
    per_pair = kept * pair.double()
    n_pairs = pair.sum(-1)
    per_res = per_pair.sum(-1) / n_pairs.clamp_min(1)
    has = n_pairs > 0
    score = (per_res * has).sum(-1) / has.sum(-1).clamp_min(1)
    return score.to(pred_ca.dtype)


def tm_d0(length: torch.Tensor) -> torch.Tensor:
    """TM-score distance scale d0(L) = 1.24 (L - 15)^(1/3) - 1.8 (Zhang & Skolnick 2004),
    floored at ``TM_D0_MIN`` so that short chains get a positive scale."""
    cube = (length.double() - 15.0).clamp_min(0.0).pow(1.0 / 3.0)
    return (1.24 * cube - 1.8).clamp_min(TM_D0_MIN)


def tm_score_kabsch_ca(
    pred_ca: torch.Tensor, true_ca: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """CA TM-score per structure (B,) after the least-squares (Kabsch) superposition only.

    ``pred_ca`` is superimposed onto ``true_ca`` (B, L, 3) by Kabsch on the masked CA atoms,
    then ``mean_i 1 / (1 + (d_i / d0(L))^2)`` over the L masked residues: biotite's
    ``tm_score(true, superimposed, i, i, reference_length="reference")``. A lower bound of
    ``tm_score_ca``: one rigid fit to every residue, so a moved domain pulls the rest out of
    place.
    """
    rot, trans = kabsch(pred_ca.double(), true_ca.double(), mask)
    moved = torch.einsum("bij,bpj->bpi", rot, pred_ca.double()) + trans[:, None]
    dist = (moved - true_ca.double()).norm(dim=-1)
    length = mask.sum(-1)
    d0 = tm_d0(length).unsqueeze(-1)
    per_res = (1.0 / (1.0 + (dist / d0).pow(2))) * mask.double()
    return (per_res.sum(-1) / length.clamp_min(1)).to(pred_ca.dtype)


def _fragment_lengths(n: int) -> list[int]:
    """Seed fragment lengths for ``n`` aligned residues, as TM-score: n, n/2, n/4, ... (at most
    ``TM_FRAGMENT_LEVELS``), the last one ``TM_MIN_FRAGMENT`` (or n when shorter)."""
    shortest = min(TM_MIN_FRAGMENT, n)
    lengths = []
    for level in range(TM_FRAGMENT_LEVELS - 1):
        length = n >> level
        if length <= shortest:
            break
        lengths.append(length)
    return [*lengths, shortest]


def _seed_fragments(counts: list[int], n_res: int, device: torch.device) -> torch.Tensor:
    """Seed residue sets (B, K, n_res): every length of ``_fragment_lengths`` slid one residue
    at a time along each structure's first ``counts[b]`` (packed) residues; rows past a
    structure's own seeds are empty."""
    starts, ends = [], []
    for n in counts:
        lengths = _fragment_lengths(n)
        starts.append(torch.cat([torch.arange(n - f + 1) for f in lengths]))
        ends.append(torch.cat([torch.arange(f, n + 1) for f in lengths]))
    pad = torch.nn.utils.rnn.pad_sequence
    first = pad(starts, batch_first=True).to(device)
    last = pad(ends, batch_first=True).to(device)  # zero-length padding seeds select nothing
    position = torch.arange(n_res, device=device)
    return (position >= first[..., None]) & (position < last[..., None])


def _pair_features(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per residue (B, L, 17): [1, x, y, y x^T, |x|^2 + |y|^2], zero where not valid. Their sums
    over a residue set give its Kabsch covariance, and their dot product with coefficients of
    a superposition gives every residue's squared distance after it (``_superpose_sets``): two
    matrix products per iteration instead of moving every seed's coordinates."""
    outer = (y.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    sq = (x.pow(2) + y.pow(2)).sum(-1, keepdim=True)
    feats = torch.cat([torch.ones_like(sq), x, y, outer, sq], dim=-1)
    return feats * valid.unsqueeze(-1)


def _superpose_sets(feats: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Squared distances (B, K, L) of every residue after the proper (det +1) least-squares
    superposition of x onto y on each residue set ``pairs`` (B, K, L)."""
    sums = torch.einsum("bkl,blf->bkf", pairs.to(feats.dtype), feats)
    count = sums[..., :1].clamp_min(1.0)
    mx, my = sums[..., 1:4] / count, sums[..., 4:7] / count
    outer = my.unsqueeze(-1) * mx.unsqueeze(-2)
    cov = sums[..., 7:16].unflatten(-1, (3, 3)) - count.unsqueeze(-1) * outer
    u, _, vh = torch.linalg.svd(cov)
    # Flip the last singular direction where needed: a rotation, never a mirror.
    hand = torch.linalg.det(u @ vh)
    u = torch.cat([u[..., :2], u[..., 2:] * torch.where(hand < 0, -1.0, 1.0)[..., None, None]], -1)
    rot = u @ vh
    trans = my - torch.einsum("bkij,bkj->bki", rot, mx)
    # |R x + t - y|^2 = 1 |t|^2 + x.(2 R^T t) + y.(-2 t) + (y x^T):(-2 R) + 1 (|x|^2 + |y|^2)
    coef = torch.cat(
        [
            trans.pow(2).sum(-1, keepdim=True),
            2.0 * torch.einsum("bkij,bki->bkj", rot, trans),
            -2.0 * trans,
            -2.0 * rot.flatten(-2),
            torch.ones_like(count),
        ],
        dim=-1,
    )
    return torch.einsum("blf,bkf->bkl", feats, coef)


def _pairs_within(
    d_sq: torch.Tensor, valid: torch.Tensor, cutoff: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """Valid residues (B, K, L) whose squared distance ``d_sq`` is under ``cutoff`` (B, 1)
    squared; as TM-score, a set's cutoff grows in ``TM_CUTOFF_STEP`` steps until it holds
    ``TM_MIN_SELECTED`` residues (when the structure, ``count`` (B, 1) residues, has more)."""
    valid = valid.unsqueeze(1).expand_as(d_sq)
    inside = valid & (d_sq < cutoff.pow(2).unsqueeze(-1))
    short = (inside.sum(-1) < TM_MIN_SELECTED) & (count > TM_MIN_SELECTED)
    if short.any():
        rows, ok = d_sq[short], valid[short]
        kth = rows.masked_fill(~ok, torch.inf).kthvalue(TM_MIN_SELECTED, dim=-1).values.sqrt()
        base = cutoff.expand_as(short)[short]
        grown = base + TM_CUTOFF_STEP * (torch.floor((kth - base) / TM_CUTOFF_STEP) + 1.0)
        inside[short] = ok & (rows < grown.pow(2).unsqueeze(-1))
    return inside


def _first_of_duplicates(pairs: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """``alive`` (B, K) less the seeds whose residue set repeats an earlier alive seed's of the
    same structure: from equal sets the refinement runs identically, so one is enough."""
    b, k, n_res = pairs.shape
    # An exact code of each set: its residues' bits summed into float64 words of 52 bits (sums of
    # distinct powers of two below 2^52 are exact), by one matrix product.
    bits = 52
    position = torch.arange(n_res, device=pairs.device)
    word = torch.zeros(n_res, (n_res + bits - 1) // bits, dtype=torch.float64, device=pairs.device)
    word[position, position // bits] = torch.pow(2.0, (position % bits).double())
    code = pairs.to(torch.float64) @ word  # (B, K, words)
    owner = torch.arange(b, device=pairs.device, dtype=torch.float64)[:, None, None]
    owner = owner.expand(b, k, 1)
    rows = torch.cat([owner, code], dim=-1)[alive]  # (M, 1 + words)
    # Lexicographic order by stable sorts from the last column to the first; equal rows end up
    # adjacent, the earliest first.
    order = torch.arange(rows.shape[0], device=pairs.device)
    for col in reversed(range(rows.shape[1])):
        order = order[torch.sort(rows[order, col], stable=True).indices]
    ranked = rows[order]
    repeat = torch.zeros_like(order, dtype=torch.bool)
    repeat[1:] = (ranked[1:] == ranked[:-1]).all(-1)
    keep = torch.ones_like(repeat)
    keep[order[repeat]] = False
    out = alive.clone()
    out[alive] = keep
    return out


def _compact(alive: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns of (B, K) no structure needs: alive seeds first, K cut to the most any
    structure still has."""
    keep = int(alive.sum(-1).max())
    order = torch.argsort((~alive).to(torch.uint8), dim=-1, stable=True)[:, :keep]
    pairs = pairs.gather(1, order[..., None].expand(-1, -1, pairs.shape[-1]))
    return alive.gather(1, order), pairs


def _best_superposition_score(
    x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """TM-score (B,) of packed, centred structures ``x`` onto ``y`` (B, L, 3): the best over
    every seed fragment's refinement (``tm_score_ca``)."""
    feats = _pair_features(x, y, valid)
    d0_sq = tm_d0(count).pow(2)[:, None]
    # 1 / (1 + d^2 / d0^2) = d0^2 / (d0^2 + d^2), averaged over the scored residues.
    weight = valid.to(x.dtype) * d0_sq / count[:, None]
    d0_search = tm_d0(count).clamp(*TM_D0_SEARCH_RANGE)[:, None]
    count = count[:, None]
    pairs = _seed_fragments(count[:, 0].tolist(), x.shape[1], x.device)
    alive = pairs.any(-1)
    best = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    cutoff = d0_search - 1.0  # a fragment's own fit is read with a tighter cutoff
    for step in range(TM_MAX_ITERATIONS + 1):
        d_sq = _superpose_sets(feats, pairs)
        chosen = _pairs_within(d_sq, valid, cutoff, count)
        score = torch.einsum("bkl,bl->bk", d_sq.add_(d0_sq[..., None]).reciprocal_(), weight)
        best = torch.maximum(best, score.masked_fill(~alive, 0.0).amax(-1))
        if step > 0:  # converged: re-superposing on the same set gives the same fit
            alive = alive & (chosen != pairs).any(-1)
        if not alive.any():
            break
        alive, pairs = _compact(_first_of_duplicates(chosen, alive), chosen)
        cutoff = d0_search + 1.0
    return best


@torch.no_grad()
def tm_score_ca(pred_ca: torch.Tensor, true_ca: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Standard CA TM-score per structure (B,) in [0, 1], normalised by the true structure's
    length: the maximum over superpositions of ``mean_i 1 / (1 + (d_i / d0(L))^2)``, searched
    as the TM-score program does for a fixed residue pairing.

    Residues correspond one to one (``pred_ca`` and ``true_ca`` (B, L, 3) are the same chain,
    ``mask`` (B, L) the residues to score). Every run of L, L/2, L/4, ... down to 4 consecutive
    masked residues seeds a proper (det +1) Kabsch superposition, refined on the residues within
    a cutoff (``d0`` clamped to [4.5, 8] A, minus 1 A for the seed, plus 1 A after) until the
    set stops changing; the best score wins. So a moved domain is scored by the larger part that
    still fits, where one least-squares fit (``tm_score_kabsch_ca``) spreads the error over every
    residue. Equals TM-align (``tmtools``) given the same pairing
    (``tests/protein/test_tm_score.py``).
    """
    count = mask.sum(-1)
    out = torch.zeros(mask.shape[0], dtype=torch.float64, device=mask.device)
    # Masked residues packed first, in chain order: fragments are runs of scored residues
    # (TM-score works on the aligned pairs only, gaps closed).
    order = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)
    x = pred_ca.double().gather(1, order[..., None].expand(-1, -1, 3))
    y = true_ca.double().gather(1, order[..., None].expand(-1, -1, 3))
    valid = mask.gather(1, order)
    # Centred (translations do not change the score) so that the expanded squared distances
    # of ``_superpose_sets`` lose no precision.
    w = valid.unsqueeze(-1).double()
    n = count.clamp_min(1)[:, None, None]
    x = (x - (x * w).sum(1, keepdim=True) / n) * w
    y = (y - (y * w).sum(1, keepdim=True) / n) * w
    n_res = int(count.max()) if count.numel() else 0
    if n_res == 0:
        return out.to(pred_ca.dtype)
    seeds = sum(n_res - f + 1 for f in _fragment_lengths(n_res))  # the most one structure has
    group = max(1, TM_SEED_CHUNK // (seeds * n_res))
    for lo in range(0, mask.shape[0], group):
        part = slice(lo, lo + group)
        scored = count[part] > 0
        if scored.any():
            sub = torch.nonzero(scored).squeeze(-1) + lo
            out[sub] = _best_superposition_score(
                x[sub, :n_res], y[sub, :n_res], valid[sub, :n_res], count[sub]
            )
    return out.to(pred_ca.dtype)


class StructureMean(Metric):
    """Mean of a per-structure value over the set; subclasses define ``per_structure``."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @abstractmethod
    def per_structure(self, pred, true, mask) -> torch.Tensor:
        """Values (B,) for structures (B, L, 3, 3) with residue mask (B, L)."""

    def update(self, pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> None:
        """``pred``/``true`` (B, L, 3, 3) N/CA/C; ``mask`` (B, L) residues to score."""
        keep = mask.any(-1)  # a structure with nothing to score does not count
        if not keep.any():
            return
        values = self.per_structure(pred[keep].detach(), true[keep], mask[keep])
        self.total += values.double().sum()
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp_min(1)).float()


class BackboneRMSD(StructureMean):
    higher_is_better = False

    def per_structure(self, pred, true, mask):
        return backbone_rmsd(pred, true, mask)


class CALDDT(StructureMean):
    higher_is_better = True

    def per_structure(self, pred, true, mask):
        return lddt_ca(pred[:, :, 1], true[:, :, 1], mask)


class TMScore(StructureMean):
    higher_is_better = True

    def per_structure(self, pred, true, mask):
        return tm_score_ca(pred[:, :, 1], true[:, :, 1], mask)
