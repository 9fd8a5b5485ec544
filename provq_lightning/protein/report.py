"""Markdown table of the structure-tokenizer metrics written by provq-fit runs.

Reads each run's ``metrics.json`` (final validation metrics) and, when the config has the
``FitTimeCallback``, its ``timing.json`` (CPU and wall seconds of the fit).

    python -m provq_lightning.protein.report NAME=RUN_DIR [NAME=RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from provq_lightning.codebook_metrics import CODEBOOK_REPORT_COLUMNS

COLUMNS = (
    *CODEBOOK_REPORT_COLUMNS,
    ("val/rmsd", "backbone RMSD (A)", "{:.2f}"),
    ("val/lddt", "CA lDDT", "{:.3f}"),
    ("cpu_min", "CPU time (min)", "{:.1f}"),
    ("wall_min", "wall time (min)", "{:.1f}"),
)


def read_metrics(run_dir: Path) -> dict[str, float]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: did the provq-fit run in {run_dir} finish?")
    metrics = json.loads(path.read_text())
    timing = run_dir / "timing.json"
    if timing.is_file():
        t = json.loads(timing.read_text())
        metrics.update(cpu_min=t["cpu_s"] / 60.0, wall_min=t["wall_s"] / 60.0)
    return metrics


def table(runs: dict[str, dict[str, float]]) -> str:
    head = "| run | step | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    rule = "|" + "---|" * (len(COLUMNS) + 2)
    rows = [head, rule]
    for name, m in runs.items():
        cells = [fmt.format(m[key]) if key in m else "n/a" for key, _, fmt in COLUMNS]
        rows.append(f"| {name} | {int(m.get('global_step', 0))} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or any("=" not in a for a in args):
        print(__doc__, file=sys.stderr)
        return 2
    runs = {}
    for arg in args:
        name, run_dir = arg.split("=", 1)
        runs[name] = read_metrics(Path(run_dir))
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
