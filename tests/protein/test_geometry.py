"""Frames, ideal backbone placement, Kabsch superposition, losses and structure metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from provq_lightning.protein.geometry import (
    CA_C,
    N_CA,
    N_CA_C_DEG,
    backbone_with_oxygen,
    frames_from_backbone,
    invert_apply_frame,
    kabsch,
    kabsch_rmsd,
    place_backbone,
    random_rotation,
    virtual_cb,
)
from provq_lightning.protein.losses import (
    backbone_direction_loss,
    backbone_distance_loss,
    direction_vectors,
    distogram_bins,
    distogram_loss,
)
from provq_lightning.protein.metrics import CALDDT, BackboneRMSD, backbone_rmsd, lddt_ca
from provq_lightning.protein.parsing import parse_structure
from tests.protein.helpers import EDGE


@pytest.fixture(scope="module")
def backbone(proteins_dir) -> torch.Tensor:
    """1aki N/CA/C, (1, L, 3, 3), centred."""
    chain = parse_structure(EDGE / "1aki.pdb").chains[0]
    bb = torch.from_numpy(chain.coords[:, :3]).double()
    return (bb - bb[:, 1].mean(0)).unsqueeze(0)


def rigid(x: torch.Tensor, seed: int = 0, shift=(30.0, -20.0, 50.0)) -> torch.Tensor:
    rot = random_rotation(torch.Generator().manual_seed(seed)).to(x)
    return x @ rot.T + torch.tensor(shift, dtype=x.dtype)


def test_frames_are_rotations_and_ideal_backbone_has_ideal_geometry(backbone):
    rot, trans = frames_from_backbone(*backbone.unbind(-2))
    eye = torch.eye(3, dtype=rot.dtype)
    assert torch.allclose(rot.transpose(-1, -2) @ rot, eye.expand_as(rot), atol=1e-10)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(rot.shape[:-2], dtype=rot.dtype))
    # Real residues seen from their own frame: CA at the origin, C on +x, N in the xy-plane.
    local = invert_apply_frame(rot, trans, backbone)
    assert local[..., 1, :].abs().max() < 1e-9
    assert local[..., 2, 1:].abs().max() < 1e-9 and (local[..., 2, 0] > 0).all()
    assert local[..., 0, 2].abs().max() < 1e-9 and (local[..., 0, 1] > 0).all()
    ideal = place_backbone(rot, trans)
    n, ca, c = ideal.unbind(-2)
    assert torch.allclose((n - ca).norm(dim=-1), torch.tensor(N_CA, dtype=n.dtype))
    assert torch.allclose((c - ca).norm(dim=-1), torch.tensor(CA_C, dtype=n.dtype))
    cos = ((n - ca) * (c - ca)).sum(-1) / (N_CA * CA_C)
    assert torch.allclose(cos, torch.tensor(math.cos(math.radians(N_CA_C_DEG)), dtype=n.dtype))
    # Ideal geometry is close to real geometry: under 0.1 A RMSD per residue on average.
    assert (ideal - backbone).norm(dim=-1).pow(2).mean().sqrt() < 0.1


def test_virtual_cb_and_oxygen_are_plausible(backbone):
    n, ca, c = backbone[0].unbind(-2)
    ca_cb = (virtual_cb(n, ca, c) - ca).norm(dim=-1)
    assert (ca_cb - 1.53).abs().median() < 0.05
    full = backbone_with_oxygen(backbone[0])
    assert full.shape == (backbone.shape[1], 4, 3)
    assert ((full[:, 3] - full[:, 2]).norm(dim=-1) - 1.231).abs().max() < 1e-6
    coords = torch.from_numpy(parse_structure(EDGE / "1aki.pdb").chains[0].coords).double()
    true_o = coords[:, 3] - coords[:, 1].mean(0)  # same centring as the fixture
    assert (full[:-1, 3] - true_o[:-1]).norm(dim=-1).median() < 0.2


def test_kabsch_recovers_a_rigid_motion_and_never_mirrors(backbone):
    x = backbone.reshape(1, -1, 3)
    y = rigid(x)
    rot, trans = kabsch(x, y)
    assert torch.allclose(x @ rot[0].T + trans[0], y, atol=1e-8)
    assert kabsch_rmsd(x, y).item() < 1e-8
    mirrored = y * torch.tensor([-1.0, 1.0, 1.0], dtype=y.dtype)
    rot_m, _ = kabsch(x, mirrored)
    assert torch.linalg.det(rot_m).item() == pytest.approx(1.0)
    assert kabsch_rmsd(x, mirrored).item() > 1.0
    # Masked atoms do not count: a wild outlier under a False mask leaves RMSD 0.
    noisy = y.clone()
    noisy[0, 5] += 100.0
    mask = torch.ones(1, x.shape[1], dtype=torch.bool)
    mask[0, 5] = False
    assert kabsch_rmsd(x, noisy, mask).item() < 1e-8


def test_losses_are_invariant_zero_at_truth_and_clamped(backbone):
    b = backbone.float()
    mask = torch.ones(b.shape[:2], dtype=torch.bool)
    index = torch.arange(b.shape[1]).unsqueeze(0)
    moved = rigid(b.reshape(1, -1, 3)).reshape(b.shape)
    assert backbone_distance_loss(moved, b, mask).item() < 1e-6
    assert backbone_direction_loss(moved, b, mask, index).item() < 1e-5
    wrong = b * 3.0
    assert 0 < backbone_distance_loss(wrong, b, mask).item() <= 25.0
    assert 0 < backbone_direction_loss(wrong, b, mask, index).item() <= 20.0
    # The distogram loss is a proper cross-entropy: confident correct logits give ~0.
    n, ca, c = b.unbind(-2)
    cb = virtual_cb(n, ca, c)
    target = distogram_bins(torch.cdist(cb, cb))
    logits = torch.nn.functional.one_hot(target, 64).float() * 50.0
    assert distogram_loss(logits, b, mask).item() < 1e-6


def test_distance_cutoff_scores_only_the_pairs_close_in_the_input(backbone):
    true = backbone.float().clone()
    true[:, -1] += 100.0  # in the input, the last residue lies ~100 A from every other
    pred = true.clone()
    pred[:, -1] += 10.0  # the prediction gets only its (distant) pairs wrong
    mask = torch.ones(true.shape[:2], dtype=torch.bool)
    assert backbone_distance_loss(pred, true, mask) > 0
    assert backbone_distance_loss(pred, true, mask, cutoff=15.0).item() < 1e-6
    assert backbone_distance_loss(pred, true, mask, cutoff=1e4) == backbone_distance_loss(
        pred, true, mask
    )


def test_distogram_bins_use_plain_distances():
    d = torch.tensor([0.0, 2.3, 2.3125, 3.0, 21.0, 21.3775, 40.0])
    assert distogram_bins(d).tolist() == [0, 0, 1, 3, 61, 63, 63]


def test_direction_vectors_stop_at_chain_breaks_and_missing_residues():
    bb = torch.randn(1, 6, 3, 3)
    mask = torch.tensor([[True, True, True, False, True, True]])
    index = torch.tensor([[0, 1, 2, 3, 4, 9]])  # gap between 4 and 9
    _, valid = direction_vectors(bb, mask, index)
    has_next = valid[0, :, 2].tolist()
    has_prev = valid[0, :, 4].tolist()
    assert has_next == [True, True, False, False, False, False]
    assert has_prev == [False, True, True, False, False, False]
    assert valid[0, 3].sum() == 0


def test_rmsd_and_lddt_values(backbone):
    b = backbone.float()
    mask = torch.ones(b.shape[:2], dtype=torch.bool)
    moved = rigid(b.reshape(1, -1, 3)).reshape(b.shape)
    assert backbone_rmsd(moved, b, mask).item() < 1e-3
    assert lddt_ca(moved[:, :, 1], b[:, :, 1], mask).item() == pytest.approx(1.0)
    # A uniform 3 A error on every CA pair distance fails the 0.5/1/2 A thresholds only.
    stretched = b * 1.0
    gen = torch.Generator().manual_seed(0)
    noisy = stretched + 0.1 * torch.randn(b.shape, generator=gen)
    value = lddt_ca(noisy[:, :, 1], b[:, :, 1], mask).item()
    assert 0.8 < value < 1.0
    rmsd = backbone_rmsd(noisy, b, mask).item()
    assert 0.1 < rmsd < 0.25  # ~0.1 * sqrt(3) for isotropic noise


def test_structure_metrics_average_over_structures_not_batches(backbone):
    b = backbone.float()
    mask = torch.ones(b.shape[:2], dtype=torch.bool)
    gen = torch.Generator().manual_seed(1)
    preds = [b + s * torch.randn(b.shape, generator=gen) for s in (0.0, 0.5, 1.0)]
    per = [backbone_rmsd(p, b, mask).item() for p in preds]
    metric = BackboneRMSD()
    metric.update(preds[0], b, mask)  # a batch of one
    metric.update(torch.cat(preds[1:]), torch.cat([b, b]), torch.cat([mask, mask]))  # of two
    assert metric.compute().item() == pytest.approx(np.mean(per), rel=1e-5)
    lddt = CALDDT()
    lddt.update(b, b, mask)
    lddt.update(b, b, torch.zeros_like(mask))  # nothing to score: not counted
    assert lddt.compute().item() == pytest.approx(1.0)
