"""``make demo``: TopoDisc, vanilla VQ against ProVQ (and the other variants) over several seeds.

The runs are the TopoDisc sweep file, ``experiments/sweeps/topodisc.yaml``, run on this machine
by ``provq-sweep run``'s runner (one ordinary ``provq-fit`` per variant and seed, from scratch,
``--jobs`` at a time); this script picks the seeds and variants, reads each run's
``metrics.json`` and prints the comparison the paper makes: per-component reconstruction error
of the hard-quantized model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from provq_lightning.reporting.mean_sd_table import (
    Column,
    Group,
    TableStyle,
    mean_sd,
    mean_sd_table,
)
from provq_lightning.tools.sweep_local import run_sweep
from provq_lightning.tools.sweep_spec import Sweep, SweepError, load_sweep

# provq_lightning/tools/demo.py -> the checkout (runs/ is written there; the sweep file's config
# paths are relative to it).
REPO = Path(__file__).resolve().parents[2]
SWEEP = Path("experiments") / "sweeps" / "topodisc.yaml"
RUN_DIR = "topodisc_{variant}/seed_{seed}"  # <out>/topodisc_provq/seed_0, as the demo always had
VARIANTS = ("vanilla", "soft", "deferred", "provq")
COLUMNS = ("val/mse_disk", "val/mse_triangle", "val/mse", "val/utilization", "val/perplexity")
TABLE = (
    Column("val/mse_disk", "MSE disk", "{:.4f}"),
    Column("val/mse_triangle", "MSE triangle", "{:.4f}"),
    Column("val/mse", "MSE all", "{:.4f}", with_sd=False),
    Column("val/utilization", "utilization", "{:.2f}", with_sd=False),
)
TABLE_STYLE = TableStyle(lone_sd=True, drop_empty_columns=False)


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / f"topodisc_{variant}" / f"seed_{seed}"


def demo_sweep(variants: list[str], seeds: list[int], max_steps: int | None) -> Sweep:
    """The sweep file's tasks for these variants and seeds (run from the checkout)."""
    overrides = {} if max_steps is None else {"trainer.max_steps": max_steps}
    levels = {"variant": list(variants), "seed": list(seeds)}
    return load_sweep(SWEEP, overrides, levels=levels, run_dir=RUN_DIR)


def summarize(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    summary = {}
    for variant, runs in results.items():
        row = {}
        for col in COLUMNS:
            row[col], row[col + "_std"] = mean_sd([r[col] for r in runs])
        summary[variant] = row
    if "vanilla" in summary:
        base = summary["vanilla"]["val/mse_triangle"]
        for row in summary.values():
            row["triangle_improvement"] = 1.0 - row["val/mse_triangle"] / base
    return summary


def improvement_text(variant: str, improvement: float | None) -> str:
    """Triangle-MSE change against vanilla, as a signed percentage (negative = lower error)."""
    if improvement is None:
        return ""
    return "baseline" if variant == "vanilla" else f"{-100 * improvement:+.1f}%"


def summary_markdown(results: dict[str, list[dict[str, float]]],
                     summary: dict[str, dict[str, float]], seeds: list[int]) -> str:
    """``summary.md``: mean ± sd per variant and the triangle change against vanilla."""
    groups = [
        Group((variant,), runs,
              (improvement_text(variant, summary[variant].get("triangle_improvement")),))
        for variant, runs in results.items()
    ]
    table = mean_sd_table(("variant",), groups, TABLE, ("triangle vs vanilla",), TABLE_STYLE)
    return (f"{table}\n\nMean ± std over seeds {', '.join(map(str, seeds))}; "
            "hard-quantized validation.")


def embedding_panel(out: Path, variants: list[str], seed: int, path: Path) -> None:
    """One panel per variant: final encoder embeddings and codebook (the paper's Figure 3)."""
    import matplotlib.pyplot as plt

    from provq_lightning.datamodules.topodisc import make_topodisc
    from provq_lightning.reporting.plots import embedding_figure
    from provq_lightning.runs.loading import load_run

    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 4.4))
    axes = [axes] if len(variants) == 1 else list(axes)
    points, labels = make_topodisc(seed=seed + 10_000)
    for ax, variant in zip(axes, variants, strict=True):
        ckpt = run_dir(out, variant, seed) / "checkpoints" / "last.ckpt"
        # The model from the run's config.yaml, its weights read weights-only, as every tool.
        model, _ = load_run(ckpt, None, None, "cpu")
        with torch.no_grad():
            latents = model.quantizer.prepare(model.encoder(points))
        tri = json.loads((run_dir(out, variant, seed) / "metrics.json").read_text())
        embedding_figure(
            latents,
            labels,
            model.quantizer.codebook().detach(),
            ax=ax,
            title=f"{variant}: triangle MSE {tri['val/mse_triangle']:.4f}",
        )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--max-steps", type=int, default=None, help="override the configs")
    args = parser.parse_args(argv)
    console = Console()
    out = args.out.resolve()
    os.chdir(REPO)  # the sweep file names its configs relative to the checkout
    try:
        sweep = demo_sweep(args.variants, args.seeds, args.max_steps)
    except SweepError as exc:
        sys.exit(f"demo: {exc}")
    console.print(
        f"[bold]TopoDisc[/]: {len(args.variants)} variants x {len(args.seeds)} seeds -> {out}"
    )
    outcomes = run_sweep(sweep, out, args.jobs, restart=True, console=console)
    failed = [o for o in outcomes if o.exit_code != 0]
    for outcome in failed:
        print(f"demo: {outcome.failure()}", file=sys.stderr)
    if failed:
        sys.exit(1)
    results = {
        v: [json.loads((run_dir(out, v, s) / "metrics.json").read_text()) for s in args.seeds]
        for v in args.variants
    }
    summary = summarize(results)
    table = Table(title="TopoDisc: hard-quantized reconstruction MSE (mean over seeds)")
    columns = ("variant", "MSE disk", "MSE triangle", "MSE all", "utilization", "tri. vs vanilla")
    for col in columns:
        table.add_column(col, justify="right")
    for variant, row in summary.items():
        imp = row.get("triangle_improvement")
        table.add_row(
            variant,
            f"{row['val/mse_disk']:.4f}",
            f"{row['val/mse_triangle']:.4f}",
            f"{row['val/mse']:.4f}",
            f"{row['val/utilization']:.2f}",
            improvement_text(variant, imp),
        )
    console.print(table)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(results, summary, args.seeds) + "\n")
    figure = out / "embeddings.png"
    embedding_panel(out, args.variants, args.seeds[0], figure)
    console.print(f"Table: {out / 'summary.md'}   Figure: {figure}")
    console.print(f"TensorBoard: tensorboard --logdir {out}")


if __name__ == "__main__":
    main()
