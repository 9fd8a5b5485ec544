"""A fit that ends leaves ``last.ckpt`` at its last completed step (max_steps off the checkpoint
interval, Ctrl-C), and a fresh fit into a pinned run directory that holds a run is refused
(issue 22, item 3)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import Namespace

from provq_lightning.errors import ProvqError
from provq_lightning.runs.resolve import refuse_fit_into_existing_run
from tests.helpers import cli_in_process, effective_config, provq_fit, run_files

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "experiments" / "topodisc_provq.yaml"
QUIET = ("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false")
EVERY = 5  # the checkpoint interval; the fits end off it


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """TopoDisc ProVQ with last.ckpt every 5 steps and a 3-step warmup (k-means at step 3)."""
    cfg = effective_config(CONFIG)
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = EVERY
    cfg["curriculum"].update(warmup_steps=3, transition_steps=3, kmeans_collect_batches=1)
    path = tmp_path_factory.mktemp("config") / "every5.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def sigint_restored():
    """Lightning ignores SIGINT after a Ctrl-C; the next tests need Python's own handler."""
    before = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, before)


def fit(capsys, config: Path, save_dir: Path, version: str, *args: str) -> tuple[int, str]:
    code, out, err = cli_in_process(
        capsys, "--config", str(config), *QUIET, "--trainer.val_check_interval", "1000",
        "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.logger.init_args.version", version, *args)
    return code, out + err


def last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(config, tmp_path_factory) -> Path:
    """12 steps in one go: the trajectory the stopped and resumed runs must follow."""
    out = tmp_path_factory.mktemp("straight")
    provq_fit("--config", str(config), *QUIET, "--trainer.val_check_interval", "1000",
              "--trainer.logger.init_args.save_dir", str(out),
              "--trainer.logger.init_args.version", "v", "--trainer.max_steps", "12")
    return out / "topodisc_provq" / "v"


def test_a_finished_fit_off_the_interval_ends_with_last_ckpt_at_its_final_step(
    config, straight, tmp_path, capsys
):
    code, log = fit(capsys, config, tmp_path, "v", "--trainer.max_steps", "7")
    assert code == 0, log[-2000:]
    run = tmp_path / "topodisc_provq" / "v"
    assert last(run)["global_step"] == 7  # Lightning alone left step 5 (the last multiple)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"
    # The final save resumes like a periodic one: 7 + 5 steps end where 12 in one go end.
    code, log = fit(capsys, config, tmp_path, "v", "--trainer.max_steps", "12",
                    "--ckpt_path", "last")
    assert code == 0, log[-2000:]
    assert last(run)["global_step"] == 12
    assert weights_equal(last(run)["state_dict"], last(straight)["state_dict"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]


def test_ctrl_c_saves_the_step_in_flight_then_stops_and_the_resume_matches(
    config, straight, tmp_path, capsys, caplog, sigint_restored
):
    code, log = fit(capsys, config, tmp_path, "v", "--trainer.max_steps", "12",
                    "--trainer.callbacks+=tests.core.helpers.SigintAtStep",
                    "--trainer.callbacks.step", "7")
    assert code == 1, log[-2000:]  # a Ctrl-C still ends the fit with exit 1
    run = tmp_path / "topodisc_provq" / "v"
    assert last(run)["global_step"] == 7  # not 5, the last periodic save
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"
    assert "Ctrl-C: stopped at step 7, which last.ckpt holds" in caplog.text
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code, log = fit(capsys, config, tmp_path, "v", "--trainer.max_steps", "12",
                    "--ckpt_path", "last")
    assert code == 0, log[-2000:]
    assert weights_equal(last(run)["state_dict"], last(straight)["state_dict"])


def test_a_second_ctrl_c_stops_at_once_without_saving(config, tmp_path, capsys,
                                                       sigint_restored):
    code, log = fit(capsys, config, tmp_path, "v", "--trainer.max_steps", "12",
                    "--trainer.callbacks+=tests.core.helpers.SigintAtStep",
                    "--trainer.callbacks.step", "7", "--trainer.callbacks.times", "2")
    assert code == 1, log[-2000:]
    run = tmp_path / "topodisc_provq" / "v"
    assert last(run)["global_step"] == EVERY  # the periodic save; nothing written mid-step
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"


def test_a_fresh_fit_into_a_pinned_run_with_checkpoints_is_refused_in_one_line(
    straight, config, tmp_path, capsys
):
    before = run_files(straight)
    code, out, err = cli_in_process(
        capsys, "--config", str(config), *QUIET, "--trainer.max_steps", "3",
        "--trainer.logger.init_args.save_dir", str(straight.parent.parent),
        "--trainer.logger.init_args.version", "v")
    (line,) = err.strip().splitlines()
    assert code == 1 and line.startswith("provq-fit: error: ")
    assert f"{straight} already holds a run (checkpoints/last.ckpt)" in line
    assert "--ckpt_path last" in line and "--trainer.logger.init_args.version" in line
    assert run_files(straight) == before  # no last-v1.ckpt, metrics.json untouched


def _fit_config(save_dir: Path, version: str | int | None, ckpt_path: str | None) -> Namespace:
    logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                       init_args=Namespace(save_dir=str(save_dir), name="n", version=version))
    return Namespace(trainer=Namespace(logger=logger), ckpt_path=ckpt_path)


def test_only_a_run_directory_with_checkpoints_refuses_a_fresh_fit(tmp_path):
    run = tmp_path / "n" / "version_3"
    # A sweep task's folder made before its first start, or a run killed before its first
    # checkpoint: written as before.
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.json").write_text('{"status": "running"}')
    refuse_fit_into_existing_run(_fit_config(tmp_path, 3, None))
    (run / "checkpoints" / "epoch=0-step=5.ckpt").write_bytes(b"x")
    with pytest.raises(ProvqError, match=r"version_3 already holds a run \(checkpoints/epoch"):
        refuse_fit_into_existing_run(_fit_config(tmp_path, 3, None))
    refuse_fit_into_existing_run(_fit_config(tmp_path, 3, "last"))  # a resume
    refuse_fit_into_existing_run(_fit_config(tmp_path, None, None))  # a new version_N
    refuse_fit_into_existing_run(_fit_config(tmp_path, "other", None))
