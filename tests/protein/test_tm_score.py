"""The standard CA TM-score (``tm_score_ca``): the superposition search that TM-score runs for a
fixed residue pairing, checked against TM-align (``tmtools``) on real CATH domains that are
hinged (second half turned 70 degrees about the middle residue), noisy, or unchanged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from provq_lightning.protein.chain import AMINO_ACIDS
from provq_lightning.protein.geometry import random_rotation
from provq_lightning.protein.metrics import TMScore, tm_score_ca, tm_score_kabsch_ca
from provq_lightning.protein.parsing import parse_structure
from tests.protein.helpers import need_shared_data

DOMAINS = ("1a04A02", "1au7A02", "1c0pA01", "1fseB00", "1o7iB00", "3uljB00")
HINGE_DEGREES = 70.0
NOISE = 1.5  # Angstrom, per coordinate


def read_domain(name: str) -> tuple[np.ndarray, str]:
    """CA coordinates (L, 3) float64 and one-letter sequence of the residues that have a CA."""
    chain = parse_structure(need_shared_data() / "cath_domains" / f"{name}.pdb").chains[0]
    has_ca = np.isfinite(chain.coords[:, 1]).all(-1)
    seq = "".join((AMINO_ACIDS + "X")[a] for a in chain.aatype[has_ca])
    return chain.coords[has_ca, 1].astype(np.float64), seq


def hinged(ca: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``ca`` with the residues after the middle one turned ``HINGE_DEGREES`` about it (random
    axis): two rigid halves, each intact."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = math.radians(HINGE_DEGREES)
    rot = np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross
    mid = len(ca) // 2
    out = ca.copy()
    out[mid:] = (ca[mid:] - ca[mid]) @ rot.T + ca[mid]
    return out


@pytest.fixture(scope="module")
def cases() -> list[tuple[str, np.ndarray, np.ndarray, str]]:
    """(label, prediction, truth, sequence): each domain hinged, noisy and unchanged, the
    prediction moved rigidly as a model's output would be."""
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    out = []
    for name in DOMAINS:
        true, seq = read_domain(name)
        preds = {
            "hinge": hinged(true, rng),
            "noise": true + rng.normal(scale=NOISE, size=true.shape),
            "identity": true,
        }
        for kind, pred in preds.items():
            rot = random_rotation(gen).numpy()
            out.append((f"{name} {kind}", pred @ rot.T + np.array([12.0, -4.0, 7.0]), true, seq))
    return out


def padded(arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Lmax, 3) float32 with junk in the padding (it must not count), and the mask."""
    n = max(len(a) for a in arrays)
    coords = torch.full((len(arrays), n, 3), 321.0)
    mask = torch.zeros(len(arrays), n, dtype=torch.bool)
    for i, a in enumerate(arrays):
        coords[i, : len(a)] = torch.from_numpy(a).float()
        mask[i, : len(a)] = True
    return coords, mask


def batch_scores(cases) -> dict[str, float]:
    pred, mask = padded([p for _, p, _, _ in cases])
    true, _ = padded([t for _, _, t, _ in cases])
    return dict(zip([c[0] for c in cases], tm_score_ca(pred, true, mask).tolist(), strict=True))


def test_a_hinge_motion_scores_the_half_that_still_fits_not_a_compromise(cases):
    """One least-squares fit over every residue (``tm_score_kabsch_ca``, what ``tm_score_ca``
    used to be) reads 0.2-0.4 on these hinged domains; the standard search superposes one half
    and scores above 0.5."""
    hinges = [c for c in cases if c[0].endswith("hinge")]
    pred, mask = padded([p for _, p, _, _ in hinges])
    true, _ = padded([t for _, _, t, _ in hinges])
    standard = tm_score_ca(pred, true, mask)
    kabsch = tm_score_kabsch_ca(pred, true, mask)
    assert (standard > 0.5).all(), standard.tolist()
    assert (standard > kabsch + 0.15).all(), (standard.tolist(), kabsch.tolist())


def test_identity_scores_one_and_noise_never_scores_below_one_least_squares_fit(cases):
    scores = batch_scores(cases)
    for label, pred, true, _ in cases:
        if label.endswith("identity"):
            assert scores[label] == pytest.approx(1.0, abs=1e-6), label
        p, t = torch.from_numpy(pred)[None], torch.from_numpy(true)[None]
        kabsch = tm_score_kabsch_ca(p, t, torch.ones(1, len(true), dtype=torch.bool)).item()
        assert scores[label] >= kabsch - 1e-6, label


def test_masked_residues_are_left_out_wherever_they_are():
    """Residues off the mask (here every fifth, filled with junk) score as if they were not in
    the chain at all: the search runs over the masked residues closed up."""
    true, _ = read_domain("1fseB00")
    pred = hinged(true, np.random.default_rng(1))
    keep = np.arange(len(true)) % 5 != 2
    junk_pred, junk_true = pred.copy(), true.copy()
    junk_pred[~keep], junk_true[~keep] = 500.0, -500.0
    full = tm_score_ca(torch.from_numpy(junk_pred)[None], torch.from_numpy(junk_true)[None],
                       torch.from_numpy(keep)[None])
    closed = tm_score_ca(torch.from_numpy(pred[keep])[None], torch.from_numpy(true[keep])[None],
                         torch.ones(1, int(keep.sum()), dtype=torch.bool))
    assert full.item() == pytest.approx(closed.item(), abs=1e-9)
    assert closed.item() > 0.5


def test_a_mirrored_chain_scores_low_because_only_rotations_are_searched():
    """A domain against its mirror image: a search that allowed reflections would find 1.0."""
    need_shared_data()
    true, _ = read_domain("1o7iB00")
    mirror = true * np.array([1.0, 1.0, -1.0])
    mask = torch.ones(1, len(true), dtype=torch.bool)
    tm = tm_score_ca(torch.from_numpy(mirror)[None], torch.from_numpy(true)[None], mask).item()
    assert tm < 0.5


def test_empty_structures_score_zero_and_the_metric_averages_per_structure(cases):
    hinge = cases[0]
    pred, mask = padded([hinge[1], hinge[1]])
    true, _ = padded([hinge[2], hinge[2]])
    mask[1] = False
    scores = tm_score_ca(pred, true, mask)
    assert scores[1].item() == 0.0 and scores[0].item() > 0.5
    pred_bb, true_bb = torch.zeros(*pred.shape[:2], 3, 3), torch.zeros(*true.shape[:2], 3, 3)
    pred_bb[:, :, 1], true_bb[:, :, 1] = pred, true  # the metric reads the CA slot
    metric = TMScore()
    metric.update(pred_bb, true_bb, mask)  # the empty structure does not count
    assert metric.compute().item() == pytest.approx(scores[0].item(), rel=1e-6)


@pytest.fixture(scope="module")
def tm_align():
    # 0.3 added the fixed-alignment argument.
    tmtools = pytest.importorskip("tmtools", minversion="0.3", reason="tmtools >= 0.3 "
                                  "(TM-align) is not installed: pip install -e '.[test]'")
    return tmtools.tm_align


def test_equals_tm_align_given_the_same_residue_pairing(cases, tm_align):
    """TM-align run on the identity pairing (its -I mode) does exactly this search, so the
    values agree to rounding: hinge, noise, identity and mirror image alike."""
    mirrors = [(f"{label} mirrored", true * np.array([1.0, 1.0, -1.0]), true, seq)
               for label, _, true, seq in cases if label.endswith("identity")]
    scores = batch_scores(cases + mirrors)
    for label, pred, true, seq in cases + mirrors:
        want = tm_align(pred, true, seq, seq, [seq, seq]).tm_norm_chain2
        assert scores[label] == pytest.approx(want, abs=1e-3), label


def aligned_pairs(seq_x: str, seq_y: str) -> list[tuple[int, int]]:
    """Residue pairs (i in x, j in y) of a gapped alignment."""
    pairs, i, j = [], 0, 0
    for a, b in zip(seq_x, seq_y, strict=True):
        if a != "-" and b != "-":
            pairs.append((i, j))
        i, j = i + (a != "-"), j + (b != "-")
    return pairs


def test_agrees_with_tm_align_searching_its_own_alignment(cases, tm_align):
    """TM-align normalised by the true chain, with its own alignment. Where that alignment is
    the identity pairing (unchanged domains, most noisy ones) the values agree to 0.02. On a
    hinge TM-align leaves the identity pairing (drops pairs at the hinge, shifts some of the
    moved half by a few residues) and may score up to about 0.05 higher; never much lower,
    since it searches over pairings that include ours."""
    scores = batch_scores(cases)
    compared = []
    for label, pred, true, seq in cases:
        result = tm_align(pred, true, seq, seq)
        pairs = aligned_pairs(result.seqxA, result.seqyA)
        if pairs == [(i, i) for i in range(len(true))]:
            assert result.tm_norm_chain2 == pytest.approx(scores[label], abs=0.02), label
            compared.append(label)
        else:
            assert result.tm_norm_chain2 > scores[label] - 0.02, label
    assert sum(not label.endswith("hinge") for label in compared) >= len(DOMAINS) * 3 // 2
