"""Every structure file loads the same way from a folder, a file or a list: suffix-less files
(CATH dompdb) are sniffed by content, a structure file is never read as a list of paths, and
the load/skip/ignore counts reach provq-fit's output."""

from __future__ import annotations

import gzip
import logging
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from provq_lightning.errors import ProvqError
from provq_lightning.protein.cache import discover, load_manifest, prepare_cache
from provq_lightning.protein.parsing import parse_structure, sniff_file
from tests.protein.helpers import EDGE, TINY


@pytest.fixture
def dompdb(tmp_path, proteins_dir) -> Path:
    """The shared CATH domains as CATH ships them: files named by domain id, no suffix."""
    out = tmp_path / "dompdb"
    out.mkdir()
    for path in sorted((proteins_dir / "cath_domains").glob("*.pdb")):
        shutil.copy(path, out / path.stem)  # copies: discover() resolves symlinks to .pdb
    return out


def test_folder_of_suffixless_dompdb_files_loads_every_file(dompdb, tmp_path):
    n = len(list(dompdb.iterdir()))
    assert n == 20 and all(p.suffix == "" for p in dompdb.iterdir())
    # Other formats without a suffix are sniffed too, gzipped or not; text is not a structure.
    shutil.copy(EDGE / "1aki.cif", dompdb / "1aki")
    (dompdb / "3o5r").write_bytes(gzip.compress((EDGE / "3o5r.pdb").read_bytes()))
    (dompdb / "README").write_text("CATH domain boundaries, release 4.3\n")
    manifest = prepare_cache([dompdb], tmp_path / "c", progress=False)
    c = manifest["counts"]
    assert (c["files"], c["loaded"], c["skipped"], c["ignored"]) == (n + 2, n + 2, 0, 1)
    assert manifest["files"][str(dompdb / "README")]["status"] == "ignored"
    chains = {i for r in manifest["files"].values() for i in r.get("chains", [])}
    assert {"1a04A02_A", "1aki_A", "3o5r_A"} <= chains  # entry = the domain id, as CATH names it


def test_single_suffixless_file_is_one_structure_not_a_list(dompdb, tmp_path):
    path = dompdb / "1a04A02"
    assert sniff_file(path) == "pdb"
    assert discover([path]).files == [path.resolve()]
    manifest = prepare_cache([path], tmp_path / "c", progress=False)
    c = manifest["counts"]
    assert (c["files"], c["loaded"], c["skipped"]) == (1, 1, 0)
    assert c["chains"]["train"] + c["chains"]["val"] == 1
    ref = parse_structure(EDGE.parent / "cath_domains" / "1a04A02.pdb").chains[0]
    assert len(parse_structure(path).chains[0]) == len(ref) == 80


def test_list_file_of_suffixless_paths_and_a_list_naming_nothing(dompdb, tmp_path):
    listing = tmp_path / "domains.txt"
    listing.write_text("# two CATH domains\ndompdb/1a04A02\ndompdb/4gs3A00  # a comment\n")
    assert [p.name for p in discover([listing]).files] == ["1a04A02", "4gs3A00"]
    stray = tmp_path / "notes.txt"
    stray.write_text("these are notes\nnot paths\n")
    with pytest.raises(ProvqError, match="neither a structure file") as err:
        discover([stray])
    assert str(stray) in str(err.value) and len(str(err.value).splitlines()) == 1


def test_many_ignored_files_warn_once_and_list_each_at_debug(dompdb, tmp_path, caplog):
    for i in range(5):
        (dompdb / f"notes{i}.txt").write_text(f"note {i}\n")
    from provq_lightning.protein.prep import main as prep_main

    with caplog.at_level(logging.DEBUG, logger="provq.protein"):
        assert prep_main([str(dompdb), "--cache-dir", str(tmp_path / "c"), "--quiet"]) == 0
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    debug = [m for level, m in messages if level == logging.DEBUG and m.startswith("ignored ")]
    warn = [m for level, m in messages if level == logging.WARNING and "ignored 5 files" in m]
    assert len(debug) == 5 and len(warn) == 1
    assert load_manifest(tmp_path / "c")["counts"]["loaded"] == 20


def test_provq_fit_prints_the_counts_line(tmp_path, proteins_dir, capsys):
    from provq_lightning.tools.fit import main

    src = tmp_path / "src"
    src.mkdir()
    for name in ("1aki.pdb", "1k6p.cif"):
        shutil.copy(EDGE / name, src / name)
    (src / "broken.pdb").write_text("")
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": 1, "accelerator": "cpu", "devices": 1, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "limit_val_batches": 0,
                    "default_root_dir": str(tmp_path / "runs")},
        "model": {"class_path": "provq_lightning.protein.tokenizer.ProteinTokenizer",
                  "init_args": {"variant": "vanilla", **TINY}},
        "data": {"class_path": "provq_lightning.datamodules.proteins.ProteinStructureDataModule",
                 "init_args": {"sources": str(src), "cache_dir": str(tmp_path / "cache"),
                               "crop_length": 32, "val_fraction": 0.0, "batch_size": 2}},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = sys.argv
    try:
        main(["fit", "--config", str(path)])
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert "structures: 3 structure files: 2 loaded, 1 skipped (0 other files ignored)" in out
    assert "chains train 3, val 0" in out
