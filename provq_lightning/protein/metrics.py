"""Structure reconstruction metrics: per-structure values averaged over the whole set.

Backbone RMSD, CA lDDT and CA TM-score, each equal to biotite's (``superimpose`` + ``rmsd``,
``lddt``, ``tm_score``; ``tests/protein/test_metric_parity.py``), batched on the device. Every
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


def tm_score_ca(pred_ca: torch.Tensor, true_ca: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CA TM-score per structure (B,) in [0, 1], normalised by the true structure's length.

    ``pred_ca`` is superimposed onto ``true_ca`` (B, L, 3) by Kabsch on the masked CA atoms,
    then ``mean_i 1 / (1 + (d_i / d0(L))^2)`` over the L masked residues: biotite's
    ``tm_score(true, superimposed, i, i, reference_length="reference")``. Residues correspond
    one to one (a reconstruction), so no alignment search is needed; the least-squares
    superposition can only give a TM-score at or below TM-align's, which searches for the
    superposition that maximises it.
    """
    rot, trans = kabsch(pred_ca.double(), true_ca.double(), mask)
    moved = torch.einsum("bij,bpj->bpi", rot, pred_ca.double()) + trans[:, None]
    dist = (moved - true_ca.double()).norm(dim=-1)
    length = mask.sum(-1)
    d0 = tm_d0(length).unsqueeze(-1)
    per_res = (1.0 / (1.0 + (dist / d0).pow(2))) * mask.double()
    return (per_res.sum(-1) / length.clamp_min(1)).to(pred_ca.dtype)


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
