"""provq-tokenize / provq-decode on a structure tokenizer: FASTA-like codes per chain, backbone
PDB files biotite reads back, both equal to the model's own tokens and decodings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from provq_lightning.protein.parsing import parse_structure
from provq_lightning.protein.tokenizer import MISSING_TOKEN
from provq_lightning.tools.tokenize_cli import (
    dataloader,
    decode_main,
    load_run,
    read_codes,
    tokenize_main,
)
from tests.protein.helpers import TINY, fit_tiny_run

FILES = ("1aki.pdb", "1k6p.pdb", "3o5r.cif")  # 4 chains


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, proteins_dir) -> Path:
    """A 4-step provq-fit of a tiny model with the proteins_sample config's layout."""
    out = tmp_path_factory.mktemp("protein_runs")
    run = fit_tiny_run(out, FILES)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    timing = json.loads((run / "timing.json").read_text())
    assert timing["global_step"] == 4 and timing["cpu_s"] > 0 and timing["wall_s"] > 0
    # provq-tokenize must not depend on the fit's cache still being there.
    shutil.rmtree(out / "cache")
    return run


def test_tokenize_fasta_then_decode_to_backbone_pdb(trained_run, tmp_path, capsys):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    tokens = tmp_path / "tokens"
    tokenize_main(["--ckpt", str(ckpt), "--out", str(tokens), "--format", "fasta",
                   "--device", "cpu"])
    lines = (tokens / "codes.fasta").read_text().splitlines()
    keys = [line[1:] for line in lines[0::2]]
    assert len(lines) == 8 and all(line.startswith(">") for line in lines[0::2])
    assert sorted(keys) == ["1aki_A", "1k6p_A", "1k6p_B", "3o5r_A"]
    meta = json.loads((tokens / "meta.json").read_text())
    assert meta["count"] == 4 and meta["num_codes"] == TINY["num_codes"]
    codes = dict(read_codes(tokens))

    # The same ids as the model's own tokens of every full (uncropped) chain.
    model, cfg = load_run(ckpt, None, None, "cpu")
    loader, _ = dataloader(cfg, "predict")
    for batch in loader:
        (key, expected), = model.tokenize_batch(batch)
        assert torch.equal(codes[key], expected)
        assert ((expected >= 0) | (expected == MISSING_TOKEN)).all()
        assert int(expected.max()) < TINY["num_codes"]

    out = tmp_path / "pdb"
    decode_main(["--ckpt", str(ckpt), "--tokens", str(tokens), "--out", str(out),
                 "--keys", "1aki_A", "3o5r_A", "--device", "cpu"])
    assert "decoded 2 items" in capsys.readouterr().out
    for key in ("1aki_A", "3o5r_A"):
        chain = parse_structure(out / f"{key}.pdb").chains[0]  # read back with biotite
        assert len(chain) == len(codes[key]) and chain.backbone_mask.all()
        expected = model.decode_codes(codes[key]).numpy()
        assert abs(chain.coords - expected).max() < 1e-3  # PDB keeps 3 decimals
