"""The one table of mean ± sd over seeds: a markdown row per group of runs, a column per metric.

Every report that averages runs over seeds writes it: the image and protein run reports
(``run_report.seed_table``), ``provq-sweep report`` and ``make demo``. A group is one row (its
leading cells and the final metrics of its runs); a column is a metrics key with a header and
formats; a ``TableStyle`` says how a table shows a lone run and a metric some runs lack.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

Metrics = Mapping[str, float]


class Column(NamedTuple):
    """A metrics key, its header and formats; a plain ``(key, header, fmt)`` tuple also works."""

    key: str
    header: str
    fmt: str = "{:.4g}"  # the mean (or the one value)
    sd_fmt: str | None = None  # the sd; default: ``fmt``
    with_sd: bool = True  # False: the mean alone


@dataclass(frozen=True)
class Group:
    """One row: its leading cells, the metrics of its runs (one per seed), trailing cells."""

    cells: Sequence[str]
    runs: Sequence[Metrics]
    notes: Sequence[str] = ()


@dataclass(frozen=True)
class TableStyle:
    """How a table treats a lone run and a metric that some or all runs of a group lack."""

    partial: str | None = "n/a"  # a cell some runs lack; None: the mean of those that have it
    empty: str = "n/a"  # a cell no run of the group has
    lone_sd: bool = False  # a single run shows "x ± 0" (True) or "x" (False)
    drop_empty_columns: bool = True  # leave out a column no run of any group has


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0.0 for one value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def spread(values: Sequence[float], fmt: str, sd_fmt: str | None = None,
           lone_sd: bool = False) -> str:
    """``mean ± sd`` over seeds, or the one value (unless ``lone_sd``)."""
    if len(values) == 1 and not lone_sd:
        return fmt.format(values[0])
    mean, sd = mean_sd(values)
    return f"{fmt.format(mean)} ± {(sd_fmt or fmt).format(sd)}"


def _cell(runs: Sequence[Metrics], column: Column, style: TableStyle) -> str:
    values = [float(m[column.key]) for m in runs if column.key in m]
    if not values:
        return style.empty
    if len(values) < len(runs) and style.partial is not None:
        return style.partial  # a mean of fewer seeds than the row claims would mislead
    if not column.with_sd:
        return column.fmt.format(mean_sd(values)[0])
    return spread(values, column.fmt, column.sd_fmt, style.lone_sd)


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def mean_sd_table(heads: Sequence[str], groups: Sequence[Group],
                  columns: Sequence[Column | tuple], notes: Sequence[str] = (),
                  style: TableStyle = TableStyle()) -> str:
    """The markdown table: ``heads`` over the groups' leading cells, one column per metric,
    ``notes`` over their trailing cells."""
    shown = [Column(*c) for c in columns]
    if style.drop_empty_columns:
        shown = [c for c in shown if any(c.key in m for g in groups for m in g.runs)]
    width = len(heads) + len(shown) + len(notes)
    lines = [_line([*heads, *(c.header for c in shown), *notes]), "|" + "---|" * width]
    for group in groups:
        cells = [_cell(group.runs, c, style) for c in shown]
        lines.append(_line([*group.cells, *cells, *group.notes]))
    return "\n".join(lines)
