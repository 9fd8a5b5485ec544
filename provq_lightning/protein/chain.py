"""``ProteinChain``: the per-residue backbone record every other protein module consumes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Backbone atoms stored per residue, in this order. O is optional (masked where absent).
BACKBONE_ATOMS = ("N", "CA", "C", "O")
# Canonical amino acids by one-letter code; index 20 is "unknown or non-canonical parent".
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
UNKNOWN_AA = len(AMINO_ACIDS)


@dataclass
class ProteinChain:
    """One protein chain (or domain) as backbone coordinates.

    Attributes:
        id: ``<entry>_<chain>`` (blank chain ids are written ``0``, as CATH does).
        coords: (L, 4, 3) float32 N, CA, C, O in Angstrom; NaN where an atom is absent.
        residue_index: (L,) int64, increasing; author-numbering gaps are kept (so a chain break
            looks like one to the relative-position embedding) and insertion codes get
            consecutive positions in file order.
        aatype: (L,) uint8 index into ``AMINO_ACIDS`` (modified residues map to their parent,
            e.g. MSE -> M; others to ``UNKNOWN_AA``).
    """

    id: str
    coords: np.ndarray
    residue_index: np.ndarray
    aatype: np.ndarray

    def __post_init__(self) -> None:
        n = self.coords.shape[0]
        if self.coords.shape != (n, len(BACKBONE_ATOMS), 3):
            raise ValueError(f"{self.id}: coords must be (L, 4, 3), got {self.coords.shape}")
        if self.residue_index.shape != (n,) or self.aatype.shape != (n,):
            raise ValueError(f"{self.id}: residue_index and aatype must have length {n}")

    def __len__(self) -> int:
        return self.coords.shape[0]

    @property
    def backbone_mask(self) -> np.ndarray:
        """True for residues whose N, CA and C are all present (they get a rigid frame)."""
        return np.isfinite(self.coords[:, :3]).all(axis=(1, 2))

    @property
    def sequence(self) -> str:
        letters = AMINO_ACIDS + "X"
        return "".join(letters[i] for i in self.aatype)
