"""Shard planning, the webdataset stream, corrupt samples and provq-make-shards."""

from __future__ import annotations

import json
import logging
import tarfile
from collections import Counter

import pytest
import torch

from provq_lightning.datamodules.imagenet import ImageNetDataModule, ShardImageDataset, shard_infos
from provq_lightning.errors import ProvqError
from provq_lightning.image import shards as sh
from provq_lightning.image.make_shards import main as make_shards
from tests.image.helpers import jpeg_bytes


def plan_all(infos, world, workers, batch, epoch=0, drop_last=True):
    out = {}
    for rank in range(world):
        for worker in range(workers):
            out[rank, worker] = sh.plan_worker(
                infos, classes=None, batch_size=batch, rank=rank, world_size=world,
                worker=worker, num_workers=workers, epoch=epoch, seed=0, shuffle=True,
                drop_last=drop_last,
            )
    return out


def positions(slices):
    return [(s.url, i) for s in slices for i in range(s.start, s.stop)]


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 3), (3, 2), (4, 1)])
def test_plan_reads_each_sample_at_most_once_with_equal_batches_per_rank(world, workers):
    infos = [sh.ShardInfo(f"s{i}", n) for i, n in enumerate([50, 3, 17, 0, 31, 9])]
    batch = 4
    plans = plan_all(infos, world, workers, batch)
    seen = [p for slices, _ in plans.values() for p in positions(slices)]
    assert len(seen) == len(set(seen))  # disjoint
    per_rank = [sum(plans[r, w][1] for w in range(workers)) for r in range(world)]
    assert len(set(per_rank)) == 1 and per_rank[0] == 110 // (world * batch)
    assert len(seen) == per_rank[0] * world * batch  # exactly the full batches' samples
    for slices, n in plans.values():
        assert len(positions(slices)) == n * batch
    # Evaluation mode covers every sample exactly once.
    evals = plan_all(infos, world, workers, batch, drop_last=False)
    seen = [p for slices, _ in evals.values() for p in positions(slices)]
    assert sorted(seen) == sorted((s.url, i) for s in infos for i in range(s.count))


def test_epochs_shuffle_the_shard_order_identically_on_all_ranks():
    infos = [sh.ShardInfo(f"s{i}", 10) for i in range(8)]
    a = [s.url for s in sh.epoch_order(infos, 0, 0, True)]
    assert a == [s.url for s in sh.epoch_order(infos, 0, 0, True)]
    assert a != [s.url for s in sh.epoch_order(infos, 0, 1, True)]


def write_tar(path, samples):
    path.write_bytes(sh.tar_bytes(samples))


def sample(i, wnid="n00000001"):
    return (f"{wnid}_k{i:03d}", {"jpg": jpeg_bytes(i), "cls": b"1", "wnid": wnid.encode()})


@pytest.fixture()
def uneven_shards(tmp_path):
    sizes, i, entries = [13, 2, 9], 0, []
    for s, n in enumerate(sizes):
        write_tar(tmp_path / f"part-{s}.tar", [sample(i + j) for j in range(n)])
        entries.append({"url": f"part-{s}.tar", "count": n})
        i += n
    (tmp_path / "index.json").write_text(json.dumps({"shards": entries}))
    return tmp_path


def keys_of(dataset, world, workers=0, epoch=0):
    per_rank = []
    for rank in range(world):
        dataset.epoch, dataset.rank, dataset.world_size = epoch, rank, world
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
        batches = list(loader)
        assert len(batches) == len(dataset)
        per_rank.append([k for b in batches for k in b["key"]])
    return per_rank


def test_stream_splits_samples_across_ranks_and_workers(uneven_shards):
    infos = shard_infos(str(uneven_shards / "index.json"))
    ds = ShardImageDataset(infos, image_size=16, batch_size=3, train=True, shuffle_buffer=5)
    ranks = keys_of(ds, world=2, workers=2)
    assert [len(k) for k in ranks] == [12, 12]  # 24 samples = 2 ranks x 4 batches x 3
    flat = ranks[0] + ranks[1]
    assert len(set(flat)) == 24
    nxt = keys_of(ds, world=2, workers=2, epoch=1)
    assert nxt[0] != ranks[0]  # another epoch, another order
    batch = next(iter(ds))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (3, 3, 16, 16)
    assert batch["label"].tolist() == [1, 1, 1]
    # Validation: centre crops, every sample once, last batch partial.
    val = ShardImageDataset(infos, image_size=16, batch_size=5, train=False)
    ranks = keys_of(val, world=2)
    assert sorted(ranks[0] + ranks[1]) == sorted(f"n00000001_k{i:03d}" for i in range(24))


def test_brace_patterns_and_pipe_urls(uneven_shards):
    pattern = str(uneven_shards / "part-{0..2}.tar")
    assert len(sh.expand_urls(pattern)) == 3
    with pytest.raises(ProvqError, match="samples_per_shard"):  # one line, not a traceback
        shard_infos(pattern)
    piped = [sh.ShardInfo(f"pipe:cat {uneven_shards / 'part-0.tar'}", 13)]
    ds = ShardImageDataset(piped, image_size=8, batch_size=13, train=False)
    assert len(next(iter(ds))["key"]) == 13


BAD_KEYS = ("n00000001_trunc", "n00000001_text", "n00000001_noimg")


def write_bad_shard(folder):
    """One 13-sample shard: 10 good JPEGs, a truncated JPEG, a non-image and no image member."""
    good = [sample(i) for i in range(10)]
    truncated = (BAD_KEYS[0], {"jpg": jpeg_bytes(99)[:300], "cls": b"1"})
    not_image = (BAD_KEYS[1], {"jpg": b"this is not a jpeg", "cls": b"1"})
    no_image = (BAD_KEYS[2], {"txt": b"caption only"})
    write_tar(folder / "bad.tar", good[:5] + [truncated, not_image, no_image] + good[5:])
    entries = [{"url": "bad.tar", "count": 13}]
    (folder / "index.json").write_text(json.dumps({"shards": entries}))
    return folder / "index.json"


def test_corrupt_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    dm = ImageNetDataModule(str(write_bad_shard(tmp_path)), image_size=16, batch_size=4,
                            num_workers=0, shuffle_buffer=0)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING, logger="provq.data"):
        batches = [dm.on_before_batch_transfer(b, 0) for b in dm.train_dataloader()]
    assert len(batches) == 3 and all(len(b["key"]) == 4 for b in batches)  # 13 // 4, fixed
    # 12 of the 13 are this epoch's quota; 3 of them are corrupt, so 3 decoded ones repeat.
    assert dm.skipped_count == 3 and dm.refilled_count == 3
    text = caplog.text
    for key in ("n00000001_trunc", "n00000001_text", "n00000001_noimg"):
        assert key in text
    assert "bad.tar" in text and "no image member" in text
    seen = [k for b in batches for k in b["key"]]
    assert not set(BAD_KEYS) & set(seen)


def test_training_runs_through_a_corrupt_shard_and_logs_the_counts(tmp_path):
    """A real fit over the bad shard (a worker process, two epochs): no crash, every step
    runs, and the skipped/refilled counts reach the logger."""
    import csv

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from provq_lightning.image.tokenizer import ImageTokenizer
    from tests.image.helpers import TINY

    L.seed_everything(0)
    dm = ImageNetDataModule(str(write_bad_shard(tmp_path)), image_size=16, batch_size=4,
                            num_workers=1, shuffle_buffer=4)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=CSVLogger(tmp_path, "log"),
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(ImageTokenizer(**{**TINY, "disc_start": 2}), dm)
    assert trainer.global_step == 6  # 3 batches per epoch, corrupt samples or not
    # Each epoch's quota of 12 holds all 3 bad samples (13 in the shard, one left over) or 2.
    assert 5 <= dm.skipped_count <= 6 and dm.refilled_count == dm.skipped_count
    rows = list(csv.DictReader((tmp_path / "log" / "version_0" / "metrics.csv").open()))
    logged = [float(r["data/skipped_samples_rank0"]) for r in rows
              if r.get("data/skipped_samples_rank0")]
    assert logged and logged[-1] == dm.skipped_count


def test_truncated_tar_ends_the_shard_without_crashing(tmp_path):
    data = sh.tar_bytes([sample(i) for i in range(8)])
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    ds = ShardImageDataset([sh.ShardInfo(str(tmp_path / "cut.tar"), 8)], image_size=8,
                           batch_size=2, train=True, shuffle_buffer=0)
    batches = list(ds)
    assert len(batches) == 4  # fixed count, topped up from what could be read
    skipped = [s for b in batches for s in b["skipped"]]
    assert skipped and skipped[0][1] == "<rest of shard>" and "expected 8" in skipped[0][2]


def test_make_shards_keeps_bytes_shuffles_and_indexes(flat_folder, tmp_path, capsys):
    root, keys = flat_folder
    out = tmp_path / "shards"
    make_shards([str(root), str(out), "--shard-size", "10", "--seed", "3"])
    assert "wrote 37 samples in 4 shards" in capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [10, 10, 10, 7]
    stored = {}
    for s in index["shards"]:
        with tarfile.open(out / s["url"]) as tar:
            for m in tar.getmembers():
                stored[m.name] = tar.extractfile(m).read()
    order = [n.rsplit(".", 1)[0] for n in stored if n.endswith(".jpeg")]
    assert sorted(order) == sorted(keys) and order != sorted(keys)  # all there, shuffled
    for key in keys[:5]:
        assert stored[f"{key}.jpeg"] == (root / f"{key}.JPEG").read_bytes()
        assert stored[f"{key}.wnid"].decode() == key.split("_")[0]
    assert Counter(stored[n].decode() for n in stored if n.endswith(".cls")) == Counter(
        {"0": 10, "1": 9, "2": 9, "3": 9})


def test_class_subset_from_a_list_file(flat_folder, tmp_path):
    root, keys = flat_folder
    out = tmp_path / "shards"
    make_shards([str(root), str(out), "--shard-size", "8"])
    wanted = tmp_path / "classes.txt"
    wanted.write_text("# two classes\nn01000000\nn01000002\n")
    dm = ImageNetDataModule(str(out / "index.json"), val_shards=str(out / "index.json"),
                            image_size=16, batch_size=4, num_workers=0, class_list=str(wanted))
    dm.setup("fit")
    keys_seen = [k for b in dm.val_dataloader() for k in b["key"]]
    expected = [k for k in keys if k.startswith(("n01000000", "n01000002"))]
    assert sorted(keys_seen) == sorted(expected)


def test_imagenet_layout_is_accepted(tmp_path):
    for wnid in ("n02000001", "n02000002"):
        (tmp_path / "train" / wnid).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg_bytes(i))
    make_shards([str(tmp_path / "train"), str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "index.json").read_text())["total"] == 6
    with pytest.raises(ValueError, match="wnid"):
        (tmp_path / "flat").mkdir()
        (tmp_path / "flat" / "holiday.jpg").write_bytes(jpeg_bytes(0))
        make_shards([str(tmp_path / "flat"), str(tmp_path / "out2")])
