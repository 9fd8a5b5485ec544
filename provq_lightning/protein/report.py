"""Compare structure-tokenizer runs: a table of their final metrics and learning curves.

Each ``NAME=RUN_DIR[,RUN_DIR...]`` is one variant; several run directories (seeds) give the mean
and the spread (sample standard deviation) of each metric;
``provq_lightning.reporting.run_report`` makes the tables and curves. It reads each run's
``metrics.json`` (final validation metrics, written by provq-fit) and, when the config has the
``FitTimeCallback``, its ``timing.json`` (CPU and wall seconds of the fit). ``--curve`` plots
validation CA lDDT and codebook utilization against the step for every run, with the
curriculum's warmup and transition ends marked.

    python -m provq_lightning.protein.report ProVQ=runs/x/seed_0,runs/x/seed_1 \
        vanilla=runs/y/seed_0,runs/y/seed_1 --markdown table.md --curve curve.png
"""

from __future__ import annotations

import json
from pathlib import Path

from provq_lightning.reporting.run_report import (
    read_metrics,
    report_parser,
    report_runs,
    run_cli,
)
from provq_lightning.vq.codebook_metrics import CODEBOOK_REPORT_COLUMNS

PROG = "python -m provq_lightning.protein.report"

COLUMNS = (
    *CODEBOOK_REPORT_COLUMNS,
    ("val/rmsd", "backbone RMSD (A)", "{:.2f}"),
    ("val/lddt", "CA lDDT", "{:.3f}"),
    ("val/tm_score", "TM-score", "{:.3f}"),
    ("cpu_min", "CPU time (min)", "{:.1f}"),
    ("wall_min", "wall time (min)", "{:.1f}"),
)
PER_RUN = (("val/lddt", "CA lDDT", "{:.3f}"), ("val/tm_score", "TM-score", "{:.3f}"),
           ("val/utilization", "utilization", "{:.1%}"))
PANELS = (("val/lddt", 1.0, "validation CA lDDT"),
          ("val/utilization", 100.0, "codebook utilization (%)"))


def read_run(run_dir: Path) -> dict[str, float]:
    """The run's final metrics, plus ``cpu_min`` and ``wall_min`` from its ``timing.json``."""
    metrics = read_metrics(run_dir)
    timing = run_dir / "timing.json"
    if timing.is_file():
        t = json.loads(timing.read_text())
        metrics.update(cpu_min=t["cpu_s"] / 60.0, wall_min=t["wall_s"] / 60.0)
    return metrics


def _report(argv: list[str] | None) -> None:
    args = report_parser(PROG, __doc__).parse_args(argv)
    report_runs(args, read_run, COLUMNS, PER_RUN, PANELS)


def main(argv: list[str] | None = None) -> None:
    run_cli(PROG, _report, argv)


if __name__ == "__main__":
    main()
