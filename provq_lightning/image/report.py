"""Compare image-tokenizer runs: a table of their final metrics, a recon grid, learning curves.

Each ``NAME=RUN_DIR[,RUN_DIR...]`` is one variant; several run directories (seeds) give the
mean and the spread (sample standard deviation, and the min-max range) of each metric. It reads
each run's ``metrics.json`` (final validation metrics, written by provq-fit) and the wall time
between the first and last event of its TensorBoard file. ``--grid`` loads the first run of each
variant (``checkpoints/last.ckpt``) and writes one PNG: the first ``--images`` validation photos
(centre crops) on the top row, each variant's hard-quantized reconstruction below. ``--curve``
plots validation PSNR and codebook utilization against the step for every run, with the
curriculum's warmup and transition ends marked.

    python -m provq_lightning.image.report ProVQ=runs/x/seed_0,runs/x/seed_1 \
        vanilla=runs/y/seed_0,runs/y/seed_1 --grid grid.png --curve curve.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import yaml
from PIL import Image, ImageDraw

from provq_lightning.codebook_metrics import CODEBOOK_REPORT_COLUMNS

COLUMNS = (
    *CODEBOOK_REPORT_COLUMNS,
    ("val/psnr", "PSNR (dB)", "{:.2f}"),
    ("val/ssim", "SSIM", "{:.3f}"),
    ("val/lpips", "LPIPS", "{:.3f}"),
    ("val/rfid", "rFID", "{:.2f}"),
    ("wall_min", "wall time (min)", "{:.1f}"),
)
LABEL_WIDTH = 72  # pixels left of each grid row for its name


def event_wall_seconds(run_dir: Path) -> float | None:
    """Seconds from the first to the last event of the run's newest TensorBoard file (the
    logger writes its first event before training starts and the last at the final
    validation; an older file in the same folder belongs to an earlier fit)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = list(run_dir.glob("events.out.tfevents.*"))
    if not files:
        return None
    newest = max(files, key=lambda p: p.stat().st_mtime)
    times = [event.wall_time for event in EventFileLoader(str(newest)).Load()]
    return max(times) - min(times) if len(times) > 1 else None


def read_run(run_dir: Path) -> dict[str, float]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: did the provq-fit run in {run_dir} finish?")
    metrics = json.loads(path.read_text())
    seconds = event_wall_seconds(run_dir)
    if seconds is not None:
        metrics["wall_min"] = seconds / 60.0
    return metrics


def spread(values: list[float], fmt: str) -> str:
    """``mean ± sd`` (sample standard deviation) over seeds, or the one value."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def table(runs: dict[str, list[dict[str, float]]]) -> str:
    """One row per variant: final metrics as mean ± sd over its runs (seeds)."""
    every = [m for ms in runs.values() for m in ms]
    columns = [c for c in COLUMNS if any(c[0] in m for m in every)]
    rows = ["| run | steps | " + " | ".join(label for _, label, _ in columns) + " |",
            "|" + "---|" * (len(columns) + 2)]
    for name, ms in runs.items():
        cells = []
        for key, _, fmt in columns:
            values = [float(m[key]) for m in ms if key in m]
            cells.append(spread(values, fmt) if len(values) == len(ms) else "n/a")
        steps = sorted({int(m.get("global_step", 0)) for m in ms})
        label = name if len(ms) == 1 else f"{name} ({len(ms)} seeds)"
        rows.append(f"| {label} | {'/'.join(map(str, steps))} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def per_seed_table(runs: dict[str, list[dict[str, float]]], dirs: dict[str, list[Path]]) -> str:
    """Every run's own PSNR and utilization: the spread behind the mean."""
    rows = ["| run | directory | PSNR (dB) | utilization |", "|---|---|---|---|"]
    for name, ms in runs.items():
        for m, d in zip(ms, dirs[name], strict=True):
            psnr = f"{m['val/psnr']:.2f}" if "val/psnr" in m else "n/a"
            util = f"{m['val/utilization']:.1%}" if "val/utilization" in m else "n/a"
            rows.append(f"| {name} | {d.parent.name}/{d.name} | {psnr} | {util} |")
    return "\n".join(rows)


# -- reconstruction grid --------------------------------------------------------------------
def validation_images(cfg: dict, n: int) -> torch.Tensor:
    """The first ``n`` validation images (uint8, centre crops) of a run's datamodule."""
    from provq_lightning.run_loading import dataloader

    loader, _ = dataloader(cfg, "val")
    images = []
    for batch in loader:
        images.extend(batch["image"])
        if len(images) >= n:
            break
    return torch.stack(images[:n])


def labelled_row(images: torch.Tensor, label: str) -> Image.Image:
    """One grid row: ``label`` in a left margin, then the images side by side, 2 px apart."""
    from provq_lightning.image.transforms import to_uint8_image

    n, _, h, w = images.shape
    row = Image.new("RGB", (LABEL_WIDTH + n * (w + 2), h + 2), "white")
    ImageDraw.Draw(row).text((4, h // 2 - 6), label, fill="black")
    for i, image in enumerate(images):
        row.paste(Image.fromarray(to_uint8_image(image)), (LABEL_WIDTH + i * (w + 2), 1))
    return row


def reconstruction_grid(run_dirs: dict[str, Path], n: int) -> Image.Image:
    """Originals, then one row per variant (its run in ``run_dirs``)."""
    from provq_lightning.image.transforms import to_model_range
    from provq_lightning.run_loading import load_run

    rows, originals = [], None
    for name, run_dir in run_dirs.items():
        model, cfg = load_run(run_dir / "checkpoints" / "last.ckpt", None, None, "cpu")
        if originals is None:  # every run shares the data config; take the photos once
            originals = validation_images(cfg, n)  # uint8, as the model takes them
            rows.append(labelled_row(to_model_range(originals), "original"))
        rows.append(labelled_row(model.reconstruct(originals), name))
    grid = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for i, row in enumerate(rows):
        grid.paste(row, (0, sum(r.height for r in rows[:i])))
    return grid


# -- learning curves --------------------------------------------------------------------------
def scalar_series(run_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a logged scalar, from every TensorBoard file of the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            points.update({e.step: e.value for e in acc.Scalars(tag)})
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def curriculum_boundaries(run_dir: Path) -> tuple[int, int] | None:
    """(warmup end, transition end) from the run's config.yaml, if it has a CurriculumCallback."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    callbacks = (yaml.safe_load(path.read_text()).get("trainer") or {}).get("callbacks") or []
    for cb in callbacks:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("CurriculumCallback"):
            args = cb.get("init_args") or {}
            warmup = int(args.get("warmup_steps", 0))
            return warmup, warmup + int(args.get("transition_steps", 0))
    return None


def learning_curves(run_dirs: dict[str, list[Path]], path: Path) -> None:
    """Validation PSNR and utilization against the step, one line per run, one colour per
    variant; dotted lines mark the end of warmup and of the transition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    marked = False
    for colour, (name, dirs) in zip(plt.cm.tab10.colors, run_dirs.items(), strict=False):
        for i, run_dir in enumerate(dirs):
            panels = (("val/psnr", 1.0), ("val/utilization", 100.0))
            for ax, (tag, scale) in zip(axes, panels, strict=True):
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
    axes[0].set(xlabel="step", ylabel="validation PSNR (dB)")
    axes[1].set(xlabel="step", ylabel="codebook utilization (%)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m provq_lightning.image.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+",
                        help="NAME=RUN_DIR[,RUN_DIR...] (provq-fit log directories, one per seed)")
    parser.add_argument("--grid", type=Path, help="write the reconstruction grid PNG here")
    parser.add_argument("--images", type=int, default=10, help="photos in the grid")
    parser.add_argument("--curve", type=Path, help="write the learning-curve PNG here")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = parser.parse_args(argv)
    if any("=" not in r for r in args.runs):
        parser.error("runs are given as NAME=RUN_DIR[,RUN_DIR...]")
    run_dirs = {name: [Path(d) for d in dirs.split(",") if d]
                for name, dirs in (r.split("=", 1) for r in args.runs)}
    metrics = {name: [read_run(d) for d in dirs] for name, dirs in run_dirs.items()}
    text = table(metrics) + "\n\n" + per_seed_table(metrics, run_dirs)
    print(text)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    if args.grid is not None:
        torch.set_grad_enabled(False)
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        firsts = {name: dirs[0] for name, dirs in run_dirs.items()}
        reconstruction_grid(firsts, args.images).save(args.grid, optimize=True)
        print(f"wrote {args.grid}")
    if args.curve is not None:
        learning_curves(run_dirs, args.curve)
        print(f"wrote {args.curve}")


if __name__ == "__main__":
    main()
