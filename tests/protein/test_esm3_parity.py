"""ESM3 / StructTokenBench interop, proven against ESM3's own code on the same weights.

ESM3's ``StructureTokenEncoder`` and ``StructureTokenDecoder`` (the ``esm`` wheel) at a small
size with seeded random weights, converted into provq, on three real chains: a plain one, one
with a numbering gap, one with a residue missing backbone atoms. provq's latents equal ESM3's to
1e-5 and the codes are the same; the decoder's backbone too. A swap of two mapped keys of the same
shape breaks that, and a StructTokenBench DeepSpeed checkpoint written here from the same weights
gives the source model's codes and backbones. Skipped, saying why, without ``esm``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from provq_lightning.protein.batching import collate_structures
from provq_lightning.protein.encoder import knn_neighbours_esm3
from provq_lightning.protein.parsing import parse_structure
from provq_lightning.protein.tokenizer import MISSING_TOKEN, ProteinTokenizer

vqvae = pytest.importorskip(
    "esm.models.vqvae",
    reason="esm (ESM3's reference code) is not installed; CI installs it with "
    "`pip install --no-deps esm==3.2.1.post1` plus einops huggingface_hub zstd "
    "msgpack-numpy cloudpathlib tenacity brotli",
)

# esm's own deprecation notices (torch.cuda.amp, list indexing), not provq's.
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning:esm.models.vqvae"),
              pytest.mark.filterwarnings("ignore::UserWarning:esm.models.vqvae")]

D_MODEL, V_HEADS, LAYERS, D_OUT, CODES = 64, 8, 2, 32, 64
DEC_DIM, DEC_HEADS, DEC_LAYERS = 64, 2, 2
MASK, EOS, BOS = 4096, 4097, 4098  # ESM3's special structure tokens
TOL = dict(atol=1e-5, rtol=1e-5)


def tensors(chain) -> dict:
    coords = torch.from_numpy(chain.coords)
    return {"id": chain.id, "coords": coords,
            "residue_index": torch.from_numpy(chain.residue_index),
            "aatype": torch.from_numpy(chain.aatype).long(),
            "residue_mask": torch.from_numpy(chain.backbone_mask)}


@pytest.fixture(scope="module")
def chains(proteins_dir: Path) -> list:
    plain = parse_structure(proteins_dir / "cath_domains" / "1avyA00.pdb").chains[0]
    gap = parse_structure(proteins_dir / "cath_domains" / "4gs3A00.pdb").chains[0]
    entry = parse_structure(proteins_dir / "ddg_rcsb_pdb_gz" / "3HHR.pdb.gz").chains
    missing = next(c for c in entry if c.id == "3HHR_A")
    assert plain.backbone_mask.all() and (np.diff(plain.residue_index) == 1).all()
    assert gap.backbone_mask.all() and (np.diff(gap.residue_index) > 1).any()
    holes = np.flatnonzero(~missing.backbone_mask)
    assert len(holes) and 0 < holes[0] < len(missing) - 1  # a residue inside the chain
    return [plain, gap, missing]


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Seeded noise on every weight: LayerNorm ones and zero scales would hide swapped keys."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def esm_latents(encoder, chain) -> tuple[torch.Tensor, torch.Tensor]:
    """ESM3's pre-quantization latents (L, D) and codes (L,) of one chain."""
    caught = []
    hook = encoder.pre_vq_proj.register_forward_hook(lambda m, i, out: caught.append(out))
    try:
        with torch.no_grad():
            _, codes = encoder.encode(
                torch.from_numpy(chain.coords)[None],
                residue_index=torch.from_numpy(chain.residue_index)[None],
            )
    finally:
        hook.remove()
    return caught[0][0], codes[0]


@pytest.fixture(scope="module")
def esm_encoder(chains):
    torch.manual_seed(0)
    encoder = vqvae.StructureTokenEncoder(D_MODEL, 1, V_HEADS, LAYERS, D_OUT, CODES).eval()
    perturb(encoder, 1)
    # Codes spread over the encoder's own outputs, so that many codes are in play.
    z = torch.cat([esm_latents(encoder, c)[0] for c in chains])
    gen = torch.Generator().manual_seed(2)
    pick = torch.randperm(z.shape[0], generator=gen)[:CODES]
    with torch.no_grad():
        encoder.codebook.embeddings.copy_(z[pick] + 0.01 * torch.randn(CODES, D_OUT, generator=gen))
    return encoder


@pytest.fixture(scope="module")
def esm_decoder():
    torch.manual_seed(3)
    decoder = vqvae.StructureTokenDecoder(DEC_DIM, DEC_HEADS, DEC_LAYERS).eval()
    perturb(decoder, 4)
    return decoder


@pytest.fixture(scope="module")
def files(tmp_path_factory, esm_encoder, esm_decoder) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("esm3")
    paths = {"encoder": root / "encoder.pth", "decoder": root / "decoder.pth"}
    torch.save(esm_encoder.state_dict(), paths["encoder"])
    torch.save(esm_decoder.state_dict(), paths["decoder"])
    return paths


def provq_latents(model, chains) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Latents and codes of the three chains in one padded batch."""
    batch = collate_structures([tensors(c) for c in chains])
    with torch.no_grad():
        return model.encode(batch), model.encode_codes(batch), batch


def assert_encoder_parity(model, esm_encoder, chains) -> None:
    z, codes, _ = provq_latents(model, chains)
    for i, chain in enumerate(chains):
        want_z, want_codes = esm_latents(esm_encoder, chain)
        n, framed = len(chain), torch.from_numpy(chain.backbone_mask)
        torch.testing.assert_close(z[i, :n], want_z, **TOL)
        assert torch.equal(codes[i, :n][framed], want_codes[framed])
        assert (codes[i, :n][~framed] == MISSING_TOKEN).all()
        assert want_codes[framed].unique().numel() >= 20  # a real test of the code search


def test_esm3_encoder_gives_esm3s_latents_and_codes(files, esm_encoder, chains):
    model = ProteinTokenizer.from_esm3(files["encoder"])
    assert model.hparams.encoder_type == "esm3" and model.hparams.num_codes == CODES
    assert model.hparams.encoder_heads == V_HEADS and model.hparams.code_dim == D_OUT
    assert_encoder_parity(model, esm_encoder, chains)


def test_neighbourhoods_are_esm3s_including_the_sequence_fallback(chains):
    chain = chains[2]  # a residue without a frame
    coords = torch.from_numpy(chain.coords)[None, :, :3]
    framed = torch.isfinite(coords).all(-1).all(-1)
    want, _ = vqvae.StructureTokenEncoder.find_knn_edges(
        coords, torch.zeros_like(framed), coord_mask=framed, knn=16)
    got, real = knn_neighbours_esm3(torch.nan_to_num(coords[:, :, 1]), framed, 16)
    rows = torch.arange(len(chain))
    for i in rows[framed[0]].tolist():
        assert set(got[0, i].tolist()) == set(want[0, i].tolist())
    for i in rows[~framed[0]].tolist():  # by sequence distance; i - d and i + d tie
        offsets = [sorted((edges[0, i] - i).abs().tolist()) for edges in (got, want)]
        assert offsets[0] == offsets[1] and got[0, i, 0] == i
        assert not real[0, i].any()


def test_esm3_decoder_gives_esm3s_backbone(files, esm_encoder, esm_decoder, chains):
    model = ProteinTokenizer.from_esm3(files["encoder"], files["decoder"],
                                       decoder_heads=DEC_HEADS)
    assert model.hparams.decoder_head == "esm3_tokens"
    _, codes, _ = provq_latents(model, chains)
    for i, chain in enumerate(chains):
        ids = codes[i, : len(chain)]
        # ESM3 reads a chain as start, codes (mask where a residue has none), end.
        tokens = torch.where(ids >= 0, ids, torch.full_like(ids, MASK))
        tokens = torch.cat([torch.tensor([BOS]), tokens, torch.tensor([EOS])])[None]
        with torch.no_grad():
            want = esm_decoder.decode(tokens)["bb_pred"][0, 1:-1]
        torch.testing.assert_close(model.decode_codes(ids)[:, :3], want, **TOL)


@pytest.mark.parametrize("pair", [
    ("transformer.blocks.0.geom_attn.distance_scale_per_head",
     "transformer.blocks.0.geom_attn.rotation_scale_per_head"),
    ("transformer.blocks.1.geom_attn.s_norm.weight", "transformer.blocks.1.ffn.0.weight"),
])
def test_swapping_two_mapped_keys_breaks_parity(files, esm_encoder, chains, tmp_path, pair):
    state = torch.load(files["encoder"], weights_only=True)
    a, b = pair
    assert state[a].shape == state[b].shape
    state[a], state[b] = state[b], state[a]
    torch.save(state, tmp_path / "swapped.pth")
    model = ProteinTokenizer.from_esm3(tmp_path / "swapped.pth")  # loads: names and shapes fit
    z, _, _ = provq_latents(model, chains[:1])
    want, _ = esm_latents(esm_encoder, chains[0])
    assert (z[0] - want).abs().max() > 1e-2


def structtokenbench_module(esm_encoder, esm_decoder, aminoaseed: bool) -> dict:
    """A StructTokenBench ``module`` from the ESM3 weights: ESM3's encoder names under
    ``model.encoder.``, a ``nn.Embedding`` codebook, AminoAseed's ``linear_proj``, a decoder that
    reads latents through ``post_vq_proj``, and the heads provq drops."""
    gen = torch.Generator().manual_seed(5)
    module = {f"model.encoder.{k}": v for k, v in esm_encoder.state_dict().items()
              if not k.startswith("codebook.")}
    module["model.quantizer.codebook.weight"] = esm_encoder.codebook.embeddings.clone()
    if aminoaseed:
        module["model.quantizer.linear_proj.weight"] = (
            torch.eye(D_OUT) + 0.05 * torch.randn(D_OUT, D_OUT, generator=gen))
        module["model.quantizer.linear_proj.bias"] = 0.05 * torch.randn(D_OUT, generator=gen)
    module["model.decoder.post_vq_proj.weight"] = 0.2 * torch.randn(DEC_DIM, D_OUT, generator=gen)
    module["model.decoder.post_vq_proj.bias"] = 0.1 * torch.randn(DEC_DIM, generator=gen)
    for k, v in esm_decoder.state_dict().items():
        if k != "embed.weight":
            module[f"model.decoder.{k}"] = v.clone()
    module["model.inverse_folding_head.dense.weight"] = torch.randn(DEC_DIM, DEC_DIM)
    module["model.inverse_folding_head.output.weight"] = torch.randn(33, DEC_DIM)
    return module


def source_codes(module: dict, esm_encoder, chain) -> tuple[torch.Tensor, torch.Tensor]:
    """The StructTokenBench model's codes of a chain and their (effective) code vectors."""
    z, _ = esm_latents(esm_encoder, chain)
    book = module["model.quantizer.codebook.weight"]
    if "model.quantizer.linear_proj.weight" in module:
        book = book @ module["model.quantizer.linear_proj.weight"].T + module[
            "model.quantizer.linear_proj.bias"]
    ids = torch.cdist(z.double(), book.double()).argmin(-1)
    return ids, book[ids]


def source_backbone(module: dict, esm_decoder, vectors: torch.Tensor) -> torch.Tensor:
    """StructTokenBench's decoder: post_vq_proj, then ESM3's decoder stack and frame head."""
    x = vectors[None] @ module["model.decoder.post_vq_proj.weight"].T + module[
        "model.decoder.post_vq_proj.bias"]
    zeros = torch.zeros(x.shape[:2], dtype=torch.long)
    with torch.no_grad():
        x, _, _ = esm_decoder.decoder_stack(x, sequence_id=zeros, chain_id=zeros)
        _, backbone = esm_decoder.affine_output_projection(
            x, affine=None, affine_mask=torch.zeros_like(zeros, dtype=torch.bool))
    return backbone[0]


@pytest.mark.parametrize("aminoaseed", [True, False], ids=["aminoaseed", "vanillavq"])
def test_structtokenbench_checkpoint_gives_the_source_models_codes_and_backbones(
    esm_encoder, esm_decoder, chains, tmp_path, aminoaseed
):
    module = structtokenbench_module(esm_encoder, esm_decoder, aminoaseed)
    folder = tmp_path / "epoch=9-step=1000.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    torch.save({"module": module, "ds_version": "0.14.0", "global_steps": 1000},
               folder / "checkpoint" / "mp_rank_00_model_states.pt")
    model = ProteinTokenizer.from_structtokenbench(folder, decoder_heads=DEC_HEADS)
    hp = model.hparams
    assert (hp.variant, hp.decoder_head) == ("aminoaseed" if aminoaseed else "vanilla", "esm3")
    assert model.quantizer.embedding.weight.requires_grad is not aminoaseed  # AminoAseed: frozen
    _, codes, _ = provq_latents(model, chains)
    for i, chain in enumerate(chains):
        want, vectors = source_codes(module, esm_encoder, chain)
        framed = torch.from_numpy(chain.backbone_mask)
        assert torch.equal(codes[i, : len(chain)][framed], want[framed])
        if framed.all():
            # StructTokenBench drops residues without coordinates before decoding; provq keeps
            # their place (masked), so only whole chains decode identically.
            got = model.decode_codes(codes[i, : len(chain)])[:, :3]
            torch.testing.assert_close(got, source_backbone(module, esm_decoder, vectors), **TOL)

    # The config route loads the same weights.
    args = {k: v for k, v in hp.items() if k != "init_from"}
    built = ProteinTokenizer(**args, init_from=f"structtokenbench:{folder}")
    assert built.codebook_loaded
    for key, value in model.state_dict().items():
        assert torch.equal(built.state_dict()[key], value), key
