"""How the figures of the validation crops carry over: the same runs scored on chains they never
saw (``provq-fit test --data.init_args.test_on_holdout true``: the held-out share of
``train_sources``) and on whole validation chains (``provq-fit validate
--data.init_args.crop_length null``).

Reads, per run directory, its ``metrics.json`` (validation crops) and the newest
``eval/test-*/metrics.json`` and ``eval/validate-*/metrics.json`` those commands wrote; the floor
command writes the same files with ``--split holdout`` / ``--whole-chains``.

    python -m provq_lightning.protein.eval_report ProVQ=runs/x/seed_0,runs/x/seed_1 \
        --markdown table.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from provq_lightning.errors import ProvqError
from provq_lightning.reporting.mean_sd_table import spread
from provq_lightning.reporting.run_report import parse_runs, read_metrics, write_text

PROG = "python -m provq_lightning.protein.eval_report"
MAKE = "make protein-transfer"


def newest_eval(run_dir: Path, subcommand: str) -> dict[str, float]:
    """``metrics.json`` of the newest ``<run>/eval/<subcommand>-*`` folder."""
    found = sorted((run_dir / "eval").glob(f"{subcommand}-*/metrics.json"),
                   key=lambda p: p.parent.name)
    if not found:
        raise ProvqError(f"no {run_dir}/eval/{subcommand}-*/metrics.json; run {MAKE} (it "
                         f"evaluates each run with provq-fit {subcommand}) first")
    return json.loads(found[-1].read_text())


ROWS = (
    ("validation crops", None, "val"),
    ("held-out chains (never trained on)", "test", "test"),
    ("whole validation chains", "validate", "val"),
)


def run_rows(run_dir: Path) -> list[dict[str, float]]:
    """lDDT, TM-score, RMSD and chain count of a run on each row's set."""
    rows = []
    for _, sub, prefix in ROWS:
        m = read_metrics(run_dir) if sub is None else newest_eval(run_dir, sub)
        rows.append({k: float(m[f"{prefix}/{k}"]) for k in ("lddt", "tm_score", "rmsd")})
    return rows


def table(runs: dict[str, list[Path]]) -> str:
    lines = ["| run | set | CA lDDT | TM-score | backbone RMSD (A) | lDDT - validation |",
             "|---|---|---|---|---|---|"]
    for name, dirs in runs.items():
        per_run = [run_rows(d) for d in dirs]
        label = name if len(dirs) == 1 else f"{name} ({len(dirs)} seeds)"
        for i, (set_name, _, _) in enumerate(ROWS):
            cells = [spread([r[i][k] for r in per_run], fmt)
                     for k, fmt in (("lddt", "{:.3f}"), ("tm_score", "{:.3f}"),
                                    ("rmsd", "{:.2f}"))]
            delta = [r[i]["lddt"] - r[0]["lddt"] for r in per_run]
            gap = "" if i == 0 else f"{statistics.mean(delta):+.3f}"
            lines.append(f"| {label} | {set_name} | " + " | ".join(cells) + f" | {gap} |")
    return "\n".join(lines)


def _report(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR[,RUN_DIR...]")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    text = table(parse_runs(args.runs, made_by="make protein-sample"))
    print(text)
    if args.markdown is not None:
        write_text(text, args.markdown)


def main(argv: list[str] | None = None) -> None:
    from provq_lightning.reporting.run_report import run_cli

    run_cli(PROG, _report, argv)


if __name__ == "__main__":
    main()
