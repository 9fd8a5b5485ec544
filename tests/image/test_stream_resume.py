"""The shard stream resumes mid-epoch: a run killed at a (seeded) random step and resumed from
``last.ckpt`` trains every later step on the batches the uninterrupted run used, with 1 and with
2 DDP processes, over shards holding a corrupt sample and a truncated tar. Also: skipping on
resume decodes nothing, and a truncated shard reports how many samples it lost."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from provq_lightning.data.stream_position import StreamPosition
from provq_lightning.datamodules.imagenet import (
    CROP_DRAWS,
    REST_OF_SHARD,
    ImageNetDataModule,
    ResumableShardLoader,
    ShardImageDataset,
    shard_infos,
)
from provq_lightning.image import shards as sh
from provq_lightning.image.transforms import random_crop
from tests.distributed.stream_resume import check_kill_and_resume
from tests.image.helpers import TINY, jpeg_bytes

SIZES = (13, 2, 9, 11)  # 35 samples; one corrupt JPEG in shard 0, shard 2 cut in half
CORRUPT = "n00000001_corrupt"


def sample(i: int) -> tuple[str, dict[str, bytes]]:
    return f"n00000001_k{i:03d}", {"jpg": jpeg_bytes(i), "cls": b"1", "wnid": b"n00000001"}


@pytest.fixture(scope="module")
def messy_shards(tmp_path_factory) -> Path:
    """Uneven shards with a corrupt sample and a truncated tar; returns the index."""
    root = tmp_path_factory.mktemp("messy")
    entries, first = [], 0
    for s, n in enumerate(SIZES):
        samples = [sample(first + j) for j in range(n)]
        if s == 0:
            samples[3] = (CORRUPT, {"jpg": b"not a jpeg", "cls": b"1", "wnid": b"n00000001"})
        data = sh.tar_bytes(samples)
        if s == 2:
            data = data[: len(data) // 2]
        (root / f"part-{s}.tar").write_bytes(data)
        entries.append({"url": f"part-{s}.tar", "count": n})
        first += n
    (root / "index.json").write_text(json.dumps({"shards": entries}))
    return root / "index.json"


def test_crop_draws_match_random_crop():
    """A skipped sample draws CROP_DRAWS values, which must be what random_crop consumes."""
    img = Image.new("RGB", (40, 30))
    rng = random.Random(3)
    random_crop(img, 16, rng)
    replay = random.Random(3)
    for _ in range(CROP_DRAWS):
        replay.random()
    assert rng.random() == replay.random()


def loader(ds: ShardImageDataset, workers: int, state: dict | None = None) -> DataLoader:
    """The training loader in epoch 1, resumed from ``state`` if given."""
    out = ResumableShardLoader(ds, batch_size=None, num_workers=workers,
                               context=lambda: (1, 0, 1), position=StreamPosition(),
                               slots=max(1, workers))
    if state is not None:
        out.load_state_dict(state)
    return out


def state_after(ds: ShardImageDataset, full: list[dict], taken: int, workers: int) -> dict:
    """The loader state a checkpoint holds after training steps took ``full[:taken]``, each
    counted as ``ImageNetDataModule.on_before_batch_transfer`` counts it."""
    it = loader(ds, workers)
    it.position.begin(1, 0, it.layout(1))
    for b in full[:taken]:
        bad = [(s, k) for s, k, *_ in b["skipped"] if k != REST_OF_SHARD]
        it.position.consumed(b["worker"], bad)
    return it.state_dict()


def batches(ds: ShardImageDataset, workers: int, state: dict | None = None) -> list[dict]:
    return list(loader(ds, workers, state))


def messy_dataset(index: Path) -> ShardImageDataset:
    return ShardImageDataset(shard_infos(str(index)), image_size=8, batch_size=3, train=True,
                             shuffle_buffer=5)


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_continues_with_the_same_batches_and_crops(messy_shards, workers):
    ds = messy_dataset(messy_shards)
    full = batches(ds, workers)
    assert len(full) == len(ds) == sum(SIZES) // 3  # topped up: the count is fixed
    for taken in (1, 4, 7):
        rest = batches(ds, workers, state_after(ds, full, taken, workers))
        assert [b["key"] for b in rest] == [b["key"] for b in full[taken:]]
        for got, want in zip(rest, full[taken:], strict=True):
            assert torch.equal(got["image"], want["image"])  # the same crops


def test_resume_skips_without_decoding(messy_shards, monkeypatch):
    """Batches taken before the resume are rebuilt without decoding; only images that reach a
    batch (and the few read ahead into the shuffle buffer) are."""
    ds = messy_dataset(messy_shards)
    full = batches(ds, 0)
    decoded = []
    real = ShardImageDataset._transform

    def counting(self, s, rng):
        decoded.append(s.key)
        return real(self, s, rng)

    monkeypatch.setattr(ShardImageDataset, "_transform", counting)
    rest = batches(ds, 0, state_after(ds, full, 8, 0))
    assert len(rest) == len(full) - 8 and len(decoded) <= 3 * len(rest) + 5  # + a buffer
    skipped_keys = {k for b in full[:8] for k in b["key"]}
    assert not skipped_keys & (set(decoded) - {k for b in rest for k in b["key"]})


def test_truncated_shard_reports_the_samples_it_lost(messy_shards, caplog):
    dm = ImageNetDataModule(str(messy_shards), image_size=8, batch_size=3, num_workers=0,
                            shuffle_buffer=0)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING, logger="provq.data"):
        for b in dm.train_dataloader():
            dm.on_before_batch_transfer(b, 0)
    lost = [r.getMessage() for r in caplog.records if "ended early" in r.getMessage()]
    assert len(lost) == 1 and "part-2.tar" in lost[0]
    n = int(lost[0].split("lost ")[1].split()[0])
    assert 0 < n < SIZES[2]  # half the tar: some samples read, the rest counted
    assert dm.skipped_count == n + 1  # and the corrupt JPEG


MODEL = {"class_path": "provq_lightning.image.tokenizer.ImageTokenizer",
         "init_args": {**{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()},
                       "disc_start": 1000}}


@pytest.mark.parametrize("world_size", [1, 2], ids=["1proc", "ddp2"])
def test_sigkill_mid_epoch_then_resume_trains_on_the_same_batches(
    tmp_path, messy_shards, world_size
):
    """Through provq-fit and Lightning's checkpointing. Without loader workers: in a child of
    the tests' fork server each worker would start through it, seconds per epoch; the worker
    bookkeeping is covered by the loader-level test above."""
    batch, workers = 4, 0
    data = {"class_path": "provq_lightning.datamodules.imagenet.ImageNetDataModule",
            "init_args": {"train_shards": str(messy_shards), "image_size": 8,
                          "batch_size": batch, "num_workers": workers, "shuffle_buffer": 5}}
    per_epoch = sum(SIZES) // (batch * world_size)
    # A seeded random step in the second epoch, not on its boundary; run into the third.
    kill_at = random.Random(world_size).randrange(per_epoch + 1, 2 * per_epoch)
    ref = check_kill_and_resume(tmp_path, MODEL, data, field="key", world_size=world_size,
                                max_steps=2 * per_epoch + 1, kill_at=kill_at)
    epochs = [[r["epoch"] for r in rows] for rows in ref]
    assert epochs[0][per_epoch] == 1 and epochs[0][-1] == 2
    if world_size == 2:  # the ranks read disjoint samples of every epoch
        for e in (0, 1):
            keys = [set(k for r in rows if r["epoch"] == e for k in r["keys"]) for rows in ref]
            assert not keys[0] & keys[1]


def test_image_folder_loader_resumes_with_the_same_images_and_crops(flat_folder):
    from provq_lightning.datamodules.image_folder import ImageFolderDataModule

    def fresh() -> ImageFolderDataModule:
        dm = ImageFolderDataModule(str(flat_folder[0]), image_size=16, batch_size=4)
        dm.setup("fit")
        return dm

    dm = fresh()
    full = list(dm.train_dataloader())
    loader = dm.train_dataloader()
    for _ in zip(range(3), loader, strict=False):
        dm.position.consumed()
    other = fresh()
    resumed = other.train_dataloader()
    resumed.load_state_dict(loader.state_dict())
    rest = list(resumed)
    assert [b["key"] for b in rest] == [b["key"] for b in full[3:]]
    for got, want in zip(rest, full[3:], strict=True):
        assert torch.equal(got["image"], want["image"])
