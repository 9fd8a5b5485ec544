"""Pictures for every logger: TensorBoard, W&B, MLflow, or PNG files in the run directory.

``log_figure`` takes a matplotlib figure or an image (a channel-first float tensor/array in
[0, 1], as ``torchvision.utils.make_grid`` returns, or a channel-last uint8 array) and hands it
to each of the trainer's loggers through that logger's own image API. A logger without one
(``CSVLogger``, most custom loggers) gets a PNG at ``<its log_dir>/images/<tag>/<step>.png``,
so no picture is silently dropped. ``log_histogram`` does the same for per-bin counts: a native
histogram where the logger has one (TensorBoard), a bar chart picture everywhere else.

Only global rank 0 logs, and nothing is logged during Lightning's sanity check (its step would
collide with the first real validation's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import Logger, MLFlowLogger
from matplotlib.figure import Figure
from PIL import Image

from provq_lightning.reporting.plots import close_figure, counts_figure, figure_pixels


def _active(module: LightningModule) -> bool:
    trainer = module._trainer  # the public property raises when there is no trainer
    return (
        trainer is not None
        and trainer.is_global_zero
        and not trainer.sanity_checking
        and len(trainer.loggers) > 0
    )


def to_pixels(picture: Figure | torch.Tensor | np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 array of a figure or image (see the module docstring)."""
    if isinstance(picture, Figure):
        return figure_pixels(picture)
    array = picture.detach().cpu().float().numpy() if torch.is_tensor(picture) else picture
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"an image must be (C, H, W) or (H, W, C); got shape {array.shape}")
    if array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # channel-first (torch's layout) to channel-last
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def run_dir_of(logger: Logger, module: LightningModule) -> Path:
    """Where a logger keeps its files: its ``log_dir``, else the trainer's."""
    log_dir = getattr(logger, "log_dir", None) or module.trainer.log_dir or "."
    return Path(log_dir)


def png_path(logger: Logger, module: LightningModule, tag: str, step: int) -> Path:
    return run_dir_of(logger, module) / "images" / tag / f"{step}.png"


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _log_pixels(logger: Logger, module: LightningModule, tag: str, pixels: np.ndarray,
                step: int) -> None:
    experiment = getattr(logger, "experiment", None)
    if callable(getattr(experiment, "add_image", None)):  # TensorBoard's SummaryWriter
        experiment.add_image(tag, pixels, step, dataformats="HWC")
    elif isinstance(logger, MLFlowLogger):
        try:  # MLflow >= 2.12 keeps images per key and step
            experiment.log_image(logger.run_id, pixels, key=tag, step=step)
        except TypeError:  # older MLflow: one artifact file per picture
            experiment.log_image(logger.run_id, pixels, f"images/{tag}/{step}.png")
    elif callable(getattr(logger, "log_image", None)):  # WandbLogger (and look-alikes)
        logger.log_image(key=tag, images=[pixels], step=step)
    else:
        _write_png(png_path(logger, module, tag, step), pixels)


def log_figure(
    module: LightningModule,
    tag: str,
    picture: Figure | torch.Tensor | np.ndarray,
    step: int | None = None,
) -> None:
    """Send a figure or image to every logger of ``module``'s trainer (see module docstring).

    A matplotlib figure is closed afterwards, whether or not anything was logged.
    """
    try:
        if not _active(module):
            return
        step = module.global_step if step is None else int(step)
        pixels = to_pixels(picture)
        for logger in module.trainer.loggers:
            _log_pixels(logger, module, tag, pixels, step)
    finally:
        if isinstance(picture, Figure):
            close_figure(picture)


def log_histogram(
    module: LightningModule, tag: str, counts: torch.Tensor, step: int | None = None,
    ylabel: str = "uses",
) -> None:
    """Per-bin ``counts`` (e.g. uses per code): TensorBoard's histogram, a bar chart (its
    y axis labelled ``ylabel``) elsewhere."""
    if not _active(module):
        return
    step = module.global_step if step is None else int(step)
    counts = counts.detach().float().cpu()
    pixels = None  # the bar chart is drawn once, for the first logger that needs it
    for logger in module.trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if callable(getattr(experiment, "add_histogram", None)):
            experiment.add_histogram(tag, counts, step)
            continue
        if pixels is None:
            figure = counts_figure(counts, title=f"{tag}, step {step}", ylabel=ylabel)
            pixels = figure_pixels(figure)
            close_figure(figure)
        _log_pixels(logger, module, tag, pixels, step)

