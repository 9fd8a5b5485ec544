"""Write backbone structures as PDB files with biotite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from provq_lightning.protein.chain import AMINO_ACIDS, BACKBONE_ATOMS

THREE_LETTER = dict(
    zip(
        AMINO_ACIDS,
        "ALA CYS ASP GLU PHE GLY HIS ILE LYS LEU MET ASN PRO GLN ARG SER THR VAL TRP TYR".split(),
        strict=True,
    )
)


def backbone_atom_array(coords: torch.Tensor | np.ndarray, sequence: str | None = None):
    """biotite ``AtomArray`` of N, CA, C, O for coords (L, 4, 3); residues numbered from 1.

    Without a sequence every residue is ``UNK`` (a decoded token string carries no identity).
    """
    import biotite.structure as struc

    xyz = np.asarray(coords.detach().cpu() if isinstance(coords, torch.Tensor) else coords)
    n_res, n_atoms = xyz.shape[:2]
    if sequence is not None and len(sequence) != n_res:
        raise ValueError(f"sequence has {len(sequence)} residues, coords {n_res}")
    atoms = struc.AtomArray(n_res * n_atoms)
    atoms.coord = xyz.reshape(-1, 3).astype(np.float32)
    atoms.chain_id[:] = "A"
    atoms.res_id = np.repeat(np.arange(1, n_res + 1), n_atoms)
    names = [THREE_LETTER.get(a, "UNK") for a in sequence] if sequence else ["UNK"] * n_res
    atoms.res_name = np.repeat(np.array(names), n_atoms)
    atoms.atom_name = np.tile(np.array(BACKBONE_ATOMS[:n_atoms]), n_res)
    atoms.element = np.tile(np.array([name[0] for name in BACKBONE_ATOMS[:n_atoms]]), n_res)
    atoms.hetero[:] = False
    return atoms


def write_backbone_pdb(path: Path | str, coords, sequence: str | None = None) -> Path:
    import biotite.structure.io.pdb as pdb

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = pdb.PDBFile()
    out.set_structure(backbone_atom_array(coords, sequence))
    out.write(str(path))
    return path
