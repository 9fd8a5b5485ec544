"""Compare image-tokenizer runs: a markdown table of their final metrics and a recon grid.

Reads each run's ``metrics.json`` (final validation metrics, written by provq-fit) and the
wall time between the first and last event of its TensorBoard file; with ``--grid`` it loads
each run's ``checkpoints/last.ckpt`` and writes one PNG: the first ``--images`` validation
photos (centre crops) on the top row, each run's hard-quantized reconstruction below.

    python -m provq_lightning.image.report ProVQ=runs/x/v0 vanilla=runs/y/v0 --grid grid.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
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


def table(runs: dict[str, dict[str, float]]) -> str:
    columns = [c for c in COLUMNS if any(c[0] in m for m in runs.values())]
    rows = ["| run | steps | " + " | ".join(label for _, label, _ in columns) + " |",
            "|" + "---|" * (len(columns) + 2)]
    for name, m in runs.items():
        cells = [fmt.format(m[key]) if key in m else "n/a" for key, _, fmt in columns]
        rows.append(f"| {name} | {int(m.get('global_step', 0))} | " + " | ".join(cells) + " |")
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m provq_lightning.image.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR (a provq-fit log directory)")
    parser.add_argument("--grid", type=Path, help="write the reconstruction grid PNG here")
    parser.add_argument("--images", type=int, default=10, help="photos in the grid")
    args = parser.parse_args(argv)
    if any("=" not in r for r in args.runs):
        parser.error("runs are given as NAME=RUN_DIR")
    run_dirs = {name: Path(d) for name, d in (r.split("=", 1) for r in args.runs)}
    print(table({name: read_run(d) for name, d in run_dirs.items()}))
    if args.grid is not None:
        torch.set_grad_enabled(False)
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        reconstruction_grid(run_dirs, args.images).save(args.grid, optimize=True)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
