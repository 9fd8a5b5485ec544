"""The structure cache: counts and skip reasons, deterministic split, reuse, datamodule reads."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import torch

from provq_lightning.datamodules.proteins import CachedStructures, ProteinStructureDataModule
from provq_lightning.errors import ProvqError
from provq_lightning.protein import cache as cache_mod
from provq_lightning.protein.batching import collate_structures
from provq_lightning.protein.cache import (
    assign_splits,
    load_manifest,
    load_shard,
    prepare_cache,
    unpack_chain,
)
from provq_lightning.protein.parsing import parse_structure
from provq_lightning.protein.prep import main as prep_main
from tests.protein.helpers import EDGE


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory, proteins_dir):
    out = tmp_path_factory.mktemp("cache") / "shared"
    prepare_cache([proteins_dir], out, workers=2, progress=False)
    return out


def test_every_shared_file_loads_or_is_skipped_with_a_reason(shared_cache, proteins_dir):
    manifest = load_manifest(shared_cache)
    files = [p for p in proteins_dir.rglob("*") if p.is_file()]
    assert set(manifest["files"]) == {str(p.resolve()) for p in files}
    c = manifest["counts"]
    assert c["loaded"] + c["skipped"] == c["files"]
    assert c["files"] + c["ignored"] == len(files)
    for report in manifest["files"].values():
        assert report["status"] in ("loaded", "skipped", "ignored")
        if report["status"] != "loaded":
            assert report["reason"]
    # The README of the sample set: all 213 structure files parse, README.rst is no structure.
    assert (c["files"], c["loaded"], c["skipped"], c["ignored"]) == (213, 213, 0, 1)
    assert c["chains"]["train"] + c["chains"]["val"] == 309
    assert c["chains"]["val"] > 0


def test_broken_corpus_gives_named_skips_and_one_log_line_each(
    broken_corpus, tmp_path, caplog, capsys
):
    src = tmp_path / "src"
    src.mkdir()
    for path in broken_corpus.values():
        shutil.copy(path, src / path.name)
    shutil.copy(EDGE / "1aki.pdb", src / "1aki.pdb")
    with caplog.at_level(logging.WARNING, logger="provq.protein"):
        code = prep_main([str(src), "--cache-dir", str(tmp_path / "c"), "--quiet"])
    assert code == 0
    manifest = load_manifest(tmp_path / "c")
    assert manifest["counts"]["skipped"] == len(broken_corpus)
    assert manifest["counts"]["loaded"] == 1
    skipped_lines = (tmp_path / "c" / "skipped.tsv").read_text().splitlines()
    assert len(skipped_lines) == len(broken_corpus)
    for path in broken_corpus.values():
        lines = [r.getMessage() for r in caplog.records if path.name in r.getMessage()]
        assert len(lines) == 1 and lines[0].startswith("skipped ")
    assert f"{len(broken_corpus)} skipped" in capsys.readouterr().out


def test_split_is_deterministic_by_entry():
    entries = [f"{i}abc" for i in range(200)] + ["1aki.pdb", "1aki.cif"]
    split = assign_splits(entries, 0.2, seed=0)
    assert split == assign_splits(list(reversed(entries)), 0.2, seed=0)
    subset = assign_splits(entries[:50], 0.2, seed=0)
    assert all(subset[e] == split[e] for e in entries[:50])  # independent of the other files
    assert split["1aki.pdb"] == split["1aki.cif"]  # one entry, one split
    assert 20 < sum(v == "val" for v in split.values()) < 60
    assert split != assign_splits(entries, 0.2, seed=1)
    assert "val" in assign_splits(["a", "b"], 0.01, seed=0).values()


def test_cached_chains_equal_parsed_chains(shared_cache):
    manifest = load_manifest(shared_cache)
    shard = load_shard(shared_cache / manifest["shards"]["train"][0]["file"])
    ids = shard["ids"]
    chain = unpack_chain(shard, ids.index("1k6p.pdb_B"))
    ref = next(c for c in parse_structure(EDGE / "1k6p.pdb").chains if c.id == "1k6p_B")
    np.testing.assert_array_equal(chain.coords, ref.coords)
    np.testing.assert_array_equal(chain.residue_index, ref.residue_index)
    assert chain.sequence == ref.sequence


def test_up_to_date_cache_is_reused_and_a_changed_file_rebuilds(
    tmp_path, monkeypatch, proteins_dir
):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(EDGE / "1aki.pdb", src)
    out = tmp_path / "c"
    first = prepare_cache([src], out, progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("an up-to-date cache must not be parsed again")

    monkeypatch.setattr(cache_mod, "parse_files", fail)
    assert prepare_cache([src], out, progress=False)["fingerprint"] == first["fingerprint"]
    os.utime(src / "1aki.pdb", ns=(1, 1))
    with pytest.raises(AssertionError, match="must not be parsed"):
        prepare_cache([src], out, progress=False)


def test_dataset_crops_centres_and_collates(shared_cache):
    full = CachedStructures(shared_cache, ("train", "val"), crop_length=None)
    lengths = [full[i]["coords"].shape[0] for i in range(len(full))]
    long_i = int(np.argmax(lengths))
    train = CachedStructures(shared_cache, ("train", "val"), crop_length=64, random_crop=True)
    torch.manual_seed(0)
    crops = [train[long_i] for _ in range(4)]
    assert all(c["coords"].shape == (64, 4, 3) for c in crops)
    assert len({c["coords"][0, 1].sum().item() for c in crops}) > 1  # windows move
    item = CachedStructures(shared_cache, ("train", "val"), crop_length=64)[long_i]
    ca = item["coords"][item["residue_mask"], 1]
    assert ca.mean(0).abs().max() < 1e-3
    assert item["residue_index"][0] == 0
    batch = collate_structures([full[0], item])
    n = max(lengths[0], 64)
    assert batch["coords"].shape == (2, n, 4, 3)
    assert batch["pad_mask"].sum().item() == lengths[0] + 64
    assert not torch.isnan(batch["coords"]).any()
    assert (batch["residue_mask"] <= batch["pad_mask"]).all()


def test_datamodule_builds_its_cache_and_loads(tmp_path, proteins_dir):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("1aki.pdb", "1k6p.pdb", "3o5r.cif"):
        shutil.copy(EDGE / name, src)
    dm = ProteinStructureDataModule(
        sources=str(src), cache_dir=str(tmp_path / "c"), val_fraction=0.3, batch_size=2
    )
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["coords"].shape[0] == min(2, len(dm.train_set))
    assert len(list(dm.predict_dataloader())) == 4


def test_fingerprint_follows_the_parser_and_biotite_versions(tmp_path, monkeypatch, proteins_dir):
    import biotite

    from provq_lightning.protein import parsing

    src = tmp_path / "1aki.pdb"
    shutil.copy(EDGE / "1aki.pdb", src)
    settings = cache_mod.CacheSettings()
    base = cache_mod.fingerprint([src], settings)
    assert cache_mod.fingerprint([src], settings) == base
    monkeypatch.setattr(parsing, "PARSER_VERSION", parsing.PARSER_VERSION + 1)
    bumped = cache_mod.fingerprint([src], settings)
    assert bumped != base
    monkeypatch.setattr(biotite, "__version__", biotite.__version__ + ".post1")
    assert cache_mod.fingerprint([src], settings) not in (base, bumped)
    manifest = prepare_cache([src], tmp_path / "c", progress=False)
    assert manifest["readers"] == {"parser": parsing.PARSER_VERSION,
                                   "biotite": biotite.__version__}


def test_a_shard_removed_during_a_run_is_one_line_naming_it_and_the_fix(tmp_path):
    gone = tmp_path / "cache" / "train-00000.pt"
    with pytest.raises(ProvqError, match="disappeared during the run") as err:
        load_shard(gone)
    message = str(err.value)
    assert str(gone) in message and "--ckpt_path last" in message and "\n" not in message
