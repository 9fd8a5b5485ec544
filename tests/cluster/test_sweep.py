"""Sweep files, the sbatch array script and the report, without SLURM.

The rendered script is run by bash with a stand-in ``srun`` that records its arguments, so the
task dispatch, the checkpoint choice on restart and the exit-status bookkeeping are exercised.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from provq_lightning.tools.sweep import main, render_script
from provq_lightning.tools.sweep_report import write_report
from provq_lightning.tools.sweep_spec import SweepError, load_sweep

REPO = Path(__file__).resolve().parents[2]
SWEEPS = REPO / "experiments" / "sweeps"


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # config paths in sweep files are relative to the repository root


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_topodisc_grid_expands_variant_major_with_seed_placeholders():
    sweep = load_sweep(SWEEPS / "topodisc.yaml")
    assert sweep.axes == ["variant", "seed"] and len(sweep.tasks) == 20
    assert [t.name for t in sweep.tasks[:6]] == [
        *(f"vanilla-seed{s}" for s in range(5)),
        "soft-seed0",
    ]
    task = sweep.tasks[19]
    assert task.name == "provq-seed4" and task.levels == {"variant": "provq", "seed": 4}
    args = task.args
    assert args[:2] == ["--config", "experiments/topodisc_provq.yaml"]
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    assert pairs["--seed_everything"] == "4" and pairs["--data.init_args.seed"] == "4"
    assert sweep.report.average_over == "seed"


@pytest.mark.parametrize(
    "name, count",
    [("topodisc", 20), ("topodisc_smoke", 10), ("in100_ablation", 7), ("protein", 4)],
)
def test_shipped_sweeps_parse(name, count):
    assert len(load_sweep(SWEEPS / f"{name}.yaml").tasks) == count


@pytest.mark.parametrize(
    "name, index",
    [("topodisc_smoke", 5), ("topodisc", 0), ("in100_ablation", 3), ("protein", 3)],
)
def test_task_arguments_resolve_in_provq_fit(name, index, tmp_path, capsys):
    """Every key a sweep sets (and the sweep's own logger/root-dir ones) exists in provq-fit."""
    from provq_lightning.tools.fit import main as provq_fit

    task = load_sweep(SWEEPS / f"{name}.yaml").tasks[index]
    extra = [
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.logger.init_args.name", name,
        "--trainer.logger.init_args.version", task.name,
        "--trainer.default_root_dir", str(tmp_path / task.name),
        "--trainer.num_nodes", "1",
        "--print_config",
    ]  # fmt: skip
    argv = sys.argv
    try:
        provq_fit(["fit", *task.args, *extra])
    except SystemExit as exit_:
        assert not exit_.code, capsys.readouterr().err[-2000:]
    finally:
        sys.argv = argv
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["logger"]["init_args"]["version"] == task.name
    if name == "topodisc_smoke":  # the per-level callbacks list replaced the config's
        curriculum = config["curriculum"]
        assert curriculum["warmup_steps"] == 100 and config["trainer"]["max_steps"] == 300
    if name == "protein":
        assert config["model"]["init_args"]["variant"] == "aminoaseed"
        assert config["curriculum"]["warmup_steps"] == 20000


def test_lone_placeholder_keeps_its_type_inside_structured_values(tmp_path):
    path = write(
        tmp_path,
        """
grid:
  lr: [0.001, 0.01]
overrides:
  model.init_args.lr: "{lr}"
  trainer.callbacks: [{class_path: X, init_args: {rate: "{lr}", tag: "lr={lr}"}}]
  trainer.enable_progress_bar: false
config: experiments/topodisc_provq.yaml
""",
    )
    sweep = load_sweep(path, extra_overrides={"trainer.max_steps": 5})
    args = sweep.tasks[1].args
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    assert sweep.tasks[1].name == "lr0.01"
    assert pairs["--model.init_args.lr"] == "0.01"
    assert json.loads(pairs["--trainer.callbacks"]) == [
        {"class_path": "X", "init_args": {"rate": 0.01, "tag": "lr=0.01"}}
    ]
    assert pairs["--trainer.enable_progress_bar"] == "false"
    assert args[-2:] == ["--trainer.max_steps", "5"]  # --set comes last, so it wins


@pytest.mark.parametrize(
    "text, message",
    [
        ("grdi: {a: [1]}", "grdi: unknown key; allowed: name, config, grid"),
        ("overrides: {a: 1}", "grid: give exactly one of 'grid'"),
        ("grid: {v: {x: {config: nope.yaml}}}", "grid.v.x.config: no such config file 'nope.yaml'"),
        ("grid: {v: [1]}\noverrides: {a: '{w}'}", "overrides.a: unknown placeholder {w}"),
        ("grid: {v: []}", "grid.v: an axis needs at least one level"),
        ("grid: {v: 3}", "grid.v: expected a list of values or a mapping"),
        ("tasks: [{name: a}, {name: a}]", "tasks: tasks 0 and 1 are both named 'a'"),
        ("grid: {v: [1]}\nslurm: {gpus: 2}", "slurm.gpus: unknown key; allowed: partition"),
        ("grid: {v: [1]}\nslurm: {nodes: two}", "slurm.nodes: expected a whole number, got 'two'"),
        ("grid: {v: [1]}\nreport: {average_over: seed}", "report.average_over: 'seed' is not"),
        ("tasks: [{name: a, 'trainer max': 1}]", "tasks[0].trainer max: not a provq-fit key"),
        ("name: a b\ntasks: [{}]", "name: 'a b': use only letters"),
        ("- 1", "expected a mapping with keys"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(SweepError) as info:
        load_sweep(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    assert main(["render", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such sweep file" in capsys.readouterr().err
    assert main(["render", str(SWEEPS / "topodisc.yaml"), "--set", "trainer.max_steps"]) == 2
    assert "write KEY=VALUE" in capsys.readouterr().err


def test_submit_without_sbatch_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on it
    out = tmp_path / "out"
    assert main(["submit", str(SWEEPS / "topodisc_smoke.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sbatch not found" in err and "scripts/local_slurm.sh start" in err
    assert (out / "sweep.sbatch").is_file()  # written anyway, to inspect or submit by hand


def test_make_dry_run_prints_the_array_script_with_make_overrides():
    proc = subprocess.run(
        ["make", "-s", "sweep", "SWEEP=experiments/sweeps/topodisc.yaml", "DRY_RUN=1",
         "PARTITION=gpu", "TIME=01:00:00", "MAX_PARALLEL=4", "SET=trainer.max_steps=7"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert script.startswith("#!/bin/bash")
    for line in (
        "#SBATCH --array=0-19%4",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=01:00:00",
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        "#SBATCH --mem=2G",
        f"#SBATCH --chdir={REPO}",
    ):
        assert line in script.splitlines()
    assert script.count("--trainer.max_steps 7") == 20
    assert "srun " in script and "provq-fit fit" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    no_sweep = subprocess.run(["make", "-s", "sweep"], cwd=REPO, capture_output=True, text=True)
    assert no_sweep.returncode != 0 and "usage: make sweep SWEEP=" in no_sweep.stdout


FAKE_SRUN = """#!/bin/bash
# Stand-in for srun: record the arguments, exit with $FAKE_SRUN_EXIT.
printf '%s\\n' "$@" > "$FAKE_SRUN_RECORD"
exit "${FAKE_SRUN_EXIT:-0}"
"""


@pytest.fixture
def fake_task(tmp_path):
    """Run one array task of the rendered topodisc script with a recording srun."""
    out = tmp_path / "out"
    sweep = load_sweep(SWEEPS / "topodisc.yaml")
    script = tmp_path / "sweep.sbatch"
    script.write_text(render_script(sweep, out))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    record = tmp_path / "srun.args"

    def run(index: int, exit_code: int = 0, restart: int = 0) -> tuple[int, list[str], str]:
        record.unlink(missing_ok=True)
        env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "SLURM_ARRAY_TASK_ID": str(index),
            "SLURM_ARRAY_JOB_ID": "77",
            "SLURM_JOB_NUM_NODES": "1",
            "SLURM_RESTART_COUNT": str(restart),
            "FAKE_SRUN_RECORD": str(record),
            "FAKE_SRUN_EXIT": str(exit_code),
        }
        proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
        args = record.read_text().splitlines() if record.exists() else []
        return proc.returncode, args, proc.stdout + proc.stderr

    return run, out, sweep


def test_array_task_runs_its_own_arguments_in_its_own_directory(fake_task):
    run, out, sweep = fake_task
    rc, args, log = run(7)
    task = sweep.tasks[7]
    assert rc == 0, log
    assert args[args.index("fit") + 1 :][: len(task.args)] == task.args
    after_fit = args[args.index("fit") + 1 + len(task.args) :]
    named = dict(zip(after_fit[::2], after_fit[1::2], strict=False))
    assert named["--trainer.logger.init_args.save_dir"] == str(out.parent)
    assert named["--trainer.logger.init_args.name"] == out.name
    assert named["--trainer.logger.init_args.version"] == task.name
    assert named["--trainer.default_root_dir"] == str(out / task.name)
    assert "--ckpt_path" not in args and "--cpus-per-task=1" in args
    status = json.loads((out / task.name / "exit_status.json").read_text())
    assert status == {"exit_code": 0, "job": "77_7", "restarts": 0}


def test_restart_resumes_from_last_checkpoint_and_finished_tasks_are_skipped(fake_task):
    run, out, sweep = fake_task
    run_dir = out / sweep.tasks[3].name
    rc, _, _ = run(3, exit_code=137)  # killed: the failure is recorded
    assert json.loads((run_dir / "exit_status.json").read_text())["exit_code"] == 137 == rc
    hpc = run_dir / "hpc_ckpt_1.ckpt"  # as Lightning writes it on SIGUSR1
    hpc.write_bytes(b"")
    _, args, log = run(3, restart=1)  # no last.ckpt yet: from scratch, hpc removed
    assert "--ckpt_path" not in args and not hpc.exists(), log
    (run_dir / "exit_status.json").unlink()
    last = run_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"")
    hpc.write_bytes(b"")  # newer than last.ckpt, and still not used
    rc, args, log = run(3, restart=2)
    assert rc == 0 and args[args.index("--ckpt_path") + 1] == str(last) and not hpc.exists()
    rc, args, log = run(3)  # finished: a resubmitted sweep does not run it again
    assert rc == 0 and args == [] and "already finished" in log
    assert run(99)[0] == 2


def fake_run(out: Path, name: str, step: int | None, max_steps: int = 300, **metrics) -> None:
    run_dir = out / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_steps": max_steps}}))
    if step is not None:
        payload = {"global_step": float(step), **metrics}
        (run_dir / "metrics.json").write_text(json.dumps(payload))


def test_report_marks_missing_failed_and_incomplete_tasks(tmp_path):
    sweep = load_sweep(SWEEPS / "topodisc_smoke.yaml")
    out = tmp_path / "out"
    m = {"val/mse_disk": 0.2, "val/mse_triangle": 0.8, "val/mse": 0.5, "val/utilization": 0.5}
    fake_run(out, "vanilla-seed0", 300, **m)
    fake_run(out, "vanilla-seed1", 300, **{**m, "val/mse_triangle": 0.6})
    fake_run(out, "vanilla-seed2", 150, **m)  # no exit status: still running or requeued
    fake_run(out, "vanilla-seed3", 100, **m)
    (out / "vanilla-seed3" / "exit_status.json").write_text('{"exit_code": 1}')
    (out / "slurm").mkdir()
    (out / "slurm" / "12_3.out").write_text("Traceback ...")
    fake_run(out, "provq-seed0", 250, **m)
    (out / "provq-seed0" / "exit_status.json").write_text('{"exit_code": 0}')  # SIGTERM exit
    for seed in range(1, 5):
        fake_run(out, f"provq-seed{seed}", 300, **{**m, "val/mse_triangle": 0.05 * seed})
    text = write_report(sweep, out)

    assert "6 of 10 tasks done" in text
    assert "- failed: vanilla-seed3, provq-seed0" in text
    assert "- missing: vanilla-seed4" in text and "- incomplete: vanilla-seed2" in text
    row = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ")}
    assert "**FAILED** (exit 1 at step 100 of 300; log slurm/12_3.out)" in row["vanilla-seed3"]
    assert "**FAILED** (exited 0 at step 250 of 300" in row["provq-seed0"]
    assert "**MISSING**" in row["vanilla-seed4"] and "incomplete (step 150 of 300)" in text
    assert "| vanilla | 2/5 | 0.2 ± 0 | 0.7 ± 0.14 |" in text  # mean ± std of the done ones
    assert "| provq | 4/5 | 0.2 ± 0 | 0.125 ± 0.065 |" in text
    with (out / "report.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows].count("done") == 6 and len(rows) == 10
    assert rows[4]["status"] == "missing" and rows[4]["val/mse"] == ""
    assert float(rows[1]["val/mse_triangle"]) == 0.6
    assert (out / "report.png").stat().st_size > 10_000
    assert (out / "report.md").read_text().startswith(text.split("\nwritten:")[0])


# -- provq-sweep run: the same tasks on this machine -------------------------------------------
TINY_SWEEP = """
name: tiny
config: experiments/topodisc_vanilla.yaml
grid:
  seed: [0, 1]
overrides:
  seed_everything: "{seed}"
  data.init_args.seed: "{seed}"
  trainer.max_steps: 4
  trainer.val_check_interval: 2
  trainer.enable_progress_bar: false
  trainer.enable_model_summary: false
  model.init_args.figure_every_n_steps: 0
"""


def test_run_locally_runs_every_task_skips_finished_ones_and_names_a_failed_one(tmp_path, capsys):
    sweep, out = write(tmp_path, TINY_SWEEP), tmp_path / "out"
    assert main(["run", str(sweep), "--out", str(out), "--jobs", "2"]) == 0, capsys.readouterr()
    for name in ("seed0", "seed1"):
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert metrics["global_step"] == 4 and metrics["status"] == "finished"
        assert json.loads((out / name / "exit_status.json").read_text())["exit_code"] == 0
        assert "Trainer.fit` stopped: `max_steps=4` reached" in (out / f"{name}.log").read_text()
    configs = {n: yaml.safe_load((out / n / "config.yaml").read_text()) for n in ("seed0", "seed1")}
    assert [c["seed_everything"] for c in configs.values()] == [0, 1]
    written = (out / "seed0" / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()

    # Run again: finished tasks are skipped (as a resubmitted array job skips them).
    assert main(["run", str(sweep), "--out", str(out)]) == 0
    assert "skipped 2 finished tasks" in capsys.readouterr().out
    assert (out / "seed0" / "metrics.json").stat().st_mtime_ns == written

    # A task that fails: one line on stderr naming it, its exit code and its log.
    bad = ["--levels", "seed=5", "--set", "model.init_args.no_such_setting=1"]
    assert main(["run", str(sweep), "--out", str(out), *bad]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("provq-sweep: task seed5 failed (exit ")
    assert err[0].endswith(f"; log: {out / 'seed5.log'}") and "no_such_setting" in err[0]
    assert json.loads((out / "seed5" / "exit_status.json").read_text())["exit_code"] != 0


class FakePopen:
    """Stands in for provq-fit: records the command line and exits with ``code``."""

    commands: list[list[str]] = []
    code = 0

    def __init__(self, command, **kwargs):
        FakePopen.commands.append(command)

    def wait(self) -> int:
        return FakePopen.code


def test_run_locally_resumes_from_last_checkpoint_like_the_array_script(tmp_path, monkeypatch):
    from provq_lightning.tools import sweep_local

    monkeypatch.setattr(sweep_local.subprocess, "Popen", FakePopen)
    FakePopen.commands = []
    sweep, out = load_sweep(write(tmp_path, TINY_SWEEP)), tmp_path / "out"
    first, second = (out / t.name for t in sweep.tasks)
    (first / "checkpoints").mkdir(parents=True)
    (first / "checkpoints" / "last.ckpt").write_bytes(b"")
    (first / "hpc_ckpt_3.ckpt").write_bytes(b"")  # stale, mid-step: never resumed from
    second.mkdir()
    (second / "exit_status.json").write_text('{"exit_code": 0}')
    outcomes = sweep_local.run_sweep(sweep, out)
    assert [o.skipped for o in outcomes] == [False, True] and len(FakePopen.commands) == 1
    command = FakePopen.commands[0]
    assert command[command.index("--ckpt_path") + 1] == str(first / "checkpoints" / "last.ckpt")
    assert not (first / "hpc_ckpt_3.ckpt").exists()
    assert command[command.index("--trainer.default_root_dir") + 1] == str(first)
    FakePopen.code = 137  # killed: recorded, and the next run starts it again
    assert sweep_local.run_sweep(sweep, out, restart=True)[1].exit_code == 137
    assert json.loads((second / "exit_status.json").read_text())["exit_code"] == 137
    assert "--ckpt_path" not in FakePopen.commands[-1]  # --restart: from scratch
    FakePopen.code = 0


def test_run_dir_template_and_levels_pick_the_tasks_and_their_directories(tmp_path):
    sweep = load_sweep(
        SWEEPS / "topodisc.yaml",
        levels={"variant": ["provq", "vanilla"], "seed": [7]},
        run_dir="topodisc_{variant}/seed_{seed}",
    )
    # A named axis keeps the file's order; a plain axis takes the given values.
    assert [t.name for t in sweep.tasks] == ["vanilla-seed7", "provq-seed7"]
    task = sweep.tasks[1]
    assert task.run_dir == "topodisc_provq/seed_7" and "--seed_everything" in task.args
    args = dict(zip(task.logger_args(tmp_path)[::2], task.logger_args(tmp_path)[1::2], strict=True))
    assert args["--trainer.logger.init_args.save_dir"] == str(tmp_path)
    assert args["--trainer.logger.init_args.name"] == "topodisc_provq"
    assert args["--trainer.logger.init_args.version"] == "seed_7"
    script = render_script(sweep, tmp_path)
    assert f"RUN_DIR={tmp_path / 'topodisc_provq' / 'seed_7'}" in script

    # The sample grids write where `make image-sample` and the reports read.
    image = load_sweep(SWEEPS / "imagenet_sample.yaml")
    assert [t.run_dir for t in image.tasks] == [
        f"imagenet_sample_64px_{v}/seed_{s}" for s in (0, 1) for v in ("provq", "vanilla")
    ]
    protein = load_sweep(SWEEPS / "proteins_sample.yaml", levels={"seed": [3]})
    assert [t.run_dir for t in protein.tasks] == [
        "proteins_sample_provq/seed_3", "proteins_sample_vanilla/seed_3",
        "proteins_sample_vanilla_norevival/seed_3",
    ]


@pytest.mark.parametrize(
    "levels, run_dir, message",
    [
        ({"variant": ["nope"]}, None, "--levels variant: no level 'nope'; the levels are vanilla"),
        ({"seeds": [1]}, None, "--levels seeds: not an axis of the grid"),
        (None, "{variant}", "run_dir: tasks 0 and 1 would share the run directory 'vanilla'"),
        (None, "../{variant}-{seed}", "run_dir: '../vanilla-0': write a relative path"),
        (None, "{variantt}/{seed}", "run_dir: unknown placeholder {variantt}"),
    ],
)
def test_levels_and_run_dir_errors_name_the_file_and_the_key(levels, run_dir, message):
    with pytest.raises(SweepError, match="topodisc.yaml: ") as info:
        load_sweep(SWEEPS / "topodisc.yaml", levels=levels, run_dir=run_dir)
    assert message in str(info.value)


def test_sample_grid_arguments_resolve_in_provq_fit(tmp_path, capsys):
    """The image sample grid's task is the command line make image-sample always ran."""
    from provq_lightning.tools.fit import main as provq_fit

    task = load_sweep(SWEEPS / "imagenet_sample.yaml").tasks[3]
    argv = sys.argv
    try:
        provq_fit(["fit", *task.args, *task.logger_args(tmp_path), "--print_config"])
    except SystemExit as exit_:
        assert not exit_.code, capsys.readouterr().err[-2000:]
    finally:
        sys.argv = argv
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["seed_everything"] == 1 and config["data"]["init_args"]["seed"] == 1
    logger = config["trainer"]["logger"]["init_args"]
    assert (logger["name"], logger["version"]) == ("imagenet_sample_64px_vanilla", "seed_1")


def test_a_misspelt_override_fails_at_submission_not_in_each_task(monkeypatch):
    import provq_lightning.tools.sweep as sweep_module

    def no_sbatch(*args, **kwargs):
        raise AssertionError("sbatch ran for a sweep whose tasks do not parse")

    monkeypatch.setattr(sweep_module.subprocess, "run", no_sbatch)
    sweep = load_sweep(SWEEPS / "topodisc_smoke.yaml", {"trainer.max_stepz": 7})
    with pytest.raises(SweepError) as err:
        sweep_module.submit(sweep, Path("unused"))
    message = str(err.value)
    assert "task 0" in message and "max_stepz" in message and "\n" not in message
    sweep_module.check_tasks(load_sweep(SWEEPS / "topodisc_smoke.yaml", {"trainer.max_steps": 7}))
