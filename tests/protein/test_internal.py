"""CA internal coordinates and NeRF: exact round trip, the hand kept, chain breaks, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from provq_lightning.protein.geometry import kabsch_rmsd, random_rotation
from provq_lightning.protein.internal import (
    CA_CA,
    ca_internal,
    local_offsets,
    nerf_ca,
    place_n_c,
    prefix_products,
    step_rotations,
    trace_frames,
)
from provq_lightning.protein.losses import windowed_ca_distance_loss
from provq_lightning.protein.metrics import lddt_ca, tm_score_ca
from tests.protein.helpers import chain_batch, need_shared_data


def _degrees(unit: torch.Tensor) -> torch.Tensor:
    return torch.rad2deg(torch.atan2(unit[..., 1], unit[..., 0]))


def _lysozyme() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    need_shared_data()
    batch = chain_batch(("1aki.pdb",))
    return batch["coords"][:, :, :3].double(), batch["residue_mask"], batch["residue_index"]


def test_nerf_rebuilds_a_trace_with_ideal_steps_exactly_and_with_its_hand():
    bb, mask, _ = _lysozyme()
    ca = bb[:, :, 1]
    theta, tau, *_ = ca_internal(ca, mask)
    rebuilt = nerf_ca(theta, tau)
    # Real CA-CA steps vary around 3.8 A, so the rebuilt trace is close, not equal; after a
    # proper rotation (Kabsch never reflects) it lies on the input.
    assert float(kabsch_rmsd(rebuilt, ca, mask)) < 0.5
    assert float(lddt_ca(rebuilt, ca, mask)) > 0.97
    assert float(tm_score_ca(rebuilt, ca, mask)) > 0.97
    # Its own angles come back exactly (it is a trace of 3.8 A steps).
    theta2, tau2, ok_theta, ok_tau = ca_internal(rebuilt, mask)
    assert torch.allclose(theta2[ok_theta], theta[ok_theta], atol=1e-6)
    assert torch.allclose(tau2[ok_tau], tau[ok_tau], atol=1e-6)
    steps = (rebuilt[:, 1:] - rebuilt[:, :-1]).norm(dim=-1)
    assert torch.allclose(steps, torch.full_like(steps, CA_CA))


def test_internal_coordinates_are_rigid_invariant_and_see_a_mirror():
    bb, mask, _ = _lysozyme()
    ca = bb[:, :, 1]
    theta, tau, _, ok = ca_internal(ca, mask)
    moved = ca @ random_rotation(torch.Generator().manual_seed(0)).T + torch.tensor([5.0, -3, 2])
    theta_m, tau_m, *_ = ca_internal(moved, mask)
    assert torch.allclose(theta_m, theta, atol=1e-9) and torch.allclose(tau_m, tau, atol=1e-9)
    mirrored = ca * torch.tensor([1.0, 1.0, -1.0], dtype=ca.dtype)
    theta_r, tau_r, *_ = ca_internal(mirrored, mask)
    assert torch.allclose(theta_r, theta, atol=1e-9)  # a bond angle has no hand
    assert torch.allclose(tau_r[..., 1][ok], -tau[..., 1][ok], atol=1e-9)  # a dihedral has
    # lDDT cannot tell the mirror apart; a proper superposition can.
    assert float(lddt_ca(mirrored, ca, mask)) == pytest.approx(1.0)
    assert float(tm_score_ca(mirrored, ca, mask)) < 0.5
    assert float(kabsch_rmsd(mirrored, ca, mask)) > 5.0


def test_alpha_helix_dihedrals_are_positive_in_a_real_protein():
    # 1aki residues 5-14 form an alpha helix (lysozyme helix A): CA dihedrals near +50 deg.
    bb, mask, _ = _lysozyme()
    _, tau, _, ok = ca_internal(bb[:, :, 1], mask)
    helix = _degrees(tau[0, 5:13])
    assert ok[0, 5:13].all()
    assert ((helix > 30) & (helix < 70)).all(), helix


def test_prefix_products_equal_the_sequential_product():
    gen = torch.Generator().manual_seed(1)
    angles = torch.randn(3, 37, 4, generator=gen, dtype=torch.float64)
    m = step_rotations(angles[..., :2], angles[..., 2:])
    fast = prefix_products(m)
    running = m[:, 0]
    for k in range(1, m.shape[1]):
        running = running @ m[:, k]
        assert torch.allclose(fast[:, k], running, atol=1e-10)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(m.transpose(-1, -2) @ m, eye.expand_as(m), atol=1e-10)
    assert torch.allclose(torch.linalg.det(m), torch.ones(3, 37, dtype=torch.float64))


def test_chain_breaks_invalidate_the_angles_that_span_them():
    bb, mask, _ = _lysozyme()
    ca = bb[:, :, 1].clone()
    ca[:, 50:] += torch.tensor([0.0, 0.0, 6.0], dtype=ca.dtype)  # a gap between 49 and 50
    _, _, ok_theta, ok_tau = ca_internal(ca, mask)
    assert not ok_theta[0, 49] and not ok_theta[0, 50] and ok_theta[0, 48] and ok_theta[0, 51]
    assert not ok_tau[0, 48:51].any() and ok_tau[0, 47] and ok_tau[0, 51]


def test_nerf_and_local_distance_loss_are_differentiable():
    bb, mask, _ = _lysozyme()
    ca = bb[:, :, 1]
    theta, tau, *_ = ca_internal(ca, mask)
    noisy_tau = (tau + 0.1 * torch.randn_like(tau, dtype=tau.dtype)).requires_grad_(True)
    loss = windowed_ca_distance_loss(nerf_ca(theta, noisy_tau), ca, mask, window=6)
    loss.backward()
    assert loss > 0 and torch.isfinite(noisy_tau.grad).all() and noisy_tau.grad.abs().sum() > 0
    assert float(windowed_ca_distance_loss(ca, ca, mask)) == 0.0


def test_n_and_c_come_back_from_their_offsets_in_the_trace_frames():
    bb, mask, _ = _lysozyme()
    offsets = local_offsets(bb, trace_frames(bb[:, :, 1]))
    rebuilt = place_n_c(bb[:, :, 1], offsets)
    assert torch.allclose(rebuilt[mask], bb[mask], atol=1e-9)
    assert math.isclose(float((bb[:, :, 0] - bb[:, :, 1])[mask].norm(dim=-1).mean()), 1.46,
                        abs_tol=0.02)
