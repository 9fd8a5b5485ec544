"""Evaluating a trained structure tokenizer on new structures: ``provq-fit test --config
<run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt --data.init_args.test_sources DIR``
writes into ``<run>/eval/...`` and leaves every file of the training run byte-identical."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from provq_lightning.data.paths import REPO_ROOT
from tests.helpers import effective_config, provq_fit, run_files
from tests.protein.helpers import EDGE, PROTEINS, TINY, drop_train_sources

TRAIN_FILES = ("1aki.pdb", "1k6p.pdb", "3o5r.cif")
NEW_FILES = ("1a04A02.pdb", "1fseB00.pdb")  # CATH domains the model never saw


@pytest.fixture(scope="module")
def trained(tmp_path_factory, proteins_dir) -> tuple[Path, Path]:
    """A 4-step fit of a tiny model (pinned logger version), and a folder of new structures."""
    out = tmp_path_factory.mktemp("protein_eval")
    src, new = out / "src", out / "new"
    src.mkdir()
    new.mkdir()
    for name in TRAIN_FILES:
        shutil.copy(EDGE / name, src / name)
    for name in NEW_FILES:
        shutil.copy(PROTEINS / "cath_domains" / name, new / name)
    cfg = effective_config(REPO_ROOT / "experiments" / "proteins_sample.yaml")
    cfg["trainer"].update(
        max_steps=4, val_check_interval=4, enable_progress_bar=False, enable_model_summary=False
    )
    cfg["trainer"]["logger"]["init_args"].update(save_dir=str(out), version="t")
    cfg["curriculum"].update(warmup_steps=1, transition_steps=1, kmeans_collect_batches=1)
    cfg["model"]["init_args"].update(TINY)
    cfg["data"]["init_args"].update(
        sources=str(src),
        cache_dir=str(out / "cache"),
        crop_length=64,
        val_fraction=0.3,
        batch_size=2,
    )
    drop_train_sources(cfg)
    config = out / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    provq_fit("--config", str(config))
    run = out / "proteins_sample_provq" / "t"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    return run, new


def only_eval_dir(run: Path) -> Path:
    found = sorted((run / "eval").iterdir())
    assert len(found) == 1, found
    return found[0]


def test_test_on_new_structures_writes_its_own_dir_and_leaves_the_run_untouched(trained, capsys):
    run, new = trained
    before = run_files(run)
    fit_metrics = json.loads((run / "metrics.json").read_text())
    ckpt = run / "checkpoints" / "last.ckpt"
    provq_fit(
        "test",
        "--config",
        str(run / "config.yaml"),
        "--ckpt_path",
        str(ckpt),
        "--data.init_args.test_sources",
        str(new),
    )
    printed = capsys.readouterr().out
    assert run_files(run) == before  # every file of the fit byte-identical, none added
    assert "2 structure files: 2 loaded" in printed  # the new set, not the training data
    evaluation = only_eval_dir(run)
    assert evaluation.name.startswith("test-") and str(evaluation) in printed
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["global_step"] == fit_metrics["global_step"] == 4.0  # the checkpoint's step
    assert metrics["checkpoint"] == str(ckpt.resolve())
    for key in ("test/rmsd", "test/lddt", "test/tm_score"):
        assert isinstance(metrics[key], float), key
    assert 0.0 < metrics["test/tm_score"] <= 1.0
    assert not any(k.startswith("test/") for k in fit_metrics)
    config = yaml.safe_load((evaluation / "config.yaml").read_text())
    assert config["data"]["init_args"]["test_sources"] == str(new)
    scalars = EventAccumulator(str(evaluation)).Reload().Tags()["scalars"]
    assert "test/tm_score" in scalars


def test_validate_last_with_val_fraction_one_scores_every_chain_in_another_eval_dir(trained):
    run, new = trained
    before = run_files(run)
    shutil.rmtree(run / "eval", ignore_errors=True)
    provq_fit(
        "validate",
        "--config",
        str(run / "config.yaml"),
        "--ckpt_path",
        "last",
        "--data.init_args.sources",
        str(new),
        "--data.init_args.val_fraction",
        "1.0",
        "--data.init_args.cache_dir",
        str(run.parent / "cache_all"),
    )
    assert run_files(run) == before
    evaluation = only_eval_dir(run)
    assert evaluation.name.startswith("validate-")
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["global_step"] == 4.0 and "val/tm_score" in metrics
    manifest = json.loads((run.parent / "cache_all" / "manifest.json").read_text())
    assert manifest["counts"]["chains"] == {"train": 0, "val": 2}  # every chain evaluated


def test_fit_with_val_fraction_one_refuses_in_one_line(trained, tmp_path, capsys):
    run, new = trained
    with pytest.raises(SystemExit):
        provq_fit(
            "--config",
            str(run / "config.yaml"),
            "--data.init_args.sources",
            str(new),
            "--data.init_args.val_fraction",
            "1.0",
            "--data.init_args.cache_dir",
            str(tmp_path / "cache"),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("provq-fit: error: data.init_args.val_fraction 1.0")
