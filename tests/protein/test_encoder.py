"""The structure encoder: SE(3)-invariant tokens, local neighbourhoods, masking."""

from __future__ import annotations

import torch

from provq_lightning.protein.encoder import knn_neighbours
from provq_lightning.protein.geometry import random_rotation
from provq_lightning.protein.tokenizer import ProteinTokenizer
from tests.protein.helpers import chain_batch


def moved(batch: dict, seed: int) -> dict:
    """The same structures rotated and translated (each chain by its own rigid motion)."""
    out = dict(batch)
    coords = batch["coords"].double().clone()
    for i in range(coords.shape[0]):
        gen = torch.Generator().manual_seed(seed + i)
        rot = random_rotation(gen)
        shift = 40.0 * torch.randn(3, generator=gen, dtype=torch.float64)
        coords[i] = coords[i] @ rot.T + shift
    out["coords"] = (coords * batch["atom_mask"][..., None]).float()
    return out


def test_rotating_and_translating_a_structure_leaves_its_tokens_unchanged(proteins_dir):
    torch.manual_seed(0)
    model = ProteinTokenizer(num_codes=256, code_dim=16, codebook_init="normal").eval()
    batch = chain_batch()
    # Spread the codebook over the encoder outputs so many codes are in play (a fixed random
    # codebook would send almost everything to one code and make the test weak).
    with torch.no_grad():
        z = model.encode(batch)[batch["residue_mask"]]
        model.quantizer.set_codebook(z[torch.randperm(z.shape[0])[:256]] + 1e-3)
    tokens = model.encode_codes(batch)
    assert tokens[batch["residue_mask"]].unique().numel() > 100
    for seed in (1, 2, 3):
        other = moved(batch, seed)
        assert not torch.allclose(other["coords"], batch["coords"], atol=1.0)
        assert torch.equal(model.encode_codes(other), tokens)
        z_other = model.encode(other)
        assert torch.allclose(z_other, model.encode(batch), atol=5e-5)


def test_knn_puts_self_first_and_skips_masked_residues():
    gen = torch.Generator().manual_seed(0)
    ca = torch.randn(1, 30, 3, generator=gen) * 10
    mask = torch.ones(1, 30, dtype=torch.bool)
    mask[0, 7] = False
    index, edge_mask = knn_neighbours(ca, mask, k=16)
    assert index.shape == (1, 30, 16)
    assert torch.equal(index[0, :, 0], torch.arange(30))
    valid_rows = torch.arange(30) != 7
    assert not (index[0, valid_rows] == 7).any()
    assert edge_mask[0, valid_rows].all() and not edge_mask[0, 7].any()
    # Neighbours are sorted by distance from the query.
    d = (ca[0, index[0]] - ca[0, :, None]).norm(dim=-1)
    assert (d[valid_rows].diff(dim=-1) >= 0).all()


def test_masked_residue_coordinates_do_not_leak_into_other_residues(proteins_dir):
    torch.manual_seed(0)
    model = ProteinTokenizer().eval()
    batch = chain_batch(("1aki.pdb",))
    batch["residue_mask"][0, 40] = False
    z = model.encode(batch)
    batch2 = dict(batch)
    batch2["coords"] = batch["coords"].clone()
    batch2["coords"][0, 40] += 5.0
    z2 = model.encode(batch2)
    keep = torch.ones(z.shape[1], dtype=torch.bool)
    keep[40] = False
    assert torch.equal(z[0, keep], z2[0, keep])
