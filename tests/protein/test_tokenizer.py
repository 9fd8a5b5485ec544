"""ProteinTokenizer on the core curriculum: a short ProVQ fit, AminoAseed freezing, hooks, CLI."""

from __future__ import annotations

import math
import sys

import lightning.pytorch as pl
import pytest
import torch
import yaml

from provq_lightning.callbacks.curriculum import CurriculumCallback
from provq_lightning.data.paths import REPO_ROOT
from provq_lightning.protein.geometry import CA_C, N_CA
from provq_lightning.protein.parsing import parse_structure
from provq_lightning.protein.tokenizer import MISSING_TOKEN, ProteinTokenizer
from provq_lightning.schedules import Phase
from tests.protein.helpers import TINY, cath_datamodule, chain_batch


class Snapshot(pl.Callback):
    """Copies of the base codebook and of its linear map at the first discrete step."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.base = self.proj = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.base = pl_module.quantizer.embedding.weight.detach().clone()
            self.proj = pl_module.quantizer.projection.weight.detach().clone()


@pytest.fixture(scope="module")
def cath_data(tmp_path_factory, proteins_dir):
    return cath_datamodule(tmp_path_factory.mktemp("cath") / "cache", val_fraction=0.2)


def test_provq_aminoaseed_fit_seeds_once_freezes_base_and_logs_metrics(cath_data):
    pl.seed_everything(0, verbose=False)
    model = ProteinTokenizer(variant="aminoaseed", **TINY)
    curriculum = CurriculumCallback(
        warmup_steps=4, transition_steps=3, kmeans_collect_batches=2, kmeans_iters=10
    )
    snap = Snapshot(step=8)
    trainer = pl.Trainer(
        max_steps=12,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[curriculum, snap],
        num_sanity_val_steps=0,
        limit_val_batches=2,
    )
    trainer.fit(model, cath_data)
    assert curriculum.seed_count == 1 and curriculum.seeded_at_step == 4
    assert model.phase is Phase.DISCRETE
    # AminoAseed: the base codebook C stays as seeded, only Linear(C) keeps learning.
    assert not model.quantizer.embedding.weight.requires_grad
    assert torch.equal(model.quantizer.embedding.weight, snap.base)
    assert not torch.equal(model.quantizer.projection.weight, snap.proj)
    metrics = trainer.callback_metrics
    for key in ("val/rmsd", "val/lddt", "val/utilization", "val/normalized_perplexity",
                "val/codebook_distance", "val/distance", "val/direction", "val/distogram"):
        assert key in metrics and math.isfinite(float(metrics[key])), key
    assert 0 < float(metrics["val/utilization"]) <= 1
    assert 0 <= float(metrics["val/lddt"]) <= 1 and float(metrics["val/rmsd"]) > 0


def test_tokenize_and_decode_to_pdb(tmp_path, proteins_dir):
    torch.manual_seed(0)
    model = ProteinTokenizer(**TINY).eval()
    batch = chain_batch(("1aki.pdb", "1k6p.pdb"))
    batch["residue_mask"][0, 3] = False  # a residue without a backbone frame
    pairs = model.tokenize_batch(batch)
    assert [key for key, _ in pairs] == batch["ids"]
    lengths = batch["pad_mask"].sum(-1).tolist()
    for (_, codes), n in zip(pairs, lengths, strict=True):
        assert codes.dtype == torch.int64 and codes.shape == (n,)
    key, codes = pairs[0]
    assert codes[3] == MISSING_TOKEN and (codes[torch.arange(len(codes)) != 3] >= 0).all()
    path = model.decode_tokens_to_file(key, codes, tmp_path)
    assert path == tmp_path / "1aki_A.pdb"
    chain = parse_structure(path).chains[0]
    assert len(chain) == len(codes) and chain.backbone_mask.all()
    n_xyz, ca, c = (torch.from_numpy(chain.coords[:, i]) for i in range(3))
    assert torch.allclose((ca - n_xyz).norm(dim=-1), torch.tensor(N_CA), atol=2e-3)
    assert torch.allclose((c - ca).norm(dim=-1), torch.tensor(CA_C), atol=2e-3)
    with pytest.raises(ValueError, match="token ids must lie in"):
        model.decode_codes(torch.tensor([0, 16]))


@pytest.mark.parametrize(
    "name",
    [
        "proteins_sample",
        "proteins_sample_vanilla",
        "proteins_sample_vanilla_norevival",
        "cath_vanillavq",
        "cath_vanillavq_provq",
        "cath_aminoaseed",
        "cath_aminoaseed_provq",
    ],
)
def test_configs_resolve(name, capsys):
    from provq_lightning.tools.fit import main

    argv = sys.argv
    try:
        with pytest.raises(SystemExit) as done:
            main(["--config", str(REPO_ROOT / "experiments" / f"{name}.yaml"), "--print_config"])
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    assert (done.value.code or 0) == 0, out.err[-2000:]
    cfg = yaml.safe_load(out.out)
    assert cfg["model"]["class_path"] == "provq_lightning.protein.tokenizer.ProteinTokenizer"
    curriculum = cfg["curriculum"]
    assert (curriculum["warmup_steps"] > 0) == name.endswith("provq") or name == "proteins_sample"
    if name.startswith("cath"):
        assert cfg["model"]["init_args"]["num_codes"] == 512
        assert cfg["model"]["init_args"]["code_dim"] == 1024
        assert cfg["model"]["init_args"]["variant"] == (
            "aminoaseed" if "aminoaseed" in name else "vanilla"
        )
        if name.endswith("provq"):
            assert (curriculum["warmup_steps"], curriculum["transition_steps"]) == (20000, 10000)
            assert curriculum["lam"] == 1.0 and curriculum["schedule"] == "cosine"


def test_internal_head_and_local_encoder_train_tokenize_and_decode(tmp_path, proteins_dir):
    """The CPU sample's model: local-geometry encoder, NeRF decoder. Its losses are finite and
    reach the encoder, it decodes a code sequence to a backbone of 3.8 A CA steps, and it
    writes a PDB file that reads back."""
    torch.manual_seed(0)
    model = ProteinTokenizer(**{**TINY, "encoder_type": "local", "decoder_head": "internal",
                                "local_distance_weight": 0.1})
    batch = chain_batch(("1aki.pdb", "1k6p.pdb"))
    q, out, losses, recon = model._step(batch)
    assert set(losses) == {"theta", "tau", "offsets", "local_distance"}
    assert out.backbone.shape == batch["coords"][:, :, :3].shape
    (recon + q.loss).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    model.eval()
    key, codes = model.tokenize_batch(batch)[0]
    bb = model.decode_codes(codes)
    assert bb.shape == (len(codes), 4, 3) and torch.isfinite(bb).all()
    steps = (bb[1:, 1] - bb[:-1, 1]).norm(dim=-1)
    assert torch.allclose(steps, torch.full_like(steps, 3.8), atol=1e-4)
    chain = parse_structure(model.decode_tokens_to_file(key, codes, tmp_path)).chains[0]
    assert len(chain) == len(codes)


def test_local_encoder_tokens_are_rigid_invariant_and_see_a_mirror(proteins_dir):
    from provq_lightning.protein.geometry import random_rotation

    torch.manual_seed(0)
    model = ProteinTokenizer(**{**TINY, "encoder_type": "local", "decoder_head": "internal",
                                "knn": 8}).eval()
    batch = chain_batch(("1aki.pdb",))
    z = model.encode(batch)
    rot = random_rotation(torch.Generator().manual_seed(3), dtype=torch.float32)
    moved = dict(batch, coords=batch["coords"] @ rot.T + 4.0)
    assert torch.allclose(model.encode(moved), z, atol=1e-4)
    mirrored = dict(batch, coords=batch["coords"] * torch.tensor([1.0, 1.0, -1.0]))
    assert (model.encode(mirrored) - z).abs().max() > 1e-2


def test_angle_skip_codes_hold_the_angles_and_the_decoder_starts_from_them(proteins_dir):
    """With ``angle_skip`` the latent's first 4 dimensions are the scaled (theta, tau) of the
    residue, and the untrained decoder rebuilds the trace from exactly those angles."""
    from provq_lightning.protein.internal import ca_internal, nerf_ca

    torch.manual_seed(0)
    model = ProteinTokenizer(**{**TINY, "encoder_type": "local", "decoder_head": "internal",
                                "angle_skip": 4.0}).eval()
    batch = chain_batch(("1aki.pdb",))
    z = model.encode(batch)
    ca = batch["coords"][:, :, 1]
    theta, tau, *_ = ca_internal(ca, batch["residue_mask"])
    assert torch.allclose(z[..., :4] / 4.0, torch.cat([theta, tau], -1), atol=1e-5)
    out = model.decoder(z, batch["residue_mask"], batch["pad_mask"])
    assert torch.allclose(out.backbone[:, :, 1], nerf_ca(theta, tau), atol=1e-3)
    with pytest.raises(ValueError, match="angle_skip needs code_dim > 4"):
        ProteinTokenizer(**{**TINY, "code_dim": 4, "encoder_type": "local", "angle_skip": 1.0})
