"""Compare image-tokenizer runs: a table of their final metrics, a recon grid, learning curves.

Each ``NAME=RUN_DIR[,RUN_DIR...]`` is one variant; several run directories (seeds) give the mean
and the spread (sample standard deviation) of each metric;
``provq_lightning.reporting.run_report`` makes the tables and curves. It reads each run's
``metrics.json`` (final validation metrics, written by provq-fit) and the wall time between the
first and last event of its TensorBoard file. ``--grid`` loads the first run of each variant
(``checkpoints/last.ckpt``) and writes one PNG: the first ``--images`` validation photos (centre
crops) on the top row, each variant's hard-quantized reconstruction below. ``--curve`` plots
validation PSNR and codebook utilization against the step for every run, with the curriculum's
warmup and transition ends marked.

    python -m provq_lightning.image.report ProVQ=runs/x/seed_0,runs/x/seed_1 \
        vanilla=runs/y/seed_0,runs/y/seed_1 --grid grid.png --curve curve.png
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from provq_lightning.reporting.run_report import (
    read_metrics,
    report_parser,
    report_runs,
    run_cli,
)
from provq_lightning.vq.codebook_metrics import CODEBOOK_REPORT_COLUMNS

PROG = "python -m provq_lightning.image.report"

COLUMNS = (
    *CODEBOOK_REPORT_COLUMNS,
    ("val/psnr", "PSNR (dB)", "{:.2f}"),
    ("val/ssim", "SSIM", "{:.3f}"),
    ("val/lpips", "LPIPS", "{:.3f}"),
    ("val/rfid", "rFID", "{:.2f}"),
    ("wall_min", "wall time (min)", "{:.1f}"),
)
PER_RUN = (("val/psnr", "PSNR (dB)", "{:.2f}"), ("val/utilization", "utilization", "{:.1%}"))
PANELS = (("val/psnr", 1.0, "validation PSNR (dB)"),
          ("val/utilization", 100.0, "codebook utilization (%)"))
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
    """The run's final metrics, plus ``wall_min`` from its TensorBoard events."""
    metrics = read_metrics(run_dir)
    seconds = event_wall_seconds(run_dir)
    if seconds is not None:
        metrics["wall_min"] = seconds / 60.0
    return metrics


# -- reconstruction grid --------------------------------------------------------------------
def validation_images(cfg: dict, n: int) -> torch.Tensor:
    """The first ``n`` validation images (uint8, centre crops) of a run's datamodule."""
    from provq_lightning.runs.loading import dataloader

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
    from provq_lightning.runs.loading import load_run

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


def _report(argv: list[str] | None) -> None:
    parser = report_parser(PROG, __doc__)
    parser.add_argument("--grid", type=Path, help="write the reconstruction grid PNG here")
    parser.add_argument("--images", type=int, default=10, help="photos in the grid")
    args = parser.parse_args(argv)
    run_dirs = report_runs(args, read_run, COLUMNS, PER_RUN, PANELS)
    if args.grid is not None:
        torch.set_grad_enabled(False)
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        firsts = {name: dirs[0] for name, dirs in run_dirs.items()}
        reconstruction_grid(firsts, args.images).save(args.grid, optimize=True)
        print(f"wrote {args.grid}")


def main(argv: list[str] | None = None) -> None:
    run_cli(PROG, _report, argv)


if __name__ == "__main__":
    main()
