"""Sweeps on a real single-node SLURM started by scripts/local_slurm.sh for this module.

The TopoDisc smoke sweep runs as one 10-task array and the report lists every task; a task
requeued with ``scontrol requeue`` (SIGTERM, no warning) resumes from its periodic checkpoint
and finishes with exactly the metrics of the same task uninterrupted in the sweep; so does one
signalled with SIGUSR1, SLURM's time-limit warning, whose periodic checkpoint is only due after
the run: provq saves last.ckpt at the end of the step in flight and requeues the task, which
redoes no step.

The SIGUSR1 comes from ``scancel --signal=USR1``, the path (slurmctld -> slurmd -> the job
step's tasks) the ``--signal=USR1@N`` warning takes, rather than from a real time limit: SLURM
limits are whole minutes and slurmctld checks them every 30 s, so each real preemption would
cost a minute or two, at a moment known only to within 30 s.
Skips (with the reason) where SLURM is not installed or cannot start; PROVQ_REQUIRE_SLURM=1
turns those skips into failures.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "local_slurm.sh"
SMOKE = REPO / "experiments" / "sweeps" / "topodisc_smoke.yaml"
REQUIRED = os.environ.get("PROVQ_REQUIRE_SLURM") == "1"


def unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"PROVQ_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm_env():
    """Start a private cluster (own temp dir, free ports) for this module; stop it after."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(b)]
    if missing:
        unavailable(
            f"SLURM is not installed ({', '.join(missing)} missing): "
            "`sudo scripts/local_slurm.sh install` installs Debian's slurm-wlm and munge"
        )
    if os.geteuid() != 0:
        unavailable("the local SLURM cluster needs root (slurmd starts jobs, munged signs them)")
    # Short path: the munge socket path must fit in a unix socket address (108 bytes).
    state = tempfile.mkdtemp(prefix="provq-slurm-", dir="/tmp")
    env = {
        **os.environ,
        "PROVQ_SLURM_DIR": state,
        "PROVQ_SLURM_CTLD_PORT": str(free_port()),
        "PROVQ_SLURM_SLURMD_PORT": str(free_port()),
    }
    started = subprocess.run(
        ["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=120
    )
    if started.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=60)
        unavailable(f"local SLURM did not start: {started.stderr.strip()[-1500:]}")
    env["SLURM_CONF"] = f"{state}/slurm.conf"
    env["OMP_NUM_THREADS"] = "1"
    try:
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=60)


def provq_sweep(env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "provq_lightning.tools.sweep", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def job_id(submit_output: str) -> str:
    return submit_output.split("job ", 1)[1].split(",", 1)[0]


def squeue(env: dict, job: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%i %T"], env=env, capture_output=True, text=True
    )
    return out.stdout.split("\n") if out.stdout.strip() else []


def wait_for(job: str, env: dict, out: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while squeue(env, job):
        if time.monotonic() > deadline:
            logs = "\n".join(p.read_text()[-800:] for p in sorted((out / "slurm").glob("*.out")))
            pytest.fail(f"job {job} still queued after {timeout} s: {squeue(env, job)}\n{logs}")
        time.sleep(1)


def wait_for_text(path: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"{text!r} did not appear in {path} in {timeout} s"
        time.sleep(0.1)


def wait_for_validation(run_dir: Path, timeout: float = 120) -> None:
    """Until the run's metrics.json holds validation metrics (it exists from step 0 on)."""
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.json"
    while not (path.exists() and '"val/' in path.read_text()):
        assert time.monotonic() < deadline, f"no validation in {path} within {timeout} s"
        time.sleep(0.1)


def wait_for_file(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def smoke_sweep(slurm_env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweeps") / "topodisc_smoke"
    submitted = provq_sweep(slurm_env, "submit", str(SMOKE), "--out", str(out))
    wait_for(job_id(submitted.stdout), slurm_env, out)
    return out


def test_topodisc_array_sweep_reports_every_task(slurm_env, smoke_sweep):
    out = smoke_sweep
    report = provq_sweep(slurm_env, "report", str(SMOKE), "--out", str(out)).stdout
    assert "10 of 10 tasks done" in report, report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "-seed" in line]
    assert len(rows) == 10
    for variant in ("vanilla", "provq"):
        for seed in range(5):
            task = f"{variant}-seed{seed}"
            metrics = json.loads((out / task / "metrics.json").read_text())
            assert metrics["global_step"] == 300
            (row,) = [r for r in rows if f"| {task} |" in r]
            assert "| done |" in row
            assert f"{metrics['val/mse_triangle']:.4g}" in row, row
            config = yaml.safe_load((out / task / "config.yaml").read_text())
            assert config["seed_everything"] == seed == config["data"]["init_args"]["seed"]
    # Uninterrupted (the reference of the requeue tests below): one start, no restore.
    (log,) = (out / "slurm").glob("*_5.out")
    assert "restart 0, resume from: nothing" in log.read_text()
    assert "Restoring states" not in log.read_text()
    csv_rows = (out / "report.csv").read_text().splitlines()
    assert len(csv_rows) == 11 and all(",done," in r for r in csv_rows[1:])
    assert (out / "report.png").stat().st_size > 10_000
    # The curriculum did its job on every seed: ProVQ reconstructs the triangle far better.
    tri = {
        t: json.loads((out / t / "metrics.json").read_text())["val/mse_triangle"]
        for t in (p.name for p in out.iterdir() if (p / "metrics.json").exists())
    }
    assert max(tri[f"provq-seed{s}"] for s in range(5)) < min(
        tri[f"vanilla-seed{s}"] for s in range(5)
    )


def interrupted_sweep_file(tmp: Path) -> Path:
    """Two copies of the smoke sweep's provq-seed0 task (logging every 10 steps)."""
    smoke = yaml.safe_load(SMOKE.read_text())
    task = dict(smoke["grid"]["variant"]["provq"])
    task.update({k: 0 if v == "{seed}" else v for k, v in smoke["overrides"].items()})
    task["trainer.log_every_n_steps"] = 10  # logging only: the trajectory is the same
    signalled = yaml.safe_load(yaml.safe_dump(task))
    # No periodic checkpoint before the end: resuming must not depend on one. Every step
    # logged, to see which steps each start of the task ran.
    signalled["trainer.callbacks"][0]["init_args"]["every_n_train_steps"] = 1000
    signalled["trainer.log_every_n_steps"] = 1
    sweep = {
        "name": "interrupted",
        "tasks": [{"name": "requeued", **task}, {"name": "signalled", **signalled}],
        "slurm": smoke["slurm"],
    }
    path = tmp / "interrupted.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.fixture(scope="module")
def interrupted_sweep(slurm_env, smoke_sweep, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Task 0 is requeued right after its first checkpoint (step 50), then task 1 gets SIGUSR1
    after its first validation (step 100)."""
    tmp = tmp_path_factory.mktemp("interrupted")
    out = tmp / "out"
    submitted = provq_sweep(
        slurm_env, "submit", str(interrupted_sweep_file(tmp)), "--out", str(out)
    )
    job = job_id(submitted.stdout)
    # The first periodic checkpoint is at step 50 of 300: interrupt well before the end.
    wait_for_file(out / "requeued" / "checkpoints" / "last.ckpt")
    requeue = subprocess.run(
        ["scontrol", "requeue", f"{job}_0"], env=slurm_env, capture_output=True, text=True
    )
    assert requeue.returncode == 0, requeue.stderr
    # SIGUSR1 before provq installs its handler would just kill the task: wait for it, and
    # for the first validation, so the signal comes mid-run.
    wait_for_text(out / "slurm" / f"{job}_1.out", "[provq] preemption: on SIGUSR1")
    wait_for_validation(out / "signalled")
    signal = subprocess.run(
        ["scancel", "--signal=USR1", f"{job}_1"], env=slurm_env, capture_output=True, text=True
    )
    assert signal.returncode == 0, signal.stderr
    wait_for(job, slurm_env, out)
    logs = {p.stem.split("_")[-1]: p.read_text() for p in (out / "slurm").glob("*.out")}
    return out, logs


def steps_of_each_file(run_dir: Path) -> list[list[int]]:
    """The logged training steps of each TensorBoard event file, oldest file first.

    Each start of the task opens a new file.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "curriculum/alpha" in acc.Tags()["scalars"]:  # files that saw no training log: skip
            steps.append(sorted(e.step for e in acc.Scalars("curriculum/alpha")))
    return steps


def first_steps_of_each_file(run_dir: Path) -> list[int]:
    return [steps[0] for steps in steps_of_each_file(run_dir)]


def assert_same_metrics(got: Path, want: Path) -> None:
    a = json.loads((got / "metrics.json").read_text())
    b = json.loads((want / "metrics.json").read_text())
    assert a.keys() == b.keys() and a["global_step"] == 300
    for key in b:
        assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_scontrol_requeue_resumes_from_last_checkpoint(interrupted_sweep, smoke_sweep):
    out, logs = interrupted_sweep
    log = logs["0"]
    assert "DUE TO JOB REQUEUE" in log and "restart 1, resume from: " in log, log[-3000:]
    last = out / "requeued" / "checkpoints" / "last.ckpt"
    assert f"Restoring states from the checkpoint path at {last}" in log
    # Same run directory: TensorBoard goes on (the second process starts where the checkpoint
    # was, not at 0), config.yaml was rewritten without error, no version_1 appeared.
    firsts = first_steps_of_each_file(out / "requeued")
    assert len(firsts) == 2 and firsts[0] < 10 and firsts[1] >= 50
    assert not list(out.glob("requeued*/version_*")) and not list(out.glob("version_*"))
    assert json.loads((out / "requeued" / "exit_status.json").read_text())["exit_code"] == 0
    # The uninterrupted reference: the same task in the smoke sweep.
    assert_same_metrics(out / "requeued", smoke_sweep / "provq-seed0")


def test_sigusr1_saves_at_step_boundary_requeues_and_redoes_nothing(
    interrupted_sweep, smoke_sweep
):
    out, logs = interrupted_sweep
    log = logs["1"]
    run_dir = out / "signalled"
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = re.findall(rf"\[provq\] preemption: saved {re.escape(str(last))} at step (\d+)", log)
    assert len(saved) == 1, log[-3000:]
    step = int(saved[0])
    assert 100 <= step < 300
    job = json.loads((run_dir / "exit_status.json").read_text())["job"]
    assert f"requeued SLURM job {job}" in log, log[-3000:]
    assert f"restart 1, resume from: {last}" in log
    assert f"Restoring states from the checkpoint path at {last}" in log
    assert log.count("Restoring states") == 1
    # Lightning's own handler (a mid-step hpc checkpoint) never ran.
    assert "Handling auto-requeue signal" not in log
    assert not list(run_dir.rglob("hpc_ckpt_*")) and not list(run_dir.rglob("last-v*"))
    # The first start ran steps 0 .. step-1, the second step .. 299: none redone, none lost.
    first, second = steps_of_each_file(run_dir)
    assert first == list(range(step)) and second == list(range(step, 300))
    assert json.loads((run_dir / "exit_status.json").read_text())["exit_code"] == 0
    assert_same_metrics(run_dir, smoke_sweep / "provq-seed0")


def test_real_time_limit_preemption_redoes_nothing(slurm_env, smoke_sweep, tmp_path):
    """A task that meets its real SLURM time limit: slurmctld sends the ``--signal`` warning,
    provq saves at the step boundary and requeues; every start continues where the last one
    stopped, and the result equals the uninterrupted task's.

    Opt-in (PROVQ_SLURM_TIME_LIMIT=1): SLURM's limits are whole minutes and it checks them every
    30 s, so this costs two to four minutes.
    """
    if os.environ.get("PROVQ_SLURM_TIME_LIMIT") != "1":
        pytest.skip("a real SLURM time limit costs minutes; PROVQ_SLURM_TIME_LIMIT=1 runs it")
    smoke = yaml.safe_load(SMOKE.read_text())
    task = dict(smoke["grid"]["variant"]["provq"])
    task.update({k: 0 if v == "{seed}" else v for k, v in smoke["overrides"].items()})
    task = yaml.safe_load(yaml.safe_dump(task))
    task["trainer.callbacks"][0]["init_args"]["every_n_train_steps"] = 1000  # after the end
    # 0.2 s a step: 300 steps outlast the warning, which comes 20-50 s after a start (limit
    # 2 minutes, warning 100 s before it, checked every 30 s).
    task["trainer.callbacks"].append(
        {"class_path": "tests.core.helpers.SlowSteps", "init_args": {"seconds": 0.2}}
    )
    task["trainer.log_every_n_steps"] = 1
    sweep = {
        "name": "timed",
        "tasks": [{"name": "timed", **task}],
        "env": {"PYTHONPATH": str(REPO)},
        "slurm": {**smoke["slurm"], "time": "00:02:00", "signal": "SIGUSR1@100"},
    }
    path = tmp_path / "timed.yaml"
    path.write_text(yaml.safe_dump(sweep))
    out = tmp_path / "out"
    job = job_id(provq_sweep(slurm_env, "submit", str(path), "--out", str(out)).stdout)
    wait_for(job, slurm_env, out, timeout=600)
    (log_path,) = (out / "slurm").glob("*.out")
    log = log_path.read_text()
    run_dir = out / "timed"
    saved = [int(s) for s in re.findall(r"\[provq\] preemption: saved \S+ at step (\d+)", log)]
    assert saved, log[-3000:]  # the time limit's warning arrived mid-run at least once
    assert "DUE TO TIME LIMIT" not in log, log[-3000:]  # never killed by the limit itself
    # Each start logged the steps from where the previous one saved: nothing redone or lost.
    starts = steps_of_each_file(run_dir)
    assert len(starts) == len(saved) + 1
    assert [s[0] for s in starts] == [0, *saved]
    assert sum(starts, []) == list(range(300))
    assert json.loads((run_dir / "exit_status.json").read_text())["exit_code"] == 0
    assert_same_metrics(run_dir, smoke_sweep / "provq-seed0")


def test_scancel_saves_at_the_step_in_flight_and_the_resubmitted_task_redoes_nothing(
    slurm_env, smoke_sweep, tmp_path
):
    """``scancel`` sends SIGTERM (then SIGKILL after KillWait): provq saves last.ckpt at the end
    of the step in flight and exits non-zero, so the job is not COMPLETED; submitted again,
    the task continues from that step."""
    smoke = yaml.safe_load(SMOKE.read_text())
    task = dict(smoke["grid"]["variant"]["provq"])
    task.update({k: 0 if v == "{seed}" else v for k, v in smoke["overrides"].items()})
    task = yaml.safe_load(yaml.safe_dump(task))
    task["trainer.callbacks"][0]["init_args"]["every_n_train_steps"] = 1000  # after the end
    task["trainer.log_every_n_steps"] = 1
    sweep = {"name": "cancelled", "tasks": [{"name": "cancelled", **task}],
             "slurm": smoke["slurm"]}
    path = tmp_path / "cancelled.yaml"
    path.write_text(yaml.safe_dump(sweep))
    out = tmp_path / "out"
    run_dir = out / "cancelled"
    job = job_id(provq_sweep(slurm_env, "submit", str(path), "--out", str(out)).stdout)
    (log_path,) = [out / "slurm" / f"{job}_0.out"]
    wait_for_text(log_path, "or SIGTERM, last.ckpt is saved")
    wait_for_validation(run_dir)
    cancel = subprocess.run(["scancel", f"{job}_0"], env=slurm_env, capture_output=True,
                            text=True)
    assert cancel.returncode == 0, cancel.stderr
    wait_for(job, slurm_env, out)
    state = subprocess.run(["scontrol", "-o", "show", "job", f"{job}_0"], env=slurm_env,
                           capture_output=True, text=True).stdout
    assert "JobState=COMPLETED" not in state, state
    log = log_path.read_text()
    saved = re.findall(r"\[provq\] preemption: saved \S+ at step (\d+)", log)
    assert len(saved) == 1 and "SIGTERM: exit 75, not requeued" in log, log[-3000:]
    step = int(saved[0])
    assert 100 <= step < 300
    import torch

    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == step
    (first,) = steps_of_each_file(run_dir)
    assert first == list(range(step))  # the step in flight finished and was saved

    job = job_id(provq_sweep(slurm_env, "submit", str(path), "--out", str(out)).stdout)
    wait_for(job, slurm_env, out)
    first, second = steps_of_each_file(run_dir)
    assert second == list(range(step, 300))  # nothing redone, nothing lost
    assert json.loads((run_dir / "exit_status.json").read_text())["exit_code"] == 0
    assert_same_metrics(run_dir, smoke_sweep / "provq-seed0")

