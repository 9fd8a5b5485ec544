"""Reconstruction losses of the structure tokenizer (all SE(3)-invariant, all masked).

- pairwise backbone-distance MSE over every N/CA/C pair, each squared error clamped at 25 A^2
  so a few badly placed atoms early in training do not dominate;
- backbone direction-vector loss: six bond/normal vectors per residue, MSE of all their pairwise
  dot products, clamped at 20;
- binned C-beta distogram cross-entropy, 64 bins on plain (not squared) distances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from provq_lightning.protein.geometry import pairwise_distances, virtual_cb

DISTOGRAM_FIRST_EDGE = 2.3125
DISTOGRAM_BIN_WIDTH = 0.3075


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mask.to(values.dtype)
    return (values * w).sum() / w.sum().clamp_min(1.0)


def backbone_distance_loss(
    pred: torch.Tensor,
    true: torch.Tensor,
    mask: torch.Tensor,
    clamp: float = 25.0,
    cutoff: float | None = None,
) -> torch.Tensor:
    """Clamped MSE of pairwise N/CA/C distances; ``pred``/``true`` (B, L, 3, 3).

    ``cutoff`` (A): only atom pairs closer than this in the true structure count, the pairs
    lDDT scores (15 A); None: every pair, as ESM3's loss.
    """
    b = pred.shape[0]
    p = pred.reshape(b, -1, 3)
    t = true.reshape(b, -1, 3)
    m = mask.unsqueeze(-1).expand(-1, -1, 3).reshape(b, -1)
    d_true = pairwise_distances(t)
    err = (pairwise_distances(p) - d_true).pow(2).clamp(max=clamp)
    pairs = m.unsqueeze(-1) & m.unsqueeze(-2)
    if cutoff is not None:
        pairs = pairs & (d_true < cutoff)
    return _masked_mean(err, pairs)


def direction_vectors(
    bb: torch.Tensor, mask: torch.Tensor, residue_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Six vectors per residue (B, L, 6, 3) and their validity (B, L, 6).

    N->CA, CA->C, C->N(next), -(N->CA x CA->C), (C(prev)->N) x N->CA, CA->C x C->N(next).
    Vectors that reach into a neighbour need it present and adjacent in the chain (no gap).
    """
    n, ca, c = bb.unbind(-2)
    v1 = ca - n
    v2 = c - ca
    zeros = torch.zeros_like(n[:, :1])
    to_next = torch.cat([n[:, 1:] - c[:, :-1], zeros], dim=1)  # C(i) -> N(i+1)
    from_prev = torch.cat([zeros, n[:, 1:] - c[:, :-1]], dim=1)  # C(i-1) -> N(i)
    v4 = -torch.cross(v1, v2, dim=-1)
    v5 = torch.cross(from_prev, v1, dim=-1)
    v6 = torch.cross(v2, to_next, dim=-1)
    vecs = torch.stack([v1, v2, to_next, v4, v5, v6], dim=-2)
    linked = mask[:, :-1] & mask[:, 1:] & (residue_index[:, 1:] - residue_index[:, :-1] == 1)
    false = torch.zeros_like(mask[:, :1])
    has_next = torch.cat([linked, false], dim=1)
    has_prev = torch.cat([false, linked], dim=1)
    valid = torch.stack([mask, mask, has_next, mask, has_prev, has_next], dim=-1)
    return vecs, valid


def backbone_direction_loss(
    pred: torch.Tensor,
    true: torch.Tensor,
    mask: torch.Tensor,
    residue_index: torch.Tensor,
    clamp: float = 20.0,
) -> torch.Tensor:
    """Clamped MSE of pairwise dot products of the six direction vectors of all residues."""
    b = pred.shape[0]
    vp, valid = direction_vectors(pred, mask, residue_index)
    vt, _ = direction_vectors(true, mask, residue_index)
    vp, vt, valid = vp.reshape(b, -1, 3), vt.reshape(b, -1, 3), valid.reshape(b, -1)
    err = (vp @ vp.transpose(1, 2) - vt @ vt.transpose(1, 2)).pow(2).clamp(max=clamp)
    return _masked_mean(err, valid.unsqueeze(-1) & valid.unsqueeze(-2))


def distogram_bins(distances: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Bin ids of plain distances: [0, 2.3125), then 0.3075 A wide, the last bin open-ended."""
    edges = DISTOGRAM_FIRST_EDGE + DISTOGRAM_BIN_WIDTH * torch.arange(
        bins - 1, device=distances.device, dtype=distances.dtype
    )
    return torch.bucketize(distances, edges, right=True)


def distogram_loss(logits: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the C-beta distogram; ``logits`` (B, L, L, bins), ``true`` (B, L, 3, 3)."""
    cb = virtual_cb(*true.unbind(-2))
    target = distogram_bins(pairwise_distances(cb), logits.shape[-1])
    ce = F.cross_entropy(logits.permute(0, 3, 1, 2).float(), target, reduction="none")
    return _masked_mean(ce, mask.unsqueeze(-1) & mask.unsqueeze(-2))


def windowed_ca_distance_loss(
    pred_ca: torch.Tensor,
    true_ca: torch.Tensor,
    mask: torch.Tensor,
    window: int = 8,
    clamp: float = 25.0,
) -> torch.Tensor:
    """Clamped MSE of CA-CA distances between residues at most ``window`` apart along the
    chain (the short-range pairs that dominate lDDT); ``pred_ca``/``true_ca`` (B, L, 3).
    O(L x window), unlike the all-pairs loss."""
    errors, weights = [], []
    for k in range(1, min(window, pred_ca.shape[1] - 1) + 1):
        d_pred = (pred_ca[:, k:] - pred_ca[:, :-k]).norm(dim=-1)
        d_true = (true_ca[:, k:] - true_ca[:, :-k]).norm(dim=-1)
        errors.append((d_pred - d_true).pow(2).clamp(max=clamp).flatten())
        weights.append((mask[:, k:] & mask[:, :-k]).flatten())
    if not errors:
        return pred_ca.new_zeros(())
    return _masked_mean(torch.cat(errors), torch.cat(weights))
