"""``provq-sweep``: run a sweep file here or as one SLURM array job, and report on its runs.

    provq-sweep run    experiments/sweeps/topodisc.yaml --jobs 2  # every task on this machine
    provq-sweep render experiments/sweeps/topodisc.yaml      # print the sbatch script (DRY_RUN=1)
    provq-sweep submit experiments/sweeps/topodisc.yaml      # sbatch --array, one task per run
    provq-sweep report experiments/sweeps/topodisc.yaml      # table (md, csv) and plot
    provq-sweep tasks  experiments/sweeps/topodisc.yaml      # index, run directory, arguments

Each task runs ``provq-fit`` (``srun provq-fit`` in an array task) in its own run directory,
``<out>/<task>`` unless the sweep file's ``run_dir`` says otherwise (the TensorBoard log dir,
Lightning's ``default_root_dir`` and the checkpoint dir), so a restarted task finds its own
checkpoint, continues its TensorBoard run and rewrites its ``config.yaml``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import subprocess
import sys
from pathlib import Path

from provq_lightning.tools.sweep_spec import (
    STATUS_FILE,
    Sweep,
    SweepError,
    load_sweep,
    parse_assignment,
    parse_levels,
)


def default_out(sweep: Sweep) -> Path:
    return Path("runs") / "sweeps" / sweep.name


def provq_fit_executable() -> str:
    """The provq-fit next to this interpreter (the venv's), so compute nodes use the same one."""
    sibling = Path(sys.executable).with_name("provq-fit")
    return str(sibling) if sibling.exists() else "provq-fit"


def sbatch_options(sweep: Sweep, out: Path, workdir: Path) -> list[str]:
    s = sweep.slurm
    last = len(sweep.tasks) - 1
    array = f"0-{last}" + (f"%{s.max_parallel}" if s.max_parallel else "")
    options = [
        f"--job-name=provq-{sweep.name}",
        f"--array={array}",
        f"--nodes={s.nodes}",
        f"--ntasks-per-node={s.tasks_per_node}",
        f"--cpus-per-task={s.cpus_per_task}",
        f"--time={s.time}",
        f"--signal={s.signal}",
        # Requeueable; one log per task that a requeue appends to instead of truncating.
        "--requeue",
        "--open-mode=append",
        f"--chdir={workdir}",
        f"--output={out}/slurm/%A_%a.out",
    ]
    if s.gpus_per_node:
        options.append(f"--gres=gpu:{s.gpus_per_node}")
    if s.mem:
        options.append(f"--mem={s.mem}")
    if s.partition:
        options.append(f"--partition={s.partition}")
    if s.account:
        options.append(f"--account={s.account}")
    return options + [str(e) for e in s.extra]


def render_script(sweep: Sweep, out: Path, workdir: Path | None = None) -> str:
    """The sbatch array script: SLURM_ARRAY_TASK_ID picks the task's arguments."""
    out = out.resolve()
    workdir = (workdir or Path.cwd()).resolve()
    q = shlex.quote
    lines = [
        "#!/bin/bash",
        f"# provq sweep {sweep.name!r} from {sweep.path}: {len(sweep.tasks)} tasks, written by",
        "# provq-sweep. Submitting it again resumes unfinished tasks and skips finished ones.",
        *(f"#SBATCH {opt}" for opt in sbatch_options(sweep, out, workdir)),
        "set -uo pipefail  # no -e: the task's exit code is recorded below",
        "",
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    for task in sweep.tasks:
        args = " ".join(q(a) for a in [*task.args, *task.logger_args(out)])
        lines += [
            f"  {task.index}) TASK={q(task.name)}",
            f"     RUN_DIR={q(str(out / task.run_dir))}",
            f"     ARGS=({args}) ;;",
        ]
    lines += [
        '  *) echo "sweep has no task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
        "esac",
        'mkdir -p "$RUN_DIR"',
        f'if grep -qs \'"exit_code": 0\' "$RUN_DIR/{STATUS_FILE}"; then',
        '  echo "[provq-sweep] $TASK already finished"; exit 0',
        "fi",
        f'rm -f "$RUN_DIR/{STATUS_FILE}"',
        "",
        "# Resume from last.ckpt: on SIGUSR1 provq's PreemptionCheckpoint wrote it at the end of",
        "# the step in flight, then requeued this task (otherwise it is the periodic one). provq",
        "# writes no hpc_ckpt_N.ckpt; a stale one (older provq) is mid-step and Lightning would",
        "# resume from it by itself when there is no last.ckpt yet: remove it.",
        'rm -f "$RUN_DIR"/hpc_ckpt_*.ckpt',
        'CKPT=""',
        "RESUME=()",
        'if [ -f "$RUN_DIR/checkpoints/last.ckpt" ]; then',
        '  CKPT="$RUN_DIR/checkpoints/last.ckpt"; RESUME=(--ckpt_path "$CKPT")',
        "fi",
        'echo "[provq-sweep] task $SLURM_ARRAY_TASK_ID ($TASK) on $(hostname), restart'
        ' ${SLURM_RESTART_COUNT:-0}, resume from: ${CKPT:-nothing}"',
        "",
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
        *(f"export {k}={q(v)}" for k, v in sweep.env.items()),
        *sweep.slurm.setup,
        "",
        # srun of SLURM 22.05 no longer inherits --cpus-per-task from sbatch: pass it on.
        "srun --kill-on-bad-exit=1 --cpus-per-task=${SLURM_CPUS_PER_TASK:-1} \\",
        f'  {q(provq_fit_executable())} fit "${{ARGS[@]}}" \\',
        '  --trainer.num_nodes "$SLURM_JOB_NUM_NODES" \\',
        '  "${RESUME[@]}"',
        "STATUS=$?",
        'printf \'{"exit_code": %d, "job": "%s_%s", "restarts": %d}\\n\' "$STATUS" \\',
        '  "$SLURM_ARRAY_JOB_ID" "$SLURM_ARRAY_TASK_ID" "${SLURM_RESTART_COUNT:-0}" \\',
        f'  > "$RUN_DIR/{STATUS_FILE}"',
        'exit "$STATUS"',
        "",
    ]
    return "\n".join(lines)


def write_manifest(sweep: Sweep, out: Path, job_id: str | None) -> Path:
    """``sweep.json``: the expanded tasks and every job id this sweep was submitted as."""
    path = out / "sweep.json"
    jobs = json.loads(path.read_text()).get("jobs", []) if path.exists() else []
    payload = {
        "sweep": str(sweep.path),
        "name": sweep.name,
        "axes": sweep.axes,
        "jobs": jobs + ([job_id] if job_id else []),
        "tasks": [
            {"index": t.index, "name": t.name, "levels": t.levels, "args": t.args,
             "run_dir": t.run_dir}
            for t in sweep.tasks
        ],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def check_tasks(sweep: Sweep) -> None:
    """Parse every task's ``provq-fit`` arguments as the task will (nothing is built): a
    misspelt override or a wrong type fails here, in one line naming the task, instead of in
    every array task once it starts on the cluster."""
    from provq_lightning.tools.fit import ProvqCLI
    from provq_lightning.tools.shipped_configs import resolve_config_args

    for task in sweep.tasks:
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                ProvqCLI(args=[*resolve_config_args(task.args), "--print_config"], run=False)
                code = 0
            except SystemExit as exit_:
                code = exit_.code
            except Exception as exc:  # noqa: BLE001 - any parse failure names its task
                code, _ = 1, err.write(f"{type(exc).__name__}: {exc}")
        if code:
            lines = [line for line in err.getvalue().strip().splitlines() if line.strip()]
            reason = lines[-1].removeprefix("error: ") if lines else f"exit {code}"
            raise SweepError(f"task {task.index} ({task.name}) of {sweep.path} does not parse: "
                             f"{reason}; fix the sweep file or the --set override")


def submit(sweep: Sweep, out: Path, wait: bool = False) -> str:
    """Write ``sweep.sbatch`` and ``sweep.json`` under ``out`` and sbatch it; the job id."""
    check_tasks(sweep)
    out.mkdir(parents=True, exist_ok=True)
    (out / "slurm").mkdir(exist_ok=True)
    script = out / "sweep.sbatch"
    script.write_text(render_script(sweep, out))
    command = ["sbatch", "--parsable", *(["--wait"] if wait else []), str(script)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise SweepError(
            "sbatch not found: submit from a SLURM login node, or start a local test cluster "
            "(scripts/local_slurm.sh start, then export SLURM_CONF as it prints); "
            "DRY_RUN=1 / provq-sweep render prints the script without submitting"
        ) from exc
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SweepError(
            f"sbatch {script} failed (exit {proc.returncode}): {proc.stderr.strip()}\n"
            "(no controller found? on the local test cluster export SLURM_CONF as "
            "scripts/local_slurm.sh start prints it)"
        )
    write_manifest(sweep, out, job_id)
    if proc.returncode != 0 and not wait:
        raise SweepError(f"sbatch {script} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return job_id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="provq-sweep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "run every task on this machine, --jobs at a time; finished tasks are skipped"),
        ("render", "print the sbatch array script, submit nothing"),
        ("submit", "write the script under the sweep directory and sbatch it"),
        ("report", "collect every task's metrics.json into report.md/.csv/.png"),
        ("tasks", "list the expanded tasks"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("sweep", type=Path, help="sweep file, e.g. experiments/sweeps/topodisc.yaml")
        p.add_argument("--out", type=Path, help="sweep directory (default runs/sweeps/<name>)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="extra provq-fit override for every task, e.g. trainer.max_steps=300",
        )
        p.add_argument(
            "--levels",
            action="append",
            default=[],
            metavar="AXIS=L1,L2",
            help="only these levels of a named axis, or these values for a plain one "
            "(e.g. --levels seed=0,1 --levels variant=provq)",
        )
        p.add_argument(
            "--run-dir",
            metavar="TEMPLATE",
            help="each task's run directory under --out, e.g. '{variant}/seed_{seed}' "
            "(default: the file's run_dir, else the task name)",
        )
        if name == "run":
            p.add_argument("--jobs", type=int, default=1, help="tasks at a time (default 1)")
            p.add_argument(
                "--restart",
                action="store_true",
                help="delete each task's run directory and log first: run all from scratch",
            )
        if name in ("render", "submit"):
            group = p.add_argument_group("SLURM resources (override the sweep file's slurm:)")
            group.add_argument("--partition")
            group.add_argument("--account")
            group.add_argument("--time", help="e.g. 04:00:00")
            group.add_argument("--nodes", type=int)
            group.add_argument("--ntasks-per-node", type=int)
            group.add_argument("--gpus-per-node", type=int)
            group.add_argument("--cpus-per-task", type=int)
            group.add_argument("--mem", help="e.g. 64G")
            group.add_argument("--signal", help="e.g. SIGUSR1@90")
            group.add_argument("--max-parallel", type=int, help="array throttle, %%N")
        if name == "submit":
            p.add_argument("--wait", action="store_true", help="return when every task ended")
    return parser


SLURM_FLAGS = (
    "partition",
    "account",
    "time",
    "nodes",
    "ntasks_per_node",
    "gpus_per_node",
    "cpus_per_task",
    "mem",
    "signal",
    "max_parallel",
)


def run_locally(sweep: Sweep, out: Path, jobs: int, restart: bool) -> int:
    """``provq-sweep run``: every task here; one line on stderr per failed task, exit 1."""
    from provq_lightning.tools.sweep_local import run_sweep  # rich and subprocesses only here

    try:
        outcomes = run_sweep(sweep, out, jobs, restart)
    except KeyboardInterrupt:
        print("provq-sweep: interrupted; the running tasks were stopped (run again to resume "
              "them from their last.ckpt)", file=sys.stderr)
        return 130
    failed = [o for o in outcomes if o.exit_code != 0]
    for outcome in failed:
        print(f"provq-sweep: {outcome.failure()}", file=sys.stderr)
    done = len(outcomes) - len(failed)
    print(f"sweep {sweep.name!r}: {done} of {len(outcomes)} tasks done -> {out}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = dict(parse_assignment(a) for a in args.overrides)
        slurm = {k: getattr(args, k, None) for k in SLURM_FLAGS}
        levels = dict(parse_levels(a) for a in args.levels)
        sweep = load_sweep(args.sweep, overrides, slurm, levels, args.run_dir)
        out = (args.out or default_out(sweep)).resolve()
        if args.command == "run":
            return run_locally(sweep, out, args.jobs, args.restart)
        if args.command == "render":
            sys.stdout.write(render_script(sweep, out))
        elif args.command == "tasks":
            for task in sweep.tasks:
                print(f"{task.index}\t{out / task.run_dir}\t{shlex.join(task.args)}")
        elif args.command == "submit":
            job_id = submit(sweep, out, wait=args.wait)
            where = "" if args.out is None else f" SWEEP_OUT={args.out}"
            print(
                f"submitted sweep {sweep.name!r}: job {job_id}, {len(sweep.tasks)} tasks -> {out}\n"
                f"  squeue -j {job_id}     logs: {out}/slurm/\n"
                f"  report: make sweep-report SWEEP={args.sweep}{where}"
            )
        else:
            from provq_lightning.tools.sweep_report import write_report  # matplotlib only here

            print(write_report(sweep, out))
    except SweepError as exc:
        print(f"provq-sweep: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
