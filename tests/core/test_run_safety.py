"""A run directory stays one consistent run: ``--ckpt_path last`` resumes it, a failed resume
leaves it untouched, changed settings are applied or refused in one line, two fits never share
it, and curriculum settings that cannot work fail at step 0 (issue 9, points 4-8)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from provq_lightning.errors import ProvqError
from provq_lightning.runs.config_history import write_config_history
from provq_lightning.runs.lock import RunLock
from provq_lightning.runs.run_dir import newest_resumable_run
from tests.helpers import effective_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "experiments" / "topodisc_provq.yaml"
QUIET = ("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false")


def provq_fit(cwd: Path, *args: str, wait: bool = True):
    fit = [sys.executable, "-m", "provq_lightning.tools.fit"]
    cmd = [*fit, "--config", str(CONFIG), *QUIET, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def last_step(run_dir: Path) -> int:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return int(ckpt["global_step"])


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("provq-fit: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_readme_resume_line_twice_continues_one_run_directory(tmp_path):
    first = provq_fit(tmp_path, "--trainer.max_steps", "20", "--ckpt_path", "last")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "no last.ckpt" in first.stdout and "starting a fresh run" in first.stdout
    second = provq_fit(tmp_path, "--trainer.max_steps", "40", "--ckpt_path", "last")
    assert second.returncode == 0, second.stderr[-2000:]
    runs = sorted(p.name for p in (tmp_path / "runs" / "topodisc_provq").iterdir())
    assert runs == ["version_0"]
    run = tmp_path / "runs" / "topodisc_provq" / "version_0"
    assert last_step(run) == 40
    log = second.stdout + second.stderr
    assert "resumed from runs/topodisc_provq/version_0/checkpoints/last.ckpt at step 20" in log
    assert not (run / ".provq.lock").exists()  # released at the end


def test_changed_settings_on_resume_are_applied_or_refused_and_the_config_kept(tmp_path):
    run = tmp_path / "runs" / "topodisc_provq" / "version_0"
    pin = ("--trainer.logger.init_args.version", "0", "--trainer.max_steps", "20")
    assert provq_fit(tmp_path, *pin).returncode == 0
    good_config = (run / "config.yaml").read_text()
    ckpt_before = (run / "checkpoints" / "last.ckpt").read_bytes()

    # Another model shape: one line, and the run's config and checkpoint stay as they were.
    bad = provq_fit(tmp_path, *pin, "--ckpt_path", "last", "--model.init_args.num_codes", "16")
    line = one_error_line(bad)
    assert "does not fit the configured model" in line and "quantizer" in line
    assert (run / "config.yaml").read_text() == good_config
    assert not (run / "config.1.yaml").exists()
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == ckpt_before

    # Another curriculum (shorter or longer warmup): refused at start, naming the change.
    cfg = effective_config(CONFIG)
    for warmup in (500, 2000):
        cfg["curriculum"]["warmup_steps"] = warmup
        changed = tmp_path / f"warmup{warmup}.yaml"
        changed.write_text(yaml.safe_dump(cfg))
        proc = provq_fit(tmp_path, "--config", str(changed), *pin, "--ckpt_path", "last")
        line = one_error_line(proc)
        assert f"warmup_steps 1000 -> {warmup}" in line and "start a new run" in line
        assert (run / "config.yaml").read_text() == good_config

    # A new learning rate and checkpoint interval: applied, said, recorded; old config kept.
    cfg = effective_config(CONFIG)
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 7
    interval = tmp_path / "interval.yaml"
    interval.write_text(yaml.safe_dump(cfg))
    proc = provq_fit(
        tmp_path,
        "--config",
        str(interval),
        "--trainer.logger.init_args.version",
        "0",
        "--trainer.max_steps",
        "35",
        "--ckpt_path",
        "last",
        "--model.init_args.lr",
        "0.0005",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lr 0.001 -> 0.0005" in proc.stdout + proc.stderr
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 35  # a multiple of the new interval
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == 0.0005
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # no -v1
    assert (run / "config.1.yaml").read_text() == good_config
    assert "lr: 0.0005" in (run / "config.yaml").read_text()


def test_a_refused_resume_leaves_the_run_directory_byte_identical(tmp_path):
    from tests.helpers import run_files

    run = tmp_path / "runs" / "topodisc_provq" / "version_0"
    pin = ("--trainer.logger.init_args.version", "0", "--trainer.max_steps", "20")
    assert provq_fit(tmp_path, *pin).returncode == 0
    before = run_files(run)
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"
    for change in (("--model.init_args.num_codes", "16"), ("--curriculum.warmup_steps", "500")):
        refused = provq_fit(tmp_path, *pin, "--ckpt_path", "last", *change)
        one_error_line(refused)
        # No metrics.json rewritten to "failed" at step 0, no empty TensorBoard event file.
        assert run_files(run) == before, change


def test_a_failed_evaluation_leaves_no_eval_folder(tmp_path):
    from tests.helpers import run_files

    run = tmp_path / "runs" / "topodisc_provq" / "version_0"
    assert provq_fit(tmp_path, "--trainer.max_steps", "10").returncode == 0
    before = run_files(run)
    for sub in ("predict", "validate"):
        failed = subprocess.run(
            [sys.executable, "-m", "provq_lightning.tools.fit", sub, "--config",
             str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
             "--model.init_args.num_codes", "64"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300)
        one_error_line(failed)
        assert not (run / "eval").exists(), sub
    assert run_files(run) == before


def test_metrics_json_says_running_from_the_first_step(tmp_path):
    proc = provq_fit(tmp_path, "--trainer.max_steps", "400", "--trainer.val_check_interval",
                     "400", wait=False)
    metrics = tmp_path / "runs" / "topodisc_provq" / "version_0" / "metrics.json"
    try:
        deadline = time.monotonic() + 240
        while not metrics.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.1)
        assert json.loads(metrics.read_text())["status"] == "running"  # before any validation
    finally:
        proc.kill()
        proc.communicate()


def test_second_fit_into_a_live_run_directory_refuses_naming_host_and_pid(tmp_path):
    pin = ("--trainer.logger.init_args.version", "live")
    holder = provq_fit(tmp_path, *pin, "--trainer.max_steps", "100000", wait=False)
    lock = tmp_path / "runs" / "topodisc_provq" / "live" / ".provq.lock"
    try:
        deadline = time.monotonic() + 120
        while not lock.exists() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert lock.exists(), "the first fit never took the lock"
        # --ckpt_path last: without it a fit into a directory that holds checkpoints (the
        # holder's, once it reached step 250) is refused before the lock is looked at.
        second = provq_fit(tmp_path, *pin, "--trainer.max_steps", "10", "--ckpt_path", "last")
        line = one_error_line(second)
        assert f"in use by PID {holder.pid} on host {os.uname().nodename}" in line
        assert holder.poll() is None  # the first fit goes on
    finally:
        holder.kill()
        holder.wait()
    # Killed: its lock is stale now, and the next fit takes it over with a warning.
    resumed = provq_fit(tmp_path, *pin, "--trainer.max_steps", "10", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "stale lock" in resumed.stderr


def test_run_lock_takes_over_only_dead_or_requeued_holders(tmp_path, monkeypatch):
    lock_path = tmp_path / ".provq.lock"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        host = os.uname().nodename
        lock_path.write_text(json.dumps({"host": host, "pid": sleeper.pid, "since": "x"}))
        with pytest.raises(ProvqError, match=f"PID {sleeper.pid} on host {host}"):
            RunLock(tmp_path).acquire()
        # Two live fits of one SLURM job (two srun steps, or two fits in one batch script).
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        for holder_host, pid in ((host, sleeper.pid), ("other-node", 1)):
            lock_path.write_text(json.dumps(
                {"host": holder_host, "pid": pid, "since": "x", "slurm_job": "77"}))
            with pytest.raises(ProvqError, match=f"PID {pid} on host {holder_host}.*job 77"):
                RunLock(tmp_path).acquire()
        # A requeue of the job (a higher restart count), on another node: the holder is gone.
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        lock_path.write_text(json.dumps(
            {"host": "other-node", "pid": 1, "since": "x", "slurm_job": "77", "slurm_restart": 0}))
        with pytest.warns(UserWarning, match="stale lock"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    sleeper_pid = sleeper.pid
    lock_path.write_text(json.dumps({"host": os.uname().nodename, "pid": sleeper_pid}))
    lock = RunLock(tmp_path)
    with pytest.warns(UserWarning, match="stale lock"):
        lock.acquire()
    lock.release()
    assert not lock_path.exists()


@pytest.mark.parametrize("content", ["[1, 2]", '{"pid": "abc"}', '{"host": "h"}', "", "{"])
def test_an_unreadable_lock_is_one_line_naming_it(tmp_path, content):
    lock_path = tmp_path / ".provq.lock"
    lock_path.write_text(content)
    with pytest.raises(ProvqError) as err:
        RunLock(tmp_path).acquire()
    message = str(err.value)
    assert str(lock_path) in message and "delete it" in message and "\n" not in message
    assert lock_path.read_text() == content  # left for the user to look at


def test_the_lock_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    # A full disk while the record is written: one line, and no empty lock left behind.
    import errno as errno_

    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno_.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ProvqError, match="free disk space"):
        RunLock(tmp_path).acquire()
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert list(tmp_path.iterdir()) == []
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / ".provq.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_config_history_keeps_every_earlier_config(tmp_path):
    path = tmp_path / "config.yaml"
    assert write_config_history(path, "a: 1\n") is None
    assert write_config_history(path, "a: 1\n") is None  # unchanged: nothing kept
    assert write_config_history(path, "a: 2\n") == tmp_path / "config.1.yaml"
    assert write_config_history(path, "a: 3\n") == tmp_path / "config.2.yaml"
    texts = [(tmp_path / n).read_text() for n in ("config.1.yaml", "config.2.yaml", "config.yaml")]
    assert texts == ["a: 1\n", "a: 2\n", "a: 3\n"]


def test_newest_resumable_run_is_the_latest_last_ckpt(tmp_path):
    root = tmp_path / "runs" / "x"
    for version in ("version_0", "version_1", "version_2"):
        (root / version / "checkpoints").mkdir(parents=True)
    (root / "version_0" / "checkpoints" / "last.ckpt").write_bytes(b"a")
    (root / "version_1" / "checkpoints" / "last.ckpt").write_bytes(b"b")
    os.utime(root / "version_0" / "checkpoints" / "last.ckpt", ns=(1, 1))
    found = newest_resumable_run(tmp_path / "runs", "x")
    assert found is not None and found.version == "version_1"
    assert newest_resumable_run(tmp_path / "runs", "missing") is None


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("lam", 1.5, "lam: 1.5 is not allowed; use a number in [0, 1]"),
        ("schedule", "cosin", "schedule: 'cosin' is not allowed; choose one of cosine"),
        ("kmeans_samples", -3, "kmeans_samples: -3 is not allowed; use a positive count"),
        ("kmeans_samples", 0, "kmeans_samples: 0 is not allowed; use a positive count"),
        ("kmeans_samples", 20, "kmeans_samples: 20 is not allowed; k-means needs at least"),
    ],
)
def test_curriculum_setting_errors_are_one_line_before_training(
    tmp_path, monkeypatch, capsys, setting, value, expected
):
    from provq_lightning.tools.fit import main

    cfg = effective_config(CONFIG)
    cfg["curriculum"][setting] = value
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["provq-fit"])
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(bad), "--trainer.max_steps", "5", *QUIET])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("provq-fit: error:")]
    assert len(lines) == 1 and expected in lines[0], err[-2000:]
    assert not list(tmp_path.rglob("*.ckpt"))  # refused before any step


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n", b"PK\x03\x04trunc"])
def test_unreadable_ckpt_path_is_one_line_naming_it(tmp_path, monkeypatch, capsys, content):
    from provq_lightning.tools.fit import main

    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(content)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["provq-fit"])
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(CONFIG), "--ckpt_path", str(bad), *QUIET])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("provq-fit: error:")]
    assert len(lines) == 1 and str(bad) in lines[0], err[-2000:]
