"""Sweep files: parse ``experiments/sweeps/*.yaml`` and expand them into tasks.

A sweep file names base config(s) and a grid (or a list) of overrides; every combination is one
task, i.e. one ``provq-fit`` command line. Every problem is reported as ``<file>: <key>: <what
to fix>`` before anything is submitted. The format is documented in docs/cluster.md.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

# Written by each sweep task next to its run: the exit code the report reads.
STATUS_FILE = "exit_status.json"
TOP_KEYS = ("name", "config", "grid", "tasks", "overrides", "run_dir", "env", "slurm", "report")
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
INT_KEYS = ("nodes", "ntasks_per_node", "gpus_per_node", "cpus_per_task", "max_parallel")
CLI_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class SweepError(ValueError):
    """A problem with a sweep file, worded as ``<file>: <key>: <problem and fix>``."""


@dataclass
class SlurmSpec:
    """``#SBATCH`` resources of every array task; the ``slurm:`` section of a sweep file."""

    partition: str | None = None
    account: str | None = None
    time: str = "04:00:00"
    nodes: int = 1
    ntasks_per_node: int | None = None  # default: one per GPU (Lightning wants one per device)
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem: str | None = None
    # On SIGUSR1 provq saves last.ckpt at the next step boundary and requeues the task.
    signal: str = "SIGUSR1@90"
    max_parallel: int | None = None
    extra: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. --constraint=a100
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load, ...)

    @property
    def tasks_per_node(self) -> int:
        return self.ntasks_per_node or max(1, self.gpus_per_node)


@dataclass
class ReportSpec:
    """The ``report:`` section: which metrics to tabulate and which axis to average over."""

    metrics: list[str] = field(default_factory=list)  # empty: every metric the runs wrote
    average_over: str | None = None


@dataclass(frozen=True)
class Task:
    """One task: its index, name, grid levels, ``provq-fit`` arguments and run directory
    (relative to the sweep directory; the task's name unless the sweep file says ``run_dir``)."""

    index: int
    name: str
    levels: dict[str, Any]
    args: list[str]
    run_dir: str = ""

    def __post_init__(self) -> None:
        if not self.run_dir:
            object.__setattr__(self, "run_dir", self.name)

    def logger_args(self, out: Path) -> list[str]:
        """provq-fit arguments that make ``out/run_dir`` the run directory: the TensorBoard
        log dir (logger ``save_dir/name/version``), Lightning's root and the checkpoint dir."""
        run_dir = out / self.run_dir
        return [
            "--trainer.logger.init_args.save_dir", str(run_dir.parent.parent),
            "--trainer.logger.init_args.name", run_dir.parent.name,
            "--trainer.logger.init_args.version", run_dir.name,
            "--trainer.default_root_dir", str(run_dir),
        ]  # fmt: skip


def task_log(out: Path, task: Task) -> Path:
    """Where ``provq-sweep run`` writes a task's output: next to its run directory."""
    run_dir = out / task.run_dir
    return run_dir.with_name(run_dir.name + ".log")


@dataclass
class Sweep:
    path: Path
    name: str
    axes: list[str]
    tasks: list[Task]
    env: dict[str, str]
    slurm: SlurmSpec
    report: ReportSpec


def cli_value(value: Any) -> str:
    """One override value as provq-fit (jsonargparse) reads it on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from the command line; VALUE is read as YAML so lists and bools work."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise SweepError(f"--set {text!r}: write KEY=VALUE, e.g. --set trainer.max_steps=300")
    return key.strip(), yaml.safe_load(raw) if raw else ""


def parse_levels(text: str) -> tuple[str, list[Any]]:
    """``AXIS=L1,L2`` from the command line; each level is read as YAML (``0`` is a number)."""
    axis, sep, raw = text.partition("=")
    if not sep or not axis.strip() or not raw.strip():
        raise SweepError(f"--levels {text!r}: write AXIS=LEVEL[,LEVEL...], e.g. --levels seed=0,1")
    return axis.strip(), [yaml.safe_load(v) for v in raw.split(",") if v.strip()]


class _Parser:
    """Holds the file name so every error can name the file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, key: str, problem: str) -> SweepError:
        return SweepError(f"{self.path}: {key}: {problem}")

    def fill(self, value: Any, context: Mapping[str, Any], key: str) -> Any:
        """Replace ``{axis}`` placeholders by this task's level; a lone placeholder keeps type."""
        if isinstance(value, str):
            whole = PLACEHOLDER.fullmatch(value)
            if whole:
                return self._lookup(whole.group(1), context, key)
            return PLACEHOLDER.sub(lambda m: str(self._lookup(m.group(1), context, key)), value)
        if isinstance(value, list):
            return [self.fill(v, context, key) for v in value]
        if isinstance(value, dict):
            return {k: self.fill(v, context, f"{key}.{k}") for k, v in value.items()}
        return value

    def _lookup(self, name: str, context: Mapping[str, Any], key: str) -> Any:
        if name not in context:
            known = ", ".join(f"{{{a}}}" for a in context) or "none (the sweep has no grid)"
            raise self.error(key, f"unknown placeholder {{{name}}}; the placeholders are {known}")
        return context[name]

    def overrides(self, raw: Any, key: str) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.error(key, f"expected a mapping of provq-fit keys to values, got {raw!r}")
        out = {}
        for name, value in raw.items():
            clean = str(name).lstrip("-")  # accept "--trainer.max_steps" as well
            if clean != "config" and not CLI_KEY.match(clean):
                raise self.error(
                    f"{key}.{name}", "not a provq-fit key; write dotted keys like trainer.max_steps"
                )
            out[clean] = value
        return out

    def configs(self, value: Any, key: str) -> list[str]:
        paths = value if isinstance(value, list) else [value]
        for p in paths:
            if not isinstance(p, str) or not p:
                raise self.error(key, f"expected a config path or a list of them, got {p!r}")
            if not Path(p).is_file():
                raise self.error(
                    key,
                    f"no such config file {p!r} (paths are relative to the directory provq-sweep "
                    "runs in, normally the repository root)",
                )
        return list(paths)

    def args(self, overrides: dict[str, Any], context: Mapping[str, Any], key: str) -> tuple:
        """(configs, other arguments) of one overrides mapping, placeholders filled."""
        configs: list[str] = []
        rest: list[str] = []
        for name, value in overrides.items():
            value = self.fill(value, context, f"{key}.{name}")
            if name == "config":
                configs += self.configs(value, f"{key}.config")
            else:
                rest += [f"--{name}", cli_value(value)]
        return configs, rest

    def section(self, cls: type, raw: Any, key: str) -> Any:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise self.error(key, f"expected a mapping, got {raw!r}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise self.error(f"{key}.{unknown[0]}", f"unknown key; allowed: {', '.join(allowed)}")
        for name in ("extra", "setup", "metrics"):
            if name in raw and not isinstance(raw[name], list):
                raise self.error(f"{key}.{name}", f"expected a list, got {raw[name]!r}")
        for name in INT_KEYS:
            value = raw.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise self.error(f"{key}.{name}", f"expected a whole number, got {value!r}")
        return cls(**raw)


def _levels(parser: _Parser, axis: str, spec: Any) -> list[tuple[str, Any, dict[str, Any]]]:
    """(label, placeholder value, overrides) of every level of one grid axis."""
    key = f"grid.{axis}"
    if isinstance(spec, list):
        # Plain values: used through {axis} placeholders; named e.g. "seed3" in run directories.
        levels = [(f"{axis}{v}", v, {}) for v in spec]
    elif isinstance(spec, dict):
        levels = [(str(n), str(n), parser.overrides(ov, f"{key}.{n}")) for n, ov in spec.items()]
    else:
        raise parser.error(
            key, "expected a list of values or a mapping of level names to overrides"
        )
    if not levels:
        raise parser.error(key, "an axis needs at least one level")
    return levels


def _select_levels(parser: _Parser, grid: Any, levels: Mapping[str, list[Any]]) -> Any:
    """The grid with ``--levels``: a plain axis takes the given values instead of its own, a
    named axis keeps only the named levels (in the file's order)."""
    if not isinstance(grid, dict):
        raise parser.error("--levels", "the sweep has no grid to pick levels from")
    grid = dict(grid)
    for axis, chosen in levels.items():
        key = f"--levels {axis}"
        if axis not in grid:
            raise parser.error(key, f"not an axis of the grid; the axes are {', '.join(grid)}")
        if not chosen:
            raise parser.error(key, "give at least one level, e.g. --levels seed=0,1")
        if isinstance(grid[axis], dict):
            unknown = [str(c) for c in chosen if str(c) not in map(str, grid[axis])]
            if unknown:
                known = ", ".join(map(str, grid[axis]))
                raise parser.error(key, f"no level {unknown[0]!r}; the levels are {known}")
            wanted = set(map(str, chosen))
            grid[axis] = {n: ov for n, ov in grid[axis].items() if str(n) in wanted}
        else:
            grid[axis] = list(chosen)
    return grid


def _run_dir(parser: _Parser, template: Any, combo: _Combo) -> str:
    """A task's run directory from the ``run_dir`` template: relative, one safe name per part."""
    if template is None:
        return combo.name
    if not isinstance(template, str) or not template:
        raise parser.error("run_dir", f"expected a path template like '{{variant}}/seed_{{seed}}', "
                           f"got {template!r}")
    path = str(parser.fill(template, combo.context, "run_dir"))
    parts = path.split("/")
    if any(not p or p in (".", "..") or SAFE_NAME.search(p) for p in parts):
        raise parser.error(
            "run_dir", f"{path!r}: write a relative path of names made of letters, digits, "
            "'.', '_' and '-' (placeholders: the grid's axes)"
        )
    return path


def _task_name(labels: list[str]) -> str:
    return SAFE_NAME.sub("_", "-".join(labels)) or "task"


@dataclass
class _Combo:
    """One task before rendering: its name, report levels, placeholders, overrides by source."""

    name: str
    levels: dict[str, Any]
    context: dict[str, Any]
    sources: list[tuple[str, dict[str, Any]]]


def _grid_combos(parser: _Parser, grid: Any) -> tuple[list[_Combo], list[str]]:
    if not isinstance(grid, dict) or not grid:
        raise parser.error("grid", "expected a mapping of axis names to levels")
    axes = [str(a) for a in grid]
    combos = []
    for combo in itertools.product(*(_levels(parser, a, grid[a]) for a in axes)):
        named = list(zip(axes, combo, strict=True))
        combos.append(
            _Combo(
                name=_task_name([label for _, (label, _, _) in named]),
                # The report shows plain values as values (seed 3), named levels by name.
                levels={a: v if isinstance(grid[a], list) else lab for a, (lab, v, _) in named},
                context={a: value for a, (_, value, _) in named},
                sources=[(f"grid.{a}.{label}", ov) for a, (label, _, ov) in named],
            )
        )
    return combos, axes


def _list_combos(parser: _Parser, raw: dict) -> tuple[list[_Combo], list[str]]:
    entries = raw["tasks"]
    if not isinstance(entries, list) or not entries:
        raise parser.error("tasks", "expected a non-empty list of override mappings")
    combos = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise parser.error(f"tasks[{i}]", f"expected a mapping, got {entry!r}")
        entry = dict(entry)
        label = str(entry.pop("name", f"task{i}"))
        overrides = parser.overrides(entry, f"tasks[{i}]")
        combos.append(_Combo(_task_name([label]), {}, {}, [(f"tasks[{i}]", overrides)]))
    return combos, []


def _check_unique_names(parser: _Parser, tasks: list[Task], where: str) -> None:
    seen: dict[str, int] = {}
    dirs: dict[str, int] = {}
    for task in tasks:
        if task.name in seen:
            raise parser.error(
                where, f"tasks {seen[task.name]} and {task.index} are both named {task.name!r}"
            )
        if task.run_dir in dirs:
            raise parser.error(
                "run_dir", f"tasks {dirs[task.run_dir]} and {task.index} would share the run "
                f"directory {task.run_dir!r}; use every axis in the template"
            )
        seen[task.name] = task.index
        dirs[task.run_dir] = task.index


def load_sweep(
    path: str | Path,
    extra_overrides: dict[str, Any] | None = None,
    slurm_overrides: dict[str, Any] | None = None,
    levels: Mapping[str, list[Any]] | None = None,
    run_dir: str | None = None,
) -> Sweep:
    """Parse and expand a sweep file; ``extra_overrides`` go to every task (``--set``),
    ``levels`` pick levels of grid axes (``--levels``), ``run_dir`` replaces the file's
    run-directory template (``--run-dir``)."""
    path = Path(path)
    parser = _Parser(path)
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file (see experiments/sweeps/ for examples)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise parser.error(unknown[0], f"unknown key; allowed: {', '.join(TOP_KEYS)}")
    if ("grid" in raw) == ("tasks" in raw):
        raise parser.error("grid", "give exactly one of 'grid' (a product) or 'tasks' (a list)")

    name = str(raw.get("name") or path.stem)
    if SAFE_NAME.search(name):
        raise parser.error("name", f"{name!r}: use only letters, digits, '.', '_' and '-'")
    base = parser.configs(raw["config"], "config") if raw.get("config") else []
    common = parser.overrides(raw.get("overrides"), "overrides")
    common.update(extra_overrides or {})

    if levels:
        raw["grid"] = _select_levels(parser, raw.get("grid"), levels)
    combos, axes = _grid_combos(parser, raw["grid"]) if "grid" in raw else _list_combos(parser, raw)
    template = run_dir if run_dir is not None else raw.get("run_dir")
    tasks = []
    for index, combo in enumerate(combos):
        configs, rest = list(base), []
        for key, ov in [*combo.sources, ("overrides", common)]:
            c, r = parser.args(ov, combo.context, key)
            configs += c
            rest += r
        # All --config first: jsonargparse applies arguments in order, so overrides win.
        args = [a for c in configs for a in ("--config", c)] + rest
        tasks.append(Task(index, combo.name, combo.levels, args, _run_dir(parser, template, combo)))
    _check_unique_names(parser, tasks, "grid" if "grid" in raw else "tasks")

    env = raw.get("env") or {}
    if not isinstance(env, dict):
        raise parser.error("env", f"expected a mapping of variable names to values, got {env!r}")
    slurm_raw = dict(raw.get("slurm") or {})
    slurm_raw.update({k: v for k, v in (slurm_overrides or {}).items() if v is not None})
    slurm = parser.section(SlurmSpec, slurm_raw, "slurm")
    report = parser.section(ReportSpec, raw.get("report"), "report")
    if report.average_over is None and "seed" in axes:
        report.average_over = "seed"
    if report.average_over is not None and report.average_over not in axes:
        raise parser.error(
            "report.average_over", f"{report.average_over!r} is not an axis of the grid ({axes})"
        )
    return Sweep(
        path=path,
        name=name,
        axes=axes,
        tasks=tasks,
        env={str(k): cli_value(v) for k, v in env.items()},
        slurm=slurm,
        report=report,
    )
