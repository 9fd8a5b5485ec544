"""What the image and protein run reports share: ``NAME=DIR[,DIR...]`` arguments, final metrics
as mean ± sd over seeds, per-run tables and learning curves from TensorBoard events.

A variant is a name and its run directories (provq-fit log folders, one per seed). Every table
is markdown; a column is ``(metrics.json key, header, format)`` (a ``mean_sd_table.Column``),
and the seed table is ``mean_sd_table``'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from provq_lightning.errors import ProvqError
from provq_lightning.reporting.curriculum_tags import warmup_validation_tag
from provq_lightning.reporting.mean_sd_table import Column, Group, mean_sd_table

Panel = tuple[str, float, str]  # (scalar tag, scale, y-axis label)
Metrics = dict[str, float]


class RunArgumentError(ProvqError):
    """A malformed ``NAME=DIR`` argument or a run directory that is not there."""

    exit_code = 2  # a usage error, as argparse exits


def parse_runs(specs: Sequence[str], made_by: str | None = None) -> dict[str, list[Path]]:
    """``NAME=DIR[,DIR...]`` arguments as {name: [dirs]}; every directory must exist.
    ``made_by``: the command that makes the runs, named in the error for a missing one."""
    runs: dict[str, list[Path]] = {}
    for spec in specs:
        name, _, dirs = spec.partition("=")
        paths = [Path(d) for d in dirs.split(",") if d]
        if not name or not paths:
            raise RunArgumentError(f"run argument {spec!r} is not NAME=RUN_DIR[,RUN_DIR...]; "
                                   "e.g. ProVQ=runs/x/seed_0,runs/x/seed_1")
        for path in paths:
            if not path.is_dir():
                fix = f"run {made_by} first, or pass" if made_by else "pass"
                raise RunArgumentError(f"run directory {path} (of {name}) not found; {fix} the "
                                       "log folder provq-fit wrote (it holds metrics.json)")
        runs.setdefault(name, []).extend(paths)
    return runs


def read_metrics(run_dir: Path) -> Metrics:
    """The final validation metrics provq-fit wrote to ``run_dir/metrics.json``."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise ProvqError(f"{path} not found; let the provq-fit run in {run_dir} finish "
                         "(it writes metrics.json after the last validation)")
    return json.loads(path.read_text())


def seed_table(runs: dict[str, list[Metrics]], columns: Sequence[Column]) -> str:
    """One row per variant: each column as mean ± sd over its runs (seeds); a column no run
    has is left out, a cell some seed lacks is ``n/a`` (a mean of fewer seeds would mislead)."""
    groups = []
    for name, ms in runs.items():
        steps = sorted({int(m.get("global_step", 0)) for m in ms})
        label = name if len(ms) == 1 else f"{name} ({len(ms)} seeds)"
        groups.append(Group((label, "/".join(map(str, steps))), ms))
    return mean_sd_table(("run", "steps"), groups, columns)


def per_run_table(runs: dict[str, list[Metrics]], dirs: dict[str, list[Path]],
                  columns: Sequence[Column]) -> str:
    """One row per run directory with its own values of ``columns``: the spread behind the
    mean."""
    shown = [Column(*c) for c in columns]
    rows = ["| run | directory | " + " | ".join(c.header for c in shown) + " |",
            "|" + "---|" * (len(shown) + 2)]
    for name, ms in runs.items():
        for m, d in zip(ms, dirs[name], strict=True):
            cells = [c.fmt.format(m[c.key]) if c.key in m else "n/a" for c in shown]
            rows.append(f"| {name} | {d.parent.name}/{d.name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


# -- learning curves --------------------------------------------------------------------------
def scalar_series(run_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a logged scalar, from every TensorBoard file of the run (a resumed
    fit writes a new file; its points replace the older file's at the same step). A ``val/``
    tag includes the warmup's validations, which TensorBoard holds as ``val_warmup/``, so a
    curve covers the whole run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = [tag, warmup_validation_tag(tag)]
    points: dict[int, float] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for name in tags:
            if name is not None and name in acc.Tags()["scalars"]:
                points.update({e.step: e.value for e in acc.Scalars(name)})
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def curriculum_boundaries(run_dir: Path) -> tuple[int, int] | None:
    """(warmup end, transition end) from the run's config.yaml, if it has a CurriculumCallback."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    config = yaml.safe_load(path.read_text())
    section = config.get("curriculum") or {}
    # provq-fit runs no curriculum for a section left at its defaults: kmeans_init without warmup.
    if section.get("warmup_steps") or section.get("kmeans_init") is False:
        warmup = int(section["warmup_steps"])
        return warmup, warmup + int(section.get("transition_steps") or 0)
    callbacks = (config.get("trainer") or {}).get("callbacks") or []  # runs of older provq
    for cb in callbacks:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("CurriculumCallback"):
            args = cb.get("init_args") or {}
            warmup = int(args.get("warmup_steps", 0))
            return warmup, warmup + int(args.get("transition_steps", 0))
    return None


def learning_curves(run_dirs: dict[str, list[Path]], path: Path,
                    panels: Sequence[Panel]) -> None:
    """One panel per ``(tag, scale, ylabel)`` (the scalar times ``scale`` against the step), one
    line per run, one colour per variant; dotted lines mark the end of warmup and of the
    transition (of the first run whose config has a curriculum)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    axes = axes[0]
    marked = False
    for colour, (name, dirs) in zip(plt.cm.tab10.colors, run_dirs.items(), strict=False):
        for i, run_dir in enumerate(dirs):
            for ax, (tag, scale, _) in zip(axes, panels, strict=True):
                steps, values = scalar_series(run_dir, tag)
                ax.plot(steps, [v * scale for v in values], marker="o", ms=3, color=colour,
                        alpha=0.9 if i == 0 else 0.55, label=f"{name} ({run_dir.name})")
            bounds = curriculum_boundaries(run_dir)
            if bounds and not marked:
                marked = True
                for ax in axes:
                    for x, what in zip(bounds, ("warmup ends", "transition ends"), strict=True):
                        ax.axvline(x, color="grey", ls=":", lw=1)
                        ax.text(x, 1.0, f" {what}", transform=ax.get_xaxis_transform(),
                                fontsize=7, color="grey", va="top")
    for ax, (_, _, ylabel) in zip(axes, panels, strict=True):
        ax.set(xlabel="step", ylabel=ylabel)
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The arguments every run report takes: the runs, ``--markdown`` and ``--curve``."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    parser.add_argument("runs", nargs="+",
                        help="NAME=RUN_DIR[,RUN_DIR...] (provq-fit log directories, one per seed)")
    parser.add_argument("--curve", type=Path, help="write the learning-curve PNG here")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    return parser


def report_runs(args: argparse.Namespace, read: Callable[[Path], Metrics],
                columns: Sequence[Column], per_run: Sequence[Column],
                panels: Sequence[Panel]) -> dict[str, list[Path]]:
    """Print (and with ``--markdown`` write) the seed and per-run tables of ``args.runs``, and
    with ``--curve`` draw the learning curves; returns the run directories by name."""
    run_dirs = parse_runs(args.runs)
    metrics = {name: [read(d) for d in dirs] for name, dirs in run_dirs.items()}
    text = seed_table(metrics, columns) + "\n\n" + per_run_table(metrics, run_dirs, per_run)
    print(text)
    if args.markdown is not None:
        write_text(text, args.markdown)
    if args.curve is not None:
        learning_curves(run_dirs, args.curve, panels)
        print(f"wrote {args.curve}")
    return run_dirs


def run_cli(prog: str, body: Callable[[list[str] | None], None], argv: list[str] | None) -> None:
    """Run a report's ``body``; a ``ProvqError`` becomes one line ``<prog>: error: <message>``
    on stderr and its exit code, instead of a traceback."""
    try:
        body(argv)
    except ProvqError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
