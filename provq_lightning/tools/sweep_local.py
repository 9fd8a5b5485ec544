"""``provq-sweep run``: every task of a sweep on this machine, ``jobs`` at a time.

The tasks, their arguments and run directories are those of the SLURM array job
(``provq-sweep submit``), and so is the bookkeeping: a task whose ``exit_status.json`` says 0
is skipped, one with a ``checkpoints/last.ckpt`` resumes from it (a stale ``hpc_ckpt_*.ckpt``
is removed), and each start records its exit code. A task's output goes to ``<run dir>.log``.
Each ``provq-fit`` gets one torch thread (``OMP_NUM_THREADS=1``) unless the sweep's ``env:``
says otherwise, so ``jobs`` runs share the CPU cores without oversubscribing them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from provq_lightning.tools.sweep_spec import STATUS_FILE, Sweep, Task, task_log

LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
LOG_LINE_CHARS = 240  # of a failed task's last log line, quoted in its one-line error


@dataclass(frozen=True)
class Outcome:
    """How one task ended: its exit code (0 also when skipped as finished) and its log."""

    task: Task
    exit_code: int
    log: Path
    skipped: bool = False

    def failure(self) -> str:
        """One line naming the task, its exit code, its last log line and the log file."""
        last = _last_line(self.log)
        said = f": {last[:LOG_LINE_CHARS]}" if last else ""
        return f"task {self.task.name} failed (exit {self.exit_code}){said}; log: {self.log}"


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def finished(run_dir: Path) -> bool:
    """True when the task's last start exited 0 (what the array script skips as well)."""
    try:
        return json.loads((run_dir / STATUS_FILE).read_text()).get("exit_code") == 0
    except (OSError, ValueError, AttributeError):
        return False


def fit_command(task: Task, out: Path, resume: Path | None) -> list[str]:
    """The task's provq-fit command line, through this interpreter (the same install)."""
    command = [sys.executable, "-m", "provq_lightning.tools.fit", "fit", *task.args]
    command += task.logger_args(out)
    return command + (["--ckpt_path", str(resume)] if resume is not None else [])


def task_environment(sweep: Sweep) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **sweep.env}


class LocalRunner:
    """Runs tasks as child processes; ``stop`` ends the running ones (Ctrl-C);
    ``changed(names)`` is told the running tasks whenever one starts or ends."""

    def __init__(self, sweep: Sweep, out: Path, restart: bool,
                 changed: Callable[[list[str]], None] = lambda names: None) -> None:
        self.sweep, self.out, self.restart, self.changed = sweep, out, restart, changed
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[str, subprocess.Popen] = {}

    def run(self, task: Task) -> Outcome:
        run_dir, log = self.out / task.run_dir, task_log(self.out, task)
        if self.restart:
            shutil.rmtree(run_dir, ignore_errors=True)
            log.unlink(missing_ok=True)
        elif finished(run_dir):
            return Outcome(task, 0, log, skipped=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / STATUS_FILE).unlink(missing_ok=True)
        for stale in run_dir.glob("hpc_ckpt_*.ckpt"):  # as in the array script
            stale.unlink()
        resume = run_dir / LAST_CHECKPOINT
        resume = resume if resume.is_file() else None
        with log.open("a") as fh:
            fh.write(f"[provq-sweep] task {task.index} ({task.name}) on {socket.gethostname()}, "
                     f"resume from: {resume or 'nothing'}\n")
            fh.flush()
            with self._lock:
                if self.stopping.is_set():
                    return Outcome(task, 130, log)
                proc = subprocess.Popen(
                    fit_command(task, self.out, resume),
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=task_environment(self.sweep),
                )
                self._running[task.name] = proc
                names = list(self._running)
            self.changed(names)
            code = proc.wait()
            with self._lock:
                del self._running[task.name]
                names = list(self._running)
            self.changed(names)
        if self.stopping.is_set():  # stopped by us: no exit status, the next run resumes it
            return Outcome(task, 130, log)
        code = code if code >= 0 else 128 - code  # killed by a signal: as bash reports it
        payload = {"exit_code": code, "job": "local", "restarts": 0}
        (run_dir / STATUS_FILE).write_text(json.dumps(payload) + "\n")
        return Outcome(task, code, log)

    def stop(self) -> None:
        self.stopping.set()
        with self._lock:
            for proc in self._running.values():
                proc.send_signal(signal.SIGTERM)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, so a killed runner stops its provq-fit
    children instead of leaving them running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_sweep(sweep: Sweep, out: Path, jobs: int = 1, restart: bool = False,
              console: Console | None = None) -> list[Outcome]:
    """Run every task of ``sweep`` under ``out``, ``jobs`` at a time, with a progress bar;
    ``restart``: delete each task's run directory and log first and run it from scratch.
    Returns the outcomes in task order; a failed task does not stop the others."""
    console = console or Console()
    outcomes: dict[int, Outcome] = {}
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[failed]}", style="red"),
        TextColumn("{task.fields[running]}", markup=False),
        console=console,
    )
    bar = progress.add_task("provq-fit runs", total=len(sweep.tasks), running="", failed="")
    runner = LocalRunner(
        sweep, out, restart, lambda names: progress.update(bar, running=", ".join(names))
    )
    with progress, ThreadPoolExecutor(max(1, jobs)) as pool, _sigterm_interrupts():
        futures = [pool.submit(runner.run, task) for task in sweep.tasks]
        try:
            for future in as_completed(futures):
                outcome = future.result()
                outcomes[outcome.task.index] = outcome
                failed = sum(o.exit_code != 0 for o in outcomes.values())
                progress.update(bar, advance=1, failed=f"{failed} failed" if failed else "")
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop the runs, start no more
            runner.stop()
            for future in futures:
                future.cancel()
            raise
    skipped = sum(o.skipped for o in outcomes.values())
    if skipped:
        console.print(f"provq-sweep: skipped {skipped} finished tasks (--restart reruns them)",
                      highlight=False)
    return [outcomes[t.index] for t in sweep.tasks]
