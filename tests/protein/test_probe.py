"""The token probe: P-SEA labels equal biotite's, the probe and mutual information measure what
they claim on hand-made data, and the CLI turns a trained run into the markdown table."""

from __future__ import annotations

import math
from pathlib import Path

import biotite.structure as struc
import biotite.structure.io as strucio
import numpy as np
import pytest
import torch

from provq_lightning.protein.parsing import parse_structure
from provq_lightning.protein.probe import (
    NO_LABEL,
    accuracy,
    entropy_bits,
    fit_linear_probe,
    macro_f1,
    main,
    majority_accuracy,
    mutual_information_bits,
    sse_labels,
)
from tests.protein.helpers import EDGE, TINY, fit_tiny_run

HELIX, STRAND, COIL = 0, 1, 2
FILES = ("1aki.pdb", "1k6p.pdb", "3o5r.cif")  # 4 chains; the split holds one entry out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The probe's small matrix products gain nothing from a second thread, and on a shared
    2-core machine a busy-waiting OpenMP thread makes L-BFGS ~100x slower; restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ideal_helix(n: int) -> np.ndarray:
    """CA trace of an ideal alpha helix: 100 degrees and 1.5 A rise per residue, radius 2.3 A."""
    turn = np.deg2rad(100.0) * np.arange(n)
    return np.stack([2.3 * np.cos(turn), 2.3 * np.sin(turn), 1.5 * np.arange(n)], -1)


def zigzag_strand(n: int) -> np.ndarray:
    """Planar CA zigzag, 3.8 A steps at 124 degrees: an extended strand."""
    i = np.arange(n)
    half = np.deg2rad(62.0)
    return np.stack([3.8 * np.sin(half) * i, 3.8 * np.cos(half) * (i % 2), 0.0 * i], -1)


# -- labels -----------------------------------------------------------------------------------
def test_ideal_helix_and_strand_get_their_labels_ends_are_coil():
    i = np.arange(24)
    helix = sse_labels(ideal_helix(24), i)
    assert (helix[1:-1] == HELIX).all() and helix[0] == helix[-1] == COIL
    strand = sse_labels(zigzag_strand(24), i)
    assert (strand[1:-2] == STRAND).all()


def test_missing_ca_has_no_label_and_a_numbering_gap_breaks_the_helix():
    i = np.arange(24)
    ca = ideal_helix(24)
    ca[5] = np.nan
    labels = sse_labels(ca, i)
    assert labels[5] == NO_LABEL and (labels[np.arange(24) != 5] != NO_LABEL).all()
    assert (labels[8:-1] == HELIX).all()

    gapped = i.copy()
    gapped[12:] += 5  # same coordinates, but residues 12.. are numbered after a gap
    labels = sse_labels(ideal_helix(24), gapped)
    assert (labels[10:13] != HELIX).any() and (labels[1:10] == HELIX).all()
    assert (sse_labels(np.full((4, 3), np.nan), np.arange(4)) == NO_LABEL).all()


@pytest.mark.parametrize("name", ["1l2y.pdb", "1aki.pdb"])
def test_ca_only_labels_equal_biotite_on_the_full_atom_file(proteins_dir, name):
    atoms = strucio.load_structure(EDGE / name, model=1)
    atoms = atoms[struc.filter_amino_acids(atoms)]
    (chain,) = parse_structure(EDGE / name).chains
    expected = struc.annotate_sse(atoms[atoms.chain_id == chain.id.split("_")[-1]])
    labels = sse_labels(chain.coords[:, 1], chain.residue_index)
    assert "".join(np.array(["a", "b", "c"])[labels]) == "".join(expected)
    if name == "1l2y.pdb":  # Trp-cage: its alpha helix is residues 2-9
        assert (labels[1:9] == HELIX).all()


# -- measures ---------------------------------------------------------------------------------
def test_accuracy_macro_f1_and_majority_floor_on_hand_made_labels():
    pred, labels = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2])
    assert accuracy(pred, labels) == 0.75
    assert macro_f1(pred, labels) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert majority_accuracy(np.array([2, 2, 0]), np.array([2, 0, 0, 2])) == 0.5


def test_mutual_information_is_the_label_entropy_for_informative_tokens_zero_for_independent():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 3000)
    tokens = labels * 5 + rng.integers(0, 5, 3000)  # 15 tokens, each within one label
    assert mutual_information_bits(tokens, labels) == pytest.approx(entropy_bits(labels))
    assert entropy_bits(labels) == pytest.approx(math.log2(3), abs=0.01)

    # Every (token, label) pair equally often: exactly independent.
    grid_t, grid_s = np.meshgrid(np.arange(16), np.arange(3))
    assert mutual_information_bits(grid_t.ravel(), grid_s.ravel()) == pytest.approx(0, abs=1e-12)
    assert mutual_information_bits(np.array([0, 0, 1, 1]), np.array([5, 5, 7, 7])) == 1.0
    # Random independent draws: the plug-in bias only, (16 - 1)(3 - 1) / (2 N ln 2) bits.
    noise = mutual_information_bits(rng.integers(0, 16, 3000), labels)
    assert noise < 3 * 15 * 2 / (2 * 3000 * math.log(2))


def test_linear_probe_reads_a_linearly_coded_label_and_is_deterministic():
    rng = np.random.default_rng(0)
    codebook = torch.from_numpy(rng.normal(size=(12, 6)))
    tokens = rng.integers(0, 12, 600)
    # Label = which of three directions the token's vector points furthest along: linear.
    labels = codebook[:, :3].argmax(-1).numpy()[tokens]
    probe = fit_linear_probe(codebook[tokens], labels)
    assert accuracy(probe.predict(codebook[tokens]), labels) == 1.0
    again = fit_linear_probe(codebook[tokens], labels)
    assert torch.equal(probe.weight, again.weight) and torch.equal(probe.bias, again.bias)


# -- the CLI on a trained run -----------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, proteins_dir) -> Path:
    """A 4-step provq-fit of a tiny model with the proteins_sample config, crop 64 residues."""
    return fit_tiny_run(tmp_path_factory.mktemp("protein_probe"), FILES)


def labelled_residues() -> int:
    """Residues of FILES with a backbone (so a code) and a CA label, whole chains."""
    total = 0
    for name in FILES:
        for chain in parse_structure(EDGE / name).chains:
            labels = sse_labels(chain.coords[:, 1], chain.residue_index)
            total += int((chain.backbone_mask & (labels != NO_LABEL)).sum())
    return total


def test_probe_cli_writes_the_table_of_a_trained_run(trained_run, tmp_path, capsys):
    md = tmp_path / "out" / "probe.md"
    main([f"tiny={trained_run},{trained_run}", f"again={trained_run}", "--markdown", str(md)])
    printed = capsys.readouterr().out
    assert md.read_text().strip() in printed
    summary, per_run, note = md.read_text().split("\n\n")
    lines = summary.splitlines()
    assert lines[0].startswith("| run | residues (train / val) | probe accuracy |")
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["tiny (2 runs)", "again"]
    two, one = lines[2:]
    cells = [c.strip() for c in one.strip("|").split("|")]
    train, val = (int(n) for n in cells[1].split(" / "))
    assert train > 0 and val > 0
    assert train + val == labelled_residues()  # every residue of the whole chains, no crop
    acc, f1, floor, mi, ratio, used = (float(c) for c in cells[2:])
    assert 0 <= acc <= 1 and 0 <= f1 <= 1 and 0 < floor <= 1
    assert 0 <= mi and 0 <= ratio <= 1 and 1 <= used <= TINY["num_codes"]
    # The same run probed twice gives the same numbers: spread 0, means equal the single run.
    assert two.split("|")[3].strip() == f"{cells[2]} ± 0.000"
    rows = per_run.splitlines()[2:]
    assert [line.split("|")[1].strip() for line in rows] == ["tiny", "tiny", "again"]
    assert {line.split("|")[2].strip() for line in rows} == {str(trained_run)}
    assert len({line.split("|", 3)[3] for line in rows}) == 1
    assert "P-SEA" in note and "H(SSE) =" in note


def test_missing_checkpoint_is_one_line_naming_it_and_the_fix(tmp_path, capsys):
    run = tmp_path / "seed_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    cases = ((run, run / "checkpoints" / "last.ckpt", 1), (tmp_path / "nope", None, 2))
    for target, named, code in cases:  # 2: a run directory that does not exist, as argparse
        with pytest.raises(SystemExit) as exit_info:
            main([f"ProVQ={target}"])
        assert exit_info.value.code == code
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error:" in err and "make protein-sample" in err
        assert str(named or target) in err
