"""Structure parsing policy: formats, first model, altlocs, chains, masking, broken files."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from provq_lightning.protein.chain import AMINO_ACIDS
from provq_lightning.protein.parsing import (
    ParseOptions,
    StructureSkip,
    parse_structure,
    residue_positions,
    strip_suffixes,
)
from tests.protein.helpers import EDGE, pdb_atom_lines, set_field


def only_chain(path, **kw):
    chains = parse_structure(path, **kw).chains
    assert len(chains) == 1
    return chains[0]


def test_pdb_mmcif_gzip_and_binarycif_give_the_same_chain(proteins_dir, tmp_path):
    import biotite.structure.io.pdbx as pdbx

    from_pdb = only_chain(EDGE / "1aki.pdb")
    from_cif = only_chain(EDGE / "1aki.cif")
    gz = tmp_path / "1aki.cif.gz"
    gz.write_bytes(gzip.compress((EDGE / "1aki.cif").read_bytes()))
    bcif_path = tmp_path / "1aki.bcif"
    bcif = pdbx.BinaryCIFFile()
    pdbx.set_structure(bcif, pdbx.get_structure(pdbx.CIFFile.read(str(EDGE / "1aki.cif")), 1))
    bcif.write(str(bcif_path))
    for other in (from_cif, only_chain(gz), only_chain(bcif_path)):
        assert len(other) == len(from_pdb) == 129
        np.testing.assert_allclose(other.coords, from_pdb.coords, atol=1e-3, equal_nan=True)
        assert other.sequence == from_pdb.sequence
    assert from_pdb.id == "1aki_A"


def test_first_model_only(proteins_dir):
    import biotite.structure.io.pdb as pdb

    chain = only_chain(EDGE / "1l2y.pdb")
    stack = pdb.PDBFile.read(str(EDGE / "1l2y.pdb")).get_structure()
    assert stack.stack_depth() == 38
    first_ca = stack[0][stack[0].atom_name == "CA"].coord
    np.testing.assert_allclose(chain.coords[:, 1], first_ca, atol=1e-4)
    second_ca = stack[1][stack[1].atom_name == "CA"].coord
    assert not np.allclose(chain.coords[:, 1], second_ca, atol=1e-2)


def test_altloc_defaults_to_highest_occupancy(proteins_dir, tmp_path):
    # 3o5r GLU 20: location A (0.75) at CA (46.352, -3.160, 2.845), B (0.25) elsewhere.
    chain = only_chain(EDGE / "3o5r.pdb")
    start = 13  # residue numbering starts at 13 in this file
    glu = 20 - start
    assert chain.sequence[glu] == "E"
    np.testing.assert_allclose(chain.coords[glu, 1], [46.352, -3.160, 2.845], atol=1e-3)
    # Swap the occupancies: the policy follows occupancy, not the order in the file.
    swapped = []
    for line in (EDGE / "3o5r.pdb").read_text().splitlines():
        if line.startswith("ATOM") and line[22:26].strip() == "20" and line[16] in "AB":
            line = set_field(line, 54, 60, "0.25" if line[16] == "A" else "0.75")
        swapped.append(line)
    path = tmp_path / "3o5r_swapped.pdb"
    path.write_text("\n".join(swapped) + "\n")
    np.testing.assert_allclose(only_chain(path).coords[glu, 1], [46.619, -3.172, 2.796], atol=1e-3)
    first = only_chain(path, options=ParseOptions(altloc="first"))
    np.testing.assert_allclose(first.coords[glu, 1], [46.352, -3.160, 2.845], atol=1e-3)


@pytest.mark.parametrize("suffix", [".pdb", ".cif"])
def test_numeric_altloc_residues_are_kept(proteins_dir, suffix):
    # 1k6p labels its alternate locations '1' and '2' (biotite < 2.0 dropped such residues).
    chains = parse_structure(EDGE / f"1k6p{suffix}").chains
    assert [c.id for c in chains] == ["1k6p_A", "1k6p_B"]
    assert [len(c) for c in chains] == [99, 99]
    assert all(c.backbone_mask.all() for c in chains)
    assert all((np.diff(c.residue_index) == 1).all() for c in chains)  # nothing missing
    # Residue 50 of chain A: both locations at occupancy 0.50; the tie goes to the first
    # listed, '1' (CA 2.801, -5.050, 10.589), not '2' (2.877, -5.026, 10.528).
    ile50 = 49  # chain A is numbered 1..99 without gaps
    assert chains[0].sequence[ile50] == "I"
    np.testing.assert_allclose(chains[0].coords[ile50, 1], [2.801, -5.050, 10.589], atol=1e-3)


def test_insertion_codes_kept_in_file_order(proteins_dir):
    import biotite.structure as struc
    import biotite.structure.io.pdb as pdb

    chain = only_chain(EDGE / "1dix.pdb")
    atoms = pdb.PDBFile.read(str(EDGE / "1dix.pdb")).get_structure(model=1)
    atoms = atoms[struc.filter_amino_acids(atoms)]
    starts = struc.get_residue_starts(atoms)
    assert (atoms.ins_code[starts] != "").any()  # the file really uses insertion codes
    assert len(chain) == len(starts)
    assert (np.diff(chain.residue_index) >= 1).all()
    np.testing.assert_allclose(chain.coords[:, 1], atoms[atoms.atom_name == "CA"].coord, atol=1e-4)


def test_unobserved_residues_leave_gaps_and_negative_ids_work(proteins_dir):
    # 1a04A02 skips residue numbers where residues are unobserved. (1k6p's "gaps" used to be
    # residues with numeric altlocs that old biotite dropped; they are kept now.)
    gapped = only_chain(proteins_dir / "cath_domains" / "1a04A02.pdb")
    assert (np.diff(gapped.residue_index) > 1).sum() == 1
    neg = only_chain(EDGE / "1o1z.pdb")
    assert neg.residue_index[0] == 0 and (np.diff(neg.residue_index) >= 1).all()


def test_residue_positions():
    np.testing.assert_array_equal(
        residue_positions(np.array([-3, -2, 5, 5, 5, 6, 1, 2])), [0, 1, 8, 9, 10, 11, 12, 13]
    )


def test_missing_backbone_atom_masked_modified_residue_kept_blank_chain(proteins_dir, tmp_path):
    lines = pdb_atom_lines(EDGE / "1aki.pdb")
    out = []
    for line in lines:
        res = int(line[22:26])
        if res == 10 and line[12:16].strip() == "CA":
            continue  # residue 10 loses its CA
        if res == 12:  # residue 12 becomes selenomethionine, as a HETATM record
            line = "HETATM" + line[6:17] + "MSE" + line[20:]
        out.append(line[:21] + " " + line[22:])  # blank chain id
    path = tmp_path / "edited.pdb"
    path.write_text("\n".join(out) + "\nEND\n")
    chain = only_chain(path)
    ref = only_chain(EDGE / "1aki.pdb")
    assert chain.id == "edited_0"  # blank chain ids are written 0, as CATH does
    assert len(chain) == len(ref)  # nothing dropped
    first = int(lines[0][22:26])
    assert not chain.backbone_mask[10 - first] and chain.backbone_mask.sum() == len(ref) - 1
    assert np.isnan(chain.coords[10 - first, 1]).all()
    assert np.isfinite(chain.coords[10 - first, [0, 2]]).all()
    assert chain.sequence[12 - first] == "M"


def test_length_filter_and_chain_selection(proteins_dir):
    path = EDGE / "1k6p.pdb"
    with pytest.raises(StructureSkip, match="min_length 200"):
        parse_structure(path, ParseOptions(min_length=200))
    with pytest.raises(StructureSkip, match="max_length 50"):
        parse_structure(path, ParseOptions(max_length=50))
    assert [c.id for c in parse_structure(path, wanted=["1K6P_B"]).chains] == ["1k6p_B"]
    assert len(parse_structure(path, wanted=["1k6p"]).chains) == 2
    with pytest.raises(StructureSkip, match="none of the selected chains"):
        parse_structure(path, wanted=["1k6p_Z"])


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("empty", "empty file"),
        ("truncated_gzip", "truncated or corrupt gzip"),
        ("truncated_cif", "unreadable as CIF"),
        ("junk_pdb", "binary content"),
        ("junk_bcif", "unreadable as BCIF"),
        ("no_protein", "no protein chain"),
        ("no_ca", "no residue with a complete N/CA/C backbone (no CA atoms at all)"),
    ],
)
def test_broken_files_are_skipped_with_a_named_reason(broken_corpus, kind, reason):
    with pytest.raises(StructureSkip) as skip:
        parse_structure(broken_corpus[kind])
    assert reason in str(skip.value)


def test_suffixes():
    assert strip_suffixes("1ABC.cif.gz") == ("1ABC", ".cif", True)
    assert strip_suffixes("x.BCIF") == ("x", ".bcif", False)
    assert strip_suffixes("1a04A02") == ("1a04A02", "", False)
    assert len(AMINO_ACIDS) == 20
