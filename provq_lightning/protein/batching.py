"""Padding variable-length chains into one batch: what the datamodule's loaders and the floor
share."""

from __future__ import annotations

import torch


def collate_structures(items: list[dict]) -> dict:
    """Pad to the longest chain: coords (B, L, 4, 3) with zeros where absent, ``atom_mask``
    (B, L, 4), ``residue_mask`` (N, CA and C present), ``pad_mask`` (real positions)."""
    b = len(items)
    n = max(item["coords"].shape[0] for item in items)
    coords = torch.zeros(b, n, 4, 3)
    atom_mask = torch.zeros(b, n, 4, dtype=torch.bool)
    residue_mask = torch.zeros(b, n, dtype=torch.bool)
    pad_mask = torch.zeros(b, n, dtype=torch.bool)
    residue_index = torch.zeros(b, n, dtype=torch.long)
    aatype = torch.full((b, n), 20, dtype=torch.long)
    for i, item in enumerate(items):
        m = item["coords"].shape[0]
        present = torch.isfinite(item["coords"]).all(-1)
        coords[i, :m] = torch.nan_to_num(item["coords"], nan=0.0)
        atom_mask[i, :m] = present
        residue_mask[i, :m] = item["residue_mask"]
        pad_mask[i, :m] = True
        residue_index[i, :m] = item["residue_index"]
        aatype[i, :m] = item["aatype"]
    return {
        "ids": [item["id"] for item in items],
        "coords": coords,
        "atom_mask": atom_mask,
        "residue_mask": residue_mask,
        "pad_mask": pad_mask,
        "residue_index": residue_index,
        "aatype": aatype,
    }
