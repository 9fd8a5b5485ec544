"""A fit killed with SIGKILL mid-transition and resumed follows the uninterrupted run exactly."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
WARMUP, TRANSITION, STEPS, EVERY = 40, 40, 120, 10


def write_config(tmp: Path, name: str, record: Path, kill_at: int | None) -> Path:
    config = yaml.safe_load((REPO / "experiments" / "topodisc_provq.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(
        max_steps=STEPS,
        check_val_every_n_epoch=STEPS // 10,
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer["logger"]["init_args"].update(save_dir=str(tmp), name=name, version="run")
    curriculum, checkpoint = trainer["callbacks"]
    curriculum["init_args"].update(
        warmup_steps=WARMUP, transition_steps=TRANSITION, kmeans_collect_batches=4
    )
    checkpoint["init_args"].update(every_n_train_steps=EVERY)
    trainer["callbacks"].append(
        {"class_path": "tests.core.helpers.RecordCurriculum", "init_args": {"path": str(record)}}
    )
    if kill_at is not None:
        trainer["callbacks"].append(
            {"class_path": "tests.core.helpers.KillAtStep", "init_args": {"step": kill_at}}
        )
    config["model"]["init_args"].update(num_codes=16, figure_every_n_epochs=0)
    config["data"]["init_args"].update(steps_per_epoch=10)
    path = tmp / f"{name}{'_kill' if kill_at else ''}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def provq_fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "provq_lightning.cli", "fit", "--config", str(config), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def curriculum_state(ckpt: Path) -> dict:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    (key,) = [k for k in state["callbacks"] if "CurriculumCallback" in k]
    return state["callbacks"][key] | {"codebook": state["state_dict"]["quantizer.embedding.weight"]}


@pytest.mark.parametrize("kill_at", [65])  # mid-transition: seeded at 40, last checkpoint at 60
def test_sigkill_mid_transition_then_resume_matches_uninterrupted(tmp_path, kill_at):
    ref_record, res_record = tmp_path / "ref.jsonl", tmp_path / "resumed.jsonl"
    ref = provq_fit(write_config(tmp_path, "ref", ref_record, None))
    assert ref.returncode == 0, ref.stderr[-3000:]

    killed = provq_fit(write_config(tmp_path, "res", res_record, kill_at))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = tmp_path / "res" / "run"
    assert not (run_dir / "metrics.json").exists()  # it really died before finishing

    resumed = provq_fit(write_config(tmp_path, "res", res_record, None), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # Alpha, omega and phase at every step the resumed run took equal the uninterrupted run's.
    reference = {r["step"]: r for r in rows(ref_record)}
    after_kill = [r for r in rows(res_record) if r["step"] >= kill_at - kill_at % EVERY]
    resumed_steps = [r["step"] for r in after_kill][-(STEPS - (kill_at - kill_at % EVERY)) :]
    assert resumed_steps == list(range(kill_at - kill_at % EVERY, STEPS))
    for r in after_kill:
        assert r == reference[r["step"]]
    assert any(r["phase"] == 1 for r in after_kill) and any(r["phase"] == 2 for r in after_kill)

    # The codebook was seeded exactly once, before the kill, and never again.
    logs = killed.stderr + killed.stdout + resumed.stderr + resumed.stdout
    assert logs.count("seeded 16 codes by k-means") == 1
    final = curriculum_state(run_dir / "checkpoints" / "last.ckpt")
    reference_final = curriculum_state(tmp_path / "ref" / "run" / "checkpoints" / "last.ckpt")
    assert final["seed_count"] == 1 and final["seeded_at_step"] == WARMUP

    # Same final codebook and validation metrics.
    torch.testing.assert_close(final["codebook"], reference_final["codebook"], atol=1e-6, rtol=0)
    got = json.loads((run_dir / "metrics.json").read_text())
    want = json.loads((tmp_path / "ref" / "run" / "metrics.json").read_text())
    assert got.keys() == want.keys() and "val/mse_triangle" in got
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
