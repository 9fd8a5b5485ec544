"""provq's batched structure metrics equal biotite's on real structures: backbone RMSD after
superposition (``superimpose`` + ``rmsd``), CA lDDT (``lddt``) and the CA TM-score of the
least-squares superposition (``tm_score`` after ``superimpose``; ``tm_score_kabsch_ca``), for a
structure against a perturbed copy of itself and for two different chains. The standard
TM-score (``tm_score_ca``, its own superposition search) is checked against TM-align in
``test_tm_score.py``; here it is only held at or above the least-squares value."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from provq_lightning.protein.metrics import (
    CALDDT,
    BackboneRMSD,
    TMScore,
    backbone_rmsd,
    lddt_ca,
    tm_score_ca,
    tm_score_kabsch_ca,
)
from tests.protein.helpers import need_shared_data

struc = pytest.importorskip("biotite.structure")
pdb = pytest.importorskip("biotite.structure.io.pdb")
if not hasattr(struc, "tm_score"):
    pytest.skip("this biotite has no tm_score (needs biotite >= 0.41)", allow_module_level=True)

BACKBONE = ("N", "CA", "C")


def read_backbone(path: Path) -> np.ndarray:
    """N/CA/C coordinates (L, 3, 3) of the residues with all three atoms, read by biotite alone
    (independent of provq's parser)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "elements were guessed" for CATH files
        atoms = pdb.PDBFile.read(str(path)).get_structure(model=1, altloc="occupancy")
    atoms = atoms[struc.filter_amino_acids(atoms) & ~atoms.hetero]
    atoms = atoms[atoms.chain_id == atoms.chain_id[0]]
    residues = []
    for residue in struc.residue_iter(atoms):
        found = [residue[residue.atom_name == name] for name in BACKBONE]
        if all(len(a) == 1 for a in found):
            residues.append(np.stack([a.coord[0] for a in found]))
    return np.asarray(residues, dtype=np.float64)


def atom_array(coords: np.ndarray, names: tuple[str, ...]) -> struc.AtomArray:
    """A peptide AtomArray (alanines) holding ``coords`` (L, len(names), 3) as ``names``."""
    n_res, per = coords.shape[:2]
    array = struc.AtomArray(n_res * per)
    array.coord = coords.reshape(-1, 3)
    array.res_id = np.repeat(np.arange(1, n_res + 1), per)
    array.res_name = np.full(n_res * per, "ALA")
    array.atom_name = np.tile(np.array(names), n_res)
    array.element = np.array([name[0] for name in names] * n_res)
    array.chain_id = np.full(n_res * per, "A")
    return array


def biotite_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Backbone RMSD, CA lDDT and CA TM-score of ``pred`` against ``true`` (L, 3, 3)."""
    flat_true, flat_pred = true.reshape(-1, 3), pred.reshape(-1, 3)
    fitted, _ = struc.superimpose(flat_true, flat_pred)
    ref_ca = atom_array(true[:, 1:2], ("CA",))
    sub_ca = atom_array(pred[:, 1:2], ("CA",))
    fitted_ca, _ = struc.superimpose(ref_ca, sub_ca)
    index = np.arange(len(true))
    return {
        "rmsd": float(struc.rmsd(flat_true, fitted)),
        # provq's CA lDDT is the mean of per-residue scores (biotite's "residue" aggregation),
        # not the pooled fraction over all pairs ("all").
        "lddt": float(np.mean(struc.lddt(ref_ca, sub_ca, aggregation="residue"))),
        "tm": struc.tm_score(ref_ca, fitted_ca, index, index, reference_length="reference"),
    }


def pad_batch(structures: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Lmax, 3, 3) float32 with junk in the padding, and the residue mask (B, Lmax)."""
    n = max(len(s) for s in structures)
    coords = torch.full((len(structures), n, 3, 3), 123.0)  # padding must not count
    mask = torch.zeros(len(structures), n, dtype=torch.bool)
    for i, s in enumerate(structures):
        coords[i, : len(s)] = torch.from_numpy(s).float()
        mask[i, : len(s)] = True
    return coords, mask


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, prediction, truth): perturbed copies (small and large noise, moved rigidly) and
    two pairs of different CATH domains of equal length."""
    root = need_shared_data()
    rng = np.random.default_rng(0)
    out = []
    for name, noise in (("1aki.pdb", 0.7), ("1c0pA01.pdb", 3.0)):
        sub = "biotite_edge_cases" if name == "1aki.pdb" else "cath_domains"
        true = read_backbone(root / sub / name)
        rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        rot *= np.sign(np.linalg.det(rot))
        pred = (true + rng.normal(scale=noise, size=true.shape)) @ rot.T + 10.0
        out.append((f"{name} + {noise} A noise", pred, true))
    for a, b in (("1fseB00.pdb", "1zjaA02.pdb"), ("3uljB00.pdb", "4gs3A00.pdb")):
        true = read_backbone(root / "cath_domains" / a)
        pred = read_backbone(root / "cath_domains" / b)
        n = min(len(true), len(pred))
        out.append((f"{b} vs {a}", pred[:n], true[:n]))
    return out


def test_rmsd_lddt_tm_score_match_biotite_per_structure_in_one_padded_batch(pairs):
    expected = [biotite_metrics(pred, true) for _, pred, true in pairs]
    pred, mask = pad_batch([p for _, p, _ in pairs])
    true, _ = pad_batch([t for _, _, t in pairs])
    ours = {
        "rmsd": backbone_rmsd(pred, true, mask),
        "lddt": lddt_ca(pred[:, :, 1], true[:, :, 1], mask),
        "tm": tm_score_kabsch_ca(pred[:, :, 1], true[:, :, 1], mask),
    }
    standard = tm_score_ca(pred[:, :, 1], true[:, :, 1], mask)
    for i, (name, _, _) in enumerate(pairs):
        want = expected[i]
        assert ours["rmsd"][i].item() == pytest.approx(want["rmsd"], abs=1e-4), name
        assert ours["lddt"][i].item() == pytest.approx(want["lddt"], abs=1e-6), name
        assert ours["tm"][i].item() == pytest.approx(want["tm"], abs=1e-5), name
        assert standard[i].item() >= want["tm"] - 1e-5, name
    # The pairs span the range: near-identical to unrelated folds.
    tms = [e["tm"] for e in expected]
    assert max(tms) > 0.8 and min(tms) < 0.4


def test_metric_objects_average_the_per_structure_values_over_structures(pairs):
    """RMSD and lDDT average biotite's values, TMScore the standard TM-score's."""
    expected = [biotite_metrics(pred, true) for _, pred, true in pairs]
    for e, (_, p, t) in zip(expected, pairs, strict=True):
        pred, mask = pad_batch([p])
        true, _ = pad_batch([t])
        e["tm"] = tm_score_ca(pred[:, :, 1], true[:, :, 1], mask).item()
    metrics = {"rmsd": BackboneRMSD(), "lddt": CALDDT(), "tm": TMScore()}
    for _, p, t in pairs:  # one structure per update, as uneven batches would come
        pred, mask = pad_batch([p])
        true, _ = pad_batch([t])
        for metric in metrics.values():
            metric.update(pred, true, mask)
    for key, metric in metrics.items():
        mean = np.mean([e[key] for e in expected])
        assert metric.compute().item() == pytest.approx(mean, rel=1e-5), key


def test_tm_score_of_identical_structures_is_one_and_ignores_rigid_motion(pairs):
    _, _, true = pairs[0]
    rot = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(3)))[0]
    rot = rot * torch.sign(torch.linalg.det(rot))
    t = torch.from_numpy(true[:, 1]).float()[None]
    moved = t @ rot.T + torch.tensor([5.0, -3.0, 8.0])
    mask = torch.ones(t.shape[:2], dtype=torch.bool)
    assert tm_score_ca(moved, t, mask).item() == pytest.approx(1.0, abs=1e-5)
