"""Structure reconstruction metrics: per-structure values averaged over the whole set.

Both metrics keep a (sum, count) pair summed across DDP ranks, so the reported value is the
mean over every structure of the validation/test set, not a mean of per-batch means.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torchmetrics import Metric

from provq_lightning.protein.geometry import kabsch_rmsd

LDDT_CUTOFF = 15.0
LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)


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
