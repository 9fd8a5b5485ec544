"""Bad FASTA codes to provq-decode and bad sources to provq-prep-structures: one line naming the
file or record and the fix, and a non-zero exit, never a traceback or "decoded 0 items"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from provq_lightning.protein.prep import main as prep_main
from provq_lightning.protein.tokenizer import MISSING_TOKEN, ProteinTokenizer
from provq_lightning.tools.tokenize_cli import CodeWriter, decode_main
from tests.protein.helpers import TINY


def decode_error(argv: list[str], capsys) -> str:
    """provq-decode must fail: exit status 1 and exactly one ``provq-decode: error:`` line."""
    with pytest.raises(SystemExit) as exit_info:
        decode_main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("provq-decode: error: "), err
    return err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """config.yaml and checkpoints/last.ckpt of an untrained tiny structure tokenizer."""
    run = tmp_path_factory.mktemp("protein_run")
    torch.manual_seed(0)
    model = ProteinTokenizer(variant="vanilla", **TINY)
    config = {"model": {"class_path": "provq_lightning.protein.tokenizer.ProteinTokenizer",
                        "init_args": {"variant": "vanilla", **TINY}}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": model.state_dict()}, run / "checkpoints" / "last.ckpt")
    return run


@pytest.fixture
def fasta(tmp_path) -> Path:
    """A fasta tokenize output of two chains of different lengths (so no fixed code_shape)."""
    rng = np.random.default_rng(0)
    writer = CodeWriter(tmp_path / "tokens", "fasta", np.dtype(np.int16))
    for key, length in (("1aki_A", 12), ("3o5r_A", 9)):
        codes = rng.integers(0, TINY["num_codes"], length)
        codes[0] = MISSING_TOKEN  # a residue without a backbone frame is not an error
        writer.add(key, torch.from_numpy(codes))
    writer.close({"num_codes": TINY["num_codes"]})
    return tmp_path / "tokens"


def decode_args(tiny_run: Path, tokens: Path) -> list[str]:
    return ["--ckpt", str(tiny_run / "checkpoints" / "last.ckpt"), "--tokens", str(tokens),
            "--out", str(tokens.parent / "pdb"), "--device", "cpu"]


def edit_fasta(tokens: Path, lines: list[str]) -> Path:
    (tokens / "codes.fasta").write_text("\n".join(lines) + "\n")
    return tokens / "codes.fasta"


def test_good_fasta_decodes_every_chain(tiny_run, fasta, capsys):
    decode_main(decode_args(tiny_run, fasta))
    assert "decoded 2 items" in capsys.readouterr().out
    assert sorted(p.name for p in (fasta.parent / "pdb").iterdir()) == ["1aki_A.pdb",
                                                                        "3o5r_A.pdb"]


def test_fasta_without_headers_is_an_error_not_zero_items(tiny_run, fasta, capsys):
    lines = (fasta / "codes.fasta").read_text().splitlines()
    path = edit_fasta(fasta, lines[1::2])  # ids only, no '>key' lines
    err = decode_error(decode_args(tiny_run, fasta), capsys)
    assert f"{path}: line 1 has token ids before any '>key' header" in err
    assert not (fasta.parent / "pdb").exists()


def test_non_integer_token_names_the_record(tiny_run, fasta, capsys):
    lines = (fasta / "codes.fasta").read_text().splitlines()
    lines[3] = lines[3].replace(" ", " A", 1)  # a residue letter slipped into the ids
    path = edit_fasta(fasta, lines)
    err = decode_error(decode_args(tiny_run, fasta), capsys)
    assert f"{path}: line 4: record 2 '3o5r_A' has token 'A" in err and "not an integer" in err


def test_empty_record_names_the_record(tiny_run, fasta, capsys):
    lines = (fasta / "codes.fasta").read_text().splitlines()
    path = edit_fasta(fasta, [lines[0], *lines[2:]])  # 1aki_A lost its ids
    err = decode_error(decode_args(tiny_run, fasta), capsys)
    assert f"{path} (line 1): record 1 '1aki_A' has no token ids" in err


def test_token_outside_the_codebook_names_the_record(tiny_run, fasta, capsys):
    lines = (fasta / "codes.fasta").read_text().splitlines()
    k = TINY["num_codes"]
    lines[3] += f" {k + 5}"
    edit_fasta(fasta, lines)
    err = decode_error(decode_args(tiny_run, fasta), capsys)
    assert f"record 2 '3o5r_A' has token id {k + 5}, outside [0, {k})" in err


# -- provq-prep-structures ------------------------------------------------------------------
def prep_error(argv: list[str], capsys) -> str:
    assert prep_main([*argv, "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("provq-prep-structures: error: "), err
    return err


def test_prep_missing_source_is_one_line(tmp_path, capsys):
    err = prep_error([str(tmp_path / "nope"), "--cache-dir", str(tmp_path / "c")], capsys)
    assert f"structure source {tmp_path / 'nope'} does not exist" in err


def test_prep_folder_without_structures_is_one_line(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("no structures here\n")
    err = prep_error([str(tmp_path / "src"), "--cache-dir", str(tmp_path / "c")], capsys)
    assert "no structure files" in err and str(tmp_path / "src") in err


def test_prep_chain_list_selecting_nothing_is_one_line(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    err = prep_error([str(tmp_path / "src"), "--cache-dir", str(tmp_path / "c"), "--chains",
                      ","], capsys)
    assert "--chains ',' selects nothing" in err
