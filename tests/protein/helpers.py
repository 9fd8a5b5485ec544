"""What the protein tests share: the sample-data paths, PDB line editing, a CPU-sized model
and a batch of real chains.

Imported by test files; the fixtures built on these live in ``conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from provq_lightning.datamodules.proteins import collate_structures
from provq_lightning.protein.parsing import parse_structure
from provq_lightning.protein.paths import shared_data_dir

PROTEINS = shared_data_dir() / "proteins"
EDGE = PROTEINS / "biotite_edge_cases"

# A ProteinTokenizer small enough for CPU tests.
TINY = dict(
    num_codes=16,
    code_dim=8,
    encoder_dim=32,
    encoder_heads=4,
    encoder_layers=1,
    decoder_dim=32,
    decoder_heads=2,
    decoder_layers=1,
    pair_dim=16,
)


def need_shared_data() -> Path:
    if not (PROTEINS / "cath_domains").is_dir():
        pytest.skip(f"shared protein sample data not found at {PROTEINS} (set PROVQ_SHARED_DATA)")
    return PROTEINS


def pdb_atom_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith(("ATOM", "HETATM"))]


def set_field(line: str, start: int, end: int, value: str) -> str:
    """Replace PDB columns [start, end) (0-based) with ``value`` right-aligned."""
    return line[:start] + value.rjust(end - start)[: end - start] + line[end:]


def chain_batch(names=("1aki.pdb", "1k6p.pdb")) -> dict:
    items = []
    for name in names:
        for chain in parse_structure(EDGE / name).chains:
            coords = torch.from_numpy(chain.coords)
            items.append(
                {
                    "id": chain.id,
                    "coords": coords,
                    "residue_index": torch.from_numpy(chain.residue_index),
                    "aatype": torch.from_numpy(chain.aatype).long(),
                    "residue_mask": torch.isfinite(coords[:, :3]).all(-1).all(-1),
                }
            )
    return collate_structures(items)
