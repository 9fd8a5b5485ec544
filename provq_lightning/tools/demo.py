"""``make demo``: TopoDisc, vanilla VQ against ProVQ (and the other variants) over several seeds.

Each (variant, seed) is an ordinary ``provq-fit`` run of ``experiments/topodisc_<variant>.yaml``;
this script only schedules them, reads each run's ``metrics.json`` and prints the comparison
the paper makes: per-component reconstruction error of the hard-quantized model.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

# provq_lightning/tools/demo.py -> the checkout (runs/ is written there; the configs ship in the
# package as provq_lightning/experiments, a link to the checkout's experiments/).
REPO = Path(__file__).resolve().parents[2]
VARIANTS = ("vanilla", "soft", "deferred", "provq")
COLUMNS = ("val/mse_disk", "val/mse_triangle", "val/mse", "val/utilization", "val/perplexity")


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / f"topodisc_{variant}" / f"seed_{seed}"


def fit_command(variant: str, seed: int, out: Path, max_steps: int | None) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "provq_lightning.tools.fit",
        "fit",
        "--config",
        str(REPO / "experiments" / f"topodisc_{variant}.yaml"),
        "--seed_everything",
        str(seed),
        "--data.init_args.seed",
        str(seed),
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--trainer.logger.init_args.version",
        f"seed_{seed}",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]
    if max_steps is not None:
        cmd += ["--trainer.max_steps", str(max_steps)]
    return cmd


def run_one(variant: str, seed: int, out: Path, max_steps: int | None) -> dict[str, float]:
    directory = run_dir(out, variant, seed)
    log = directory.parent / f"seed_{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # One thread per run: the model is tiny and the runs go side by side.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as fh:
        proc = subprocess.run(
            fit_command(variant, seed, out, max_steps),
            cwd=REPO,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} failed (exit {proc.returncode}); see {log}")
    return json.loads((directory / "metrics.json").read_text())


def summarize(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    summary = {}
    for variant, runs in results.items():
        row = {}
        for col in COLUMNS:
            values = [r[col] for r in runs]
            row[col] = statistics.fmean(values)
            row[col + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
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


def markdown_table(summary: dict[str, dict[str, float]], seeds: list[int]) -> str:
    lines = [
        "| variant | MSE disk | MSE triangle | MSE all | utilization | triangle vs vanilla |",
        "|---|---|---|---|---|---|",
    ]
    for variant, row in summary.items():
        imp = row.get("triangle_improvement")
        lines.append(
            f"| {variant} | {row['val/mse_disk']:.4f} ± {row['val/mse_disk_std']:.4f} "
            f"| {row['val/mse_triangle']:.4f} ± {row['val/mse_triangle_std']:.4f} "
            f"| {row['val/mse']:.4f} | {row['val/utilization']:.2f} "
            f"| {improvement_text(variant, imp)} |"
        )
    lines.append(
        f"\nMean ± std over seeds {', '.join(map(str, seeds))}; hard-quantized validation."
    )
    return "\n".join(lines)


def embedding_panel(out: Path, variants: list[str], seed: int, path: Path) -> None:
    """One panel per variant: final encoder embeddings and codebook (the paper's Figure 3)."""
    import matplotlib.pyplot as plt

    from provq_lightning.datamodules.topodisc import make_topodisc
    from provq_lightning.reporting.plots import embedding_figure
    from provq_lightning.runs.checkpoint_check import load_checkpoint
    from provq_lightning.topodisc import TopoDiscTokenizer

    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 4.4))
    axes = [axes] if len(variants) == 1 else list(axes)
    points, labels = make_topodisc(seed=seed + 10_000)
    for ax, variant in zip(axes, variants, strict=True):
        ckpt = run_dir(out, variant, seed) / "checkpoints" / "last.ckpt"
        payload = load_checkpoint(ckpt)  # weights-only, like every file provq reads
        saved = payload["hyper_parameters"]  # LightningCLI adds _class_path and the like
        accepted = inspect.signature(TopoDiscTokenizer.__init__).parameters
        model = TopoDiscTokenizer(**{k: v for k, v in saved.items() if k in accepted})
        model.load_state_dict(payload["state_dict"])
        model.eval()
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
    tasks = [(v, s) for v in args.variants for s in args.seeds]
    results: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    console.print(
        f"[bold]TopoDisc[/]: {len(args.variants)} variants x {len(args.seeds)} seeds -> {out}"
    )
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("provq-fit runs", total=len(tasks))
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(run_one, v, s, out, args.max_steps): (v, s) for v, s in tasks}
            for fut in as_completed(futures):
                variant, seed = futures[fut]
                results[variant].append(fut.result())
                progress.advance(bar)
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
    (out / "summary.md").write_text(markdown_table(summary, args.seeds) + "\n")
    figure = out / "embeddings.png"
    embedding_panel(out, args.variants, args.seeds[0], figure)
    console.print(f"Table: {out / 'summary.md'}   Figure: {figure}")
    console.print(f"TensorBoard: tensorboard --logdir {out}")


if __name__ == "__main__":
    main()
