"""provq-fit as users run it: config errors, print_config, fit outputs, validate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from provq_lightning.vq.codebook_metrics import CODEBOOK_METRIC_NAMES
from tests.helpers import cli_in_process, effective_config

REPO = Path(__file__).resolve().parents[2]


def provq_fit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "provq_lightning.tools.fit", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


CONFIG = str(REPO / "experiments" / "topodisc_provq.yaml")


def test_bad_key_and_bad_type_fail_before_training_naming_the_key(tmp_path, capsys):
    code, out, err = cli_in_process(capsys, "--config", CONFIG, "--model.init_args.num_codez", "8")
    assert code != 0 and "num_codez" in err
    code, out, err = cli_in_process(capsys, "--config", CONFIG, "--model.init_args.num_codes", "x")
    assert code != 0 and "num_codes" in err
    cfg = effective_config(CONFIG)
    cfg["curriculum"]["warmup_stepz"] = 5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    code, out, err = cli_in_process(capsys, "--config", str(bad))
    assert code != 0 and "warmup_stepz" in err
    assert "Epoch" not in out  # nothing trained


def test_print_config_resolves_the_yaml(capsys):
    code, out, err = cli_in_process(capsys, "--config", CONFIG, "--print_config")
    assert code == 0, err[-2000:]
    cfg = yaml.safe_load(out)
    assert cfg["model"]["class_path"] == "provq_lightning.topodisc.TopoDiscTokenizer"
    assert cfg["curriculum"]["warmup_steps"] == 1000


def test_fit_writes_config_and_metrics_then_validate_and_test_work(tmp_path):
    common = [
        "--config",
        CONFIG,
        "--trainer.max_steps",
        "30",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.logger.init_args.version",
        "v",
        "--trainer.val_check_interval",
        "30",
        "--model.init_args.num_codes",
        "8",
        "--data.init_args.steps_per_epoch",
        "10",
        "--model.init_args.figure_every_n_steps",
        "30",
        "--trainer.log_every_n_steps",
        "5",
    ]
    fit = provq_fit(*common)  # no subcommand: fit is implied
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = tmp_path / "topodisc_provq" / "v"
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 30
    metrics = json.loads((run / "metrics.json").read_text())
    for key in (
        "val/mse",
        "val/mse_disk",
        "val/mse_triangle",
        *(f"val/{name}" for name in CODEBOOK_METRIC_NAMES),
    ):
        assert isinstance(metrics[key], float), key
    assert metrics["global_step"] == 30.0
    events = EventAccumulator(str(run)).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in (
        "curriculum/alpha",
        "curriculum/omega",
        "curriculum/phase",
        "train/loss",
        # 30 steps of the config's 1000-step warmup: the loggers get its validation apart
        # (metrics.json above keeps val/).
        "val_warmup/mse_triangle",
        "val_warmup/utilization",
    ):
        assert tag in scalars, tag
    assert "val/embeddings" in events.Tags()["images"]  # the embeddings/codebook figure

    ckpt = str(run / "checkpoints" / "last.ckpt")
    # A second invocation in the same directory (a requeue) must not trip over config.yaml.
    val = provq_fit("validate", *common, "--ckpt_path", ckpt)
    assert val.returncode == 0, val.stderr[-3000:]
    # Evaluations write into <run>/eval/<subcommand>-<time>, never into the fit's files.
    assert json.loads((run / "metrics.json").read_text()) == metrics
    (val_dir,) = (run / "eval").glob("validate-*")
    again = json.loads((val_dir / "metrics.json").read_text())
    assert again["val/mse_triangle"] == metrics["val/mse_triangle"]
    test = provq_fit("test", *common, "--ckpt_path", ckpt)
    assert test.returncode == 0, test.stderr[-3000:]
    (test_dir,) = (run / "eval").glob("test-*")
    assert "test/mse_triangle" in json.loads((test_dir / "metrics.json").read_text())
