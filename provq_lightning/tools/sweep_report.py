"""``provq-sweep report``: every task's ``metrics.json`` in one table (markdown, CSV) and a plot.

A task's status comes from files in its run directory alone, so the report works during a sweep,
after it and without SLURM: ``metrics.json`` (written at every validation), ``config.yaml``
(its ``trainer.max_steps``) and ``exit_status.json`` (written by the array script when the
task's ``srun`` returns; removed when a task starts or restarts).
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from provq_lightning.reporting.mean_sd_table import Column, Group, TableStyle, mean_sd_table
from provq_lightning.tools.sweep_spec import STATUS_FILE, Sweep, Task, task_log

DONE, FAILED, INCOMPLETE, MISSING = "done", "failed", "incomplete", "missing"
MAX_PLOTS = 6
# Each cell averages the finished tasks that have the metric; a lone one shows "± 0".
SUMMARY_STYLE = TableStyle(partial=None, empty="—", lone_sd=True, drop_empty_columns=False)


@dataclass
class Row:
    index: int
    name: str
    levels: dict[str, Any]
    status: str
    detail: str = ""
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _max_steps(run_dir: Path) -> int | None:
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        steps = int(config["trainer"]["max_steps"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None
    return steps if steps > 0 else None


def _task_log(out: Path, task: Task) -> str:
    """The newest log of the task: a SLURM array log, or the one ``provq-sweep run`` wrote."""
    logs = [*(out / "slurm").glob(f"*_{task.index}.out"), task_log(out, task)]
    logs = sorted((p for p in logs if p.is_file()), key=lambda p: p.stat().st_mtime)
    return f"; log {logs[-1].relative_to(out)}" if logs else ""


def task_row(out: Path, task: Task) -> Row:
    """Status and final metrics of one task from its run directory."""
    index, name, levels = task.index, task.name, task.levels
    run_dir = out / task.run_dir
    metrics = _read_json(run_dir / "metrics.json")
    exit_status = _read_json(run_dir / STATUS_FILE)
    step = int(metrics.get("global_step", 0)) if metrics else None
    max_steps = _max_steps(run_dir)
    # Numbers only: metrics.json also holds `status`, `error` and `nonfinite` (strings, a list).
    values = {
        k: float(v)
        for k, v in (metrics or {}).items()
        if k != "global_step" and isinstance(v, (int, float))
    }
    row = Row(index, name, levels, MISSING, step=step, metrics=values)
    finished = metrics is not None and (max_steps is None or (step or 0) >= max_steps)
    of_steps = f"step {step if step is not None else '-'} of {max_steps or '?'}"
    if exit_status is not None and exit_status.get("exit_code") != 0:
        row.status = FAILED
        row.detail = f"exit {exit_status.get('exit_code')} at {of_steps}" + _task_log(out, task)
    elif finished:
        row.status = DONE
    elif exit_status is not None:  # exited 0 before max_steps, e.g. stopped by SIGTERM
        row.status = FAILED
        row.detail = f"exited 0 at {of_steps}" + _task_log(out, task)
    elif run_dir.is_dir():  # running, waiting for its requeue, or killed without a trace
        row.status = INCOMPLETE
        row.detail = of_steps
    else:
        row.detail = "no run directory: not started (pending) or never submitted"
    return row


def collect(sweep: Sweep, out: Path) -> list[Row]:
    return [task_row(out, t) for t in sweep.tasks]


def metric_columns(sweep: Sweep, rows: list[Row]) -> list[str]:
    if sweep.report.metrics:
        return list(sweep.report.metrics)
    return sorted({k for r in rows for k in r.metrics})


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _status_cell(row: Row) -> str:
    shown = row.status if row.status in (DONE, INCOMPLETE) else f"**{row.status.upper()}**"
    return f"{shown} ({row.detail})" if row.detail else shown


def _groups(sweep: Sweep, rows: list[Row]) -> dict[tuple, list[Row]]:
    """Rows keyed by their levels on every axis except ``report.average_over``."""
    keep = [a for a in sweep.axes if a != sweep.report.average_over]
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row.levels[a] for a in keep), []).append(row)
    return groups


def summary_markdown(sweep: Sweep, rows: list[Row], columns: list[str]) -> list[str]:
    over = sweep.report.average_over
    keep = [a for a in sweep.axes if a != over]
    groups = []
    for key, group in _groups(sweep, rows).items():
        done = [r for r in group if r.status == DONE]
        cells = [str(k) for k in key] + [f"{len(done)}/{len(group)}"]
        groups.append(Group(cells, [r.metrics for r in done]))
    table = mean_sd_table(
        [*keep, "finished"], groups, [Column(c, c, "{:.4g}", "{:.2g}") for c in columns],
        style=SUMMARY_STYLE,
    )
    return [f"### Mean ± std over {over} (finished tasks only)", "", table]


def markdown(sweep: Sweep, rows: list[Row], columns: list[str]) -> str:
    counts = {s: [r.name for r in rows if r.status == s] for s in (FAILED, MISSING, INCOMPLETE)}
    done = sum(r.status == DONE for r in rows)
    lines = [f"## Sweep {sweep.name}: {done} of {len(rows)} tasks done", ""]
    marked = [f"- {status}: {', '.join(names)}" for status, names in counts.items() if names]
    lines += [*marked, ""] if marked else []
    lines += [
        "| " + " | ".join(["#", "task", *sweep.axes, "status", "step", *columns]) + " |",
        "|" + "---|" * (4 + len(sweep.axes) + len(columns)),
    ]
    for r in rows:
        cells = [str(r.index), r.name, *(str(r.levels[a]) for a in sweep.axes)]
        cells += [_status_cell(r), "—" if r.step is None else str(r.step)]
        cells += [_fmt(r.metrics.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    if sweep.report.average_over:
        lines += ["", *summary_markdown(sweep, rows, columns)]
    return "\n".join(lines) + "\n"


def write_csv(sweep: Sweep, rows: list[Row], columns: list[str], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "task", *sweep.axes, "status", "detail", "step", *columns])
        for r in rows:
            writer.writerow(
                [r.index, r.name, *(r.levels[a] for a in sweep.axes), r.status, r.detail]
                + ["" if r.step is None else r.step]
                + [r.metrics.get(c, "") for c in columns]
            )


def plot(sweep: Sweep, rows: list[Row], columns: list[str], path: Path) -> None:
    """One panel per metric: every finished task as a dot, the group mean as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = columns[:MAX_PLOTS]
    groups = _groups(sweep, rows) if sweep.axes else {(r.name,): [r] for r in rows}
    labels = ["/".join(map(str, k)) or sweep.name for k in groups]
    fig, axes = plt.subplots(
        1, max(1, len(shown)), figsize=(1.2 + 3.2 * max(1, len(shown)), 3.6), squeeze=False
    )
    for ax, col in zip(axes[0], shown or [None], strict=True):
        if col is None:
            ax.text(0.5, 0.5, "no metrics yet", ha="center", va="center")
            ax.set_axis_off()
            continue
        for x, group in enumerate(groups.values()):
            values = [r.metrics[col] for r in group if r.status == DONE and col in r.metrics]
            if values:
                ax.bar(x, statistics.fmean(values), color="#c6dbef", width=0.6)
                ax.plot([x] * len(values), values, "o", color="#08519c", ms=4)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(col, fontsize=10)
    bad = [r.name for r in rows if r.status != DONE]
    title = f"sweep {sweep.name}: {len(rows) - len(bad)}/{len(rows)} tasks done"
    if bad:
        title += f"; not done: {', '.join(bad[:6])}{' …' if len(bad) > 6 else ''}"
    fig.suptitle(title, fontsize=10, color="#a50f15" if bad else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(sweep: Sweep, out: Path) -> str:
    """Write ``report.md``, ``report.csv`` and ``report.png`` under ``out``; the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(sweep, out)
    columns = metric_columns(sweep, rows)
    text = markdown(sweep, rows, columns)
    (out / "report.md").write_text(text + "\n![metrics](report.png)\n")
    write_csv(sweep, rows, columns, out / "report.csv")
    plot(sweep, rows, columns, out / "report.png")
    return text + f"\nwritten: {out}/report.md, report.csv, report.png"
