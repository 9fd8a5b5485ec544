"""Fixtures for the protein tests: the shared sample structures and small synthetic files."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pytest

from tests.protein.helpers import EDGE, need_shared_data, pdb_atom_lines


@pytest.fixture(scope="session")
def proteins_dir() -> Path:
    return need_shared_data()


@pytest.fixture(scope="session")
def broken_corpus(tmp_path_factory, proteins_dir) -> dict[str, Path]:
    """One file per failure kind; each must be skipped with a named reason, never crash."""
    root = tmp_path_factory.mktemp("broken")
    good = (EDGE / "1aki.pdb").read_text()
    lines = pdb_atom_lines(EDGE / "1aki.pdb")
    files = {}

    files["empty"] = root / "empty.pdb"
    files["empty"].write_text("")

    raw = gzip.compress(good.encode())
    files["truncated_gzip"] = root / "truncated.pdb.gz"
    files["truncated_gzip"].write_bytes(raw[: len(raw) // 2])

    cif = (EDGE / "1aki.cif").read_text()
    files["truncated_cif"] = root / "truncated.cif"
    files["truncated_cif"].write_text(cif[: len(cif) // 2])

    files["junk_pdb"] = root / "junk.pdb"
    junk = random.Random(0).randbytes(4096)
    files["junk_pdb"].write_bytes(junk)
    files["junk_bcif"] = root / "junk.bcif"
    files["junk_bcif"].write_bytes(junk)

    water = [
        f"HETATM{i + 1:5d}  O   HOH A{i + 1:4d}    {i:8.3f}{0.0:8.3f}{0.0:8.3f}  1.00  0.00"
        "           O"
        for i in range(5)
    ]
    files["no_protein"] = root / "water_only.pdb"
    files["no_protein"].write_text("\n".join(water) + "\nEND\n")

    no_ca = [line for line in lines if line[12:16].strip() != "CA"]
    files["no_ca"] = root / "no_ca.pdb"
    files["no_ca"].write_text("\n".join(no_ca) + "\nEND\n")
    return files
