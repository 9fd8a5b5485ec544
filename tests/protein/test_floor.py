"""The k-means (theta, tau) + NeRF floor: the CLI writes the metrics a trained run writes, so the
report puts it in the same table; bad inputs are one-line errors."""

from __future__ import annotations

import json

import pytest
import yaml

from provq_lightning.data.paths import REPO_ROOT
from provq_lightning.protein import floor
from provq_lightning.protein.report import main as report_main
from provq_lightning.runs.loading import read_config
from tests.protein.helpers import EDGE, chain_batch, need_shared_data


def _config(tmp_path, **data) -> str:
    cfg = read_config(REPO_ROOT / "experiments" / "proteins_sample.yaml")  # with its base
    cfg["data"]["init_args"].update(
        sources=str(need_shared_data() / "cath_domains"), cache_dir=str(tmp_path / "cache"),
        train_sources=str(EDGE), train_holdout=0.3, crop_length=64, **data)
    path = tmp_path / "floor.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_floor_cli_scores_validation_and_held_out_chains(tmp_path, capsys):
    config = _config(tmp_path)
    floor.main(["--config", config, "--num-codes", "16", "--out", str(tmp_path / "f0")])
    metrics = json.loads((tmp_path / "f0" / "metrics.json").read_text())
    assert metrics["global_step"] == 0 and metrics["num_codes"] == 16
    for key in ("val/lddt", "val/tm_score", "val/rmsd", "val/utilization", "val/perplexity"):
        assert key in metrics
    # Even 16 codes of two angles rebuild local geometry far above a structure-blind chain.
    assert 0.5 < metrics["val/lddt"] <= 1.0 and 0 < metrics["val/utilization"] <= 1.0
    assert "k-means floor K=16 seed 0 (val" in capsys.readouterr().out
    floor.main(["--config", config, "--num-codes", "16", "--split", "holdout",
                "--whole-chains", "--out", str(tmp_path / "h0")])
    held = json.loads((tmp_path / "h0" / "metrics.json").read_text())
    assert 0.3 < held["test/lddt"] <= 1.0
    # The report reads the floor folder like a run folder.
    report_main([f"floor={tmp_path / 'f0'}"])
    assert "| floor | 0 |" in capsys.readouterr().out


def test_more_codes_reconstruct_better():
    need_shared_data()
    batch = chain_batch(("1aki.pdb", "1k6p.pdb", "3o5r.pdb"))
    scores = []
    for k in (4, 64):
        centres = floor.fit_codebook([batch], k, seed=0)
        scores.append(floor.evaluate([batch], centres, "val")["val/lddt"])
    assert scores[1] > scores[0] + 0.1


def test_floor_cli_bad_inputs_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {}\n")
    with pytest.raises(SystemExit):
        floor.main(["--config", str(bad), "--out", str(tmp_path / "o")])
    assert "has no 'data' section" in capsys.readouterr().err
    config = _config(tmp_path)
    cfg = yaml.safe_load(open(config))
    for key in ("train_sources", "train_holdout"):
        cfg["data"]["init_args"].pop(key)
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit):
        floor.main(["--config", str(tmp_path / "plain.yaml"), "--num-codes", "8",
                    "--split", "holdout", "--out", str(tmp_path / "o")])
    assert "holds out no chains" in capsys.readouterr().err
