"""Decoded structures keep the hand of the input: lDDT and distance losses cannot see a mirror,
so these checks do. Each check is shown to fail on a decoder that mirrors."""

from __future__ import annotations

import math

import pytest
import torch

from provq_lightning.protein import floor, internal_decoder
from provq_lightning.protein.internal import ca_internal, nerf_ca
from provq_lightning.protein.internal_decoder import InternalCoordinateDecoder
from provq_lightning.protein.metrics import tm_score_ca
from tests.protein.helpers import chain_batch, need_shared_data

CHAINS = ("1aki.pdb", "1k6p.pdb", "3o5r.pdb")


def mirrored_nerf(theta: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """A decoder bug that mirrors: the trace reflected through the xy-plane."""
    return nerf_ca(theta, tau) * torch.tensor([1.0, 1.0, -1.0], dtype=theta.dtype)


def assert_keeps_hand(pred_ca: torch.Tensor, true_ca: torch.Tensor, mask: torch.Tensor) -> None:
    """The decoded trace has the input's hand: the sign of its CA dihedrals agrees where the
    input's are clearly signed, alpha-helical residues decode right-handed (positive tau), and
    its first 40 residues superimpose (proper rotation only) better than their mirror image
    (over whole chains small angle errors add up, whichever the hand)."""
    _, tau_true, _, ok = ca_internal(true_ca, mask)
    _, tau_pred, _, _ = ca_internal(pred_ca, mask)
    clear = ok & (tau_true[..., 1].abs() > math.sin(math.radians(20)))
    agree = (torch.sign(tau_pred[..., 1]) == torch.sign(tau_true[..., 1]))[clear]
    assert agree.double().mean() > 0.8, f"dihedral signs agree at {agree.double().mean():.2f}"
    deg = torch.rad2deg(torch.atan2(tau_true[..., 1], tau_true[..., 0]))
    helix = ok & (deg > 30) & (deg < 70)
    assert helix.sum() > 10
    right = tau_pred[..., 1][helix] > 0
    assert right.double().mean() > 0.9, f"helical residues right-handed: {right.double().mean()}"
    mirror = pred_ca * torch.tensor([1.0, 1.0, -1.0], dtype=pred_ca.dtype)
    head = mask & (torch.arange(mask.shape[1]) < 40)
    tm, tm_mirror = tm_score_ca(pred_ca, true_ca, head), tm_score_ca(mirror, true_ca, head)
    assert (tm > tm_mirror + 0.05).all(), f"TM {tm.tolist()} vs mirror {tm_mirror.tolist()}"


def _floor_decoding() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    need_shared_data()
    batch = chain_batch(CHAINS)
    centres = floor.fit_codebook([batch], num_codes=64, seed=0).double()
    true = batch["coords"][:, :, :3].double()
    mask = batch["residue_mask"]
    feats, valid = floor.angle_features(true[:, :, 1], mask)
    pred = floor.decode_floor_codes(floor.assign_codes(feats, valid, centres), centres)
    return pred[:, :, 1], true[:, :, 1], mask


def test_floor_tokens_decode_with_the_input_hand():
    assert_keeps_hand(*_floor_decoding())


def test_hand_check_fails_on_a_floor_decoder_that_mirrors(monkeypatch):
    monkeypatch.setattr(floor, "nerf_ca", mirrored_nerf)
    with pytest.raises(AssertionError, match="dihedral signs agree"):
        assert_keeps_hand(*_floor_decoding())


def _helix_decoder() -> InternalCoordinateDecoder:
    """The learned head with its angle output pinned to an ideal alpha helix (CA bond angle
    91 deg, CA dihedral +50 deg), whatever the codes."""
    dec = InternalCoordinateDecoder(code_dim=8, dim=16, layers=1)
    theta, tau = math.radians(91.0), math.radians(50.0)
    with torch.no_grad():
        dec.angle_head.weight.zero_()
        dec.angle_head.bias.copy_(torch.tensor([math.cos(theta), math.sin(theta),
                                                math.cos(tau), math.sin(tau)]))
    return dec


def _decoded_helix_handedness() -> torch.Tensor:
    """(b1 x b2) . b3 of consecutive CA bonds of the decoded trace: > 0 for a right-handed
    helix."""
    z = torch.randn(2, 24, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 24, dtype=torch.bool)
    ca = _helix_decoder()(z, mask, mask).backbone[:, :, 1]
    b = ca[:, 1:] - ca[:, :-1]
    return (torch.cross(b[:, :-2], b[:, 1:-1], dim=-1) * b[:, 2:]).sum(-1)


def test_learned_head_decodes_right_handed_helices():
    assert (_decoded_helix_handedness() > 0).all()


def test_helix_check_fails_on_a_learned_head_that_mirrors(monkeypatch):
    monkeypatch.setattr(internal_decoder, "nerf_ca", mirrored_nerf)
    assert (_decoded_helix_handedness() < 0).all()
