"""The protein loader resumes mid-epoch: a run killed at a (seeded) random step and resumed from
``last.ckpt`` trains every later step on the chains (and crop windows) the uninterrupted run
used, with 1 and with 2 DDP processes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from provq_lightning.datamodules.proteins import ProteinStructureDataModule
from provq_lightning.protein.cache import prepare_cache
from tests.distributed.stream_resume import check_kill_and_resume

BATCH = 2
CROP = 24
MODEL = {
    "class_path": "provq_lightning.protein.tokenizer.ProteinTokenizer",
    "init_args": {"num_codes": 16, "code_dim": 8, "encoder_dim": 16, "encoder_heads": 2,
                  "encoder_layers": 1, "knn": 8, "rel_pos_bins": 8, "decoder_dim": 16,
                  "decoder_heads": 2, "decoder_layers": 1, "pair_dim": 8},
}


@pytest.fixture(scope="module")
def domains_cache(tmp_path_factory, proteins_dir) -> tuple[Path, Path]:
    """The 20 CATH domains, parsed once: (sources, cache directory)."""
    sources = proteins_dir / "cath_domains"
    cache = tmp_path_factory.mktemp("resume") / "cache"
    prepare_cache([sources], cache, workers=1, progress=False)
    return sources, cache


def datamodule(sources: Path, cache: Path) -> ProteinStructureDataModule:
    return ProteinStructureDataModule(str(sources), cache_dir=str(cache), crop_length=CROP,
                                      batch_size=BATCH)


def test_loader_resumes_with_the_same_chains_and_crops(domains_cache):
    """Taking k batches, saving, and restoring into a fresh datamodule continues the epoch
    exactly (coordinates equal: the same random crop windows)."""
    dm = datamodule(*domains_cache)
    dm.setup("fit")
    full = list(dm.train_dataloader())
    assert len(full) > 3 and any(b["coords"].shape[1] == CROP for b in full)
    for taken in (1, len(full) // 2):
        loader = dm.train_dataloader()
        for _ in zip(range(taken), loader, strict=False):
            dm.position.consumed()
        state = loader.state_dict()
        fresh = datamodule(*domains_cache)
        fresh.setup("fit")
        resumed = fresh.train_dataloader()
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert [b["ids"] for b in rest] == [b["ids"] for b in full[taken:]]
        for got, want in zip(rest, full[taken:], strict=True):
            assert torch.equal(got["coords"], want["coords"])
    # A finished epoch is saved as the start of the next one.
    loader = dm.train_dataloader()
    for _ in loader:
        dm.position.consumed()
    assert loader.state_dict()["epoch"] == 1


@pytest.mark.parametrize("world_size", [1, 2], ids=["1proc", "ddp2"])
def test_sigkill_mid_epoch_then_resume_trains_on_the_same_chains(
    tmp_path, domains_cache, world_size
):
    sources, cache = domains_cache
    dm = datamodule(sources, cache)
    dm.setup("fit")
    chains = len(dm.train_set)
    per_epoch = -(-chains // (world_size * BATCH))  # DistributedSampler pads, no drop_last
    data = {"class_path": "provq_lightning.datamodules.proteins.ProteinStructureDataModule",
            "init_args": {"sources": str(sources), "cache_dir": str(cache),
                          "crop_length": CROP, "batch_size": BATCH}}
    kill_at = random.Random(world_size).randrange(1, per_epoch)  # mid first epoch
    ref = check_kill_and_resume(tmp_path, MODEL, data, field="ids", world_size=world_size,
                                max_steps=per_epoch + 2, kill_at=kill_at)
    assert ref[0][per_epoch]["epoch"] == 1
