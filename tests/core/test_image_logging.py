"""Pictures reach every logger: TensorBoard natively, W&B / MLflow through their image APIs, and
loggers without one (CSVLogger) as PNG files under ``<run>/images/<tag>/<step>.png``."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger
from PIL import Image

from provq_lightning.reporting.figures import log_figure, log_histogram, to_pixels
from provq_lightning.reporting.plots import embedding_figure
from tests.helpers import effective_config

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY = 20, 10


class ImageApiLogger(Logger):
    """A logger with W&B's ``log_image(key, images, step)``, recording its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, np.ndarray, int]] = []

    name = "wandb_like"
    version = 0

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_image(self, key: str, images: list, step: int | None = None) -> None:
        self.images.extend((key, image, step) for image in images)


class FakeMlflowClient:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def log_image(self, run_id, image, artifact_file=None, key=None, step=None) -> None:
        self.calls.append(dict(run_id=run_id, image=image, key=key, step=step))


class OfflineMlflow(MLFlowLogger):
    """An ``MLFlowLogger`` without mlflow installed: only what picture logging touches."""

    def __init__(self) -> None:  # MLFlowLogger's own needs the mlflow package
        self.client = FakeMlflowClient()

    @property
    def experiment(self):
        return self.client

    @property
    def run_id(self) -> str:
        return "run-1"


def fake_module(loggers: list, log_dir: Path, rank_zero: bool = True, sanity: bool = False):
    trainer = SimpleNamespace(loggers=loggers, is_global_zero=rank_zero, sanity_checking=sanity,
                              log_dir=str(log_dir))
    return SimpleNamespace(_trainer=trainer, trainer=trainer, global_step=3)


def test_each_logger_kind_gets_the_picture_through_its_own_api(tmp_path):
    grid = torch.rand(3, 10, 14)  # make_grid's layout: channel-first floats in [0, 1]
    wandb_like, mlflow = ImageApiLogger(), OfflineMlflow()
    csv = CSVLogger(tmp_path, name="csv", version="v")
    log_figure(fake_module([wandb_like, mlflow, csv], tmp_path), "val/grid", grid, step=7)

    expected = to_pixels(grid)
    assert expected.shape == (10, 14, 3) and expected.dtype == np.uint8
    ((key, image, step),) = wandb_like.images
    assert (key, step) == ("val/grid", 7) and np.array_equal(image, expected)
    (call,) = mlflow.client.calls
    assert (call["run_id"], call["key"], call["step"]) == ("run-1", "val/grid", 7)
    png = Path(csv.log_dir) / "images" / "val" / "grid" / "7.png"
    assert np.array_equal(np.asarray(Image.open(png)), expected)  # lossless, pixel for pixel


def test_nothing_is_logged_off_rank_zero_or_in_the_sanity_check(tmp_path):
    for module in (fake_module([CSVLogger(tmp_path / "a")], tmp_path, rank_zero=False),
                   fake_module([CSVLogger(tmp_path / "b")], tmp_path, sanity=True)):
        fig = embedding_figure(torch.randn(5, 2), torch.zeros(5).long(), torch.randn(3, 2))
        log_figure(module, "val/embeddings", fig)
        log_histogram(module, "val/code_usage", torch.arange(4.0))
    assert not list(tmp_path.rglob("*.png"))


@pytest.fixture(scope="module")
def two_logger_run(tmp_path_factory) -> tuple[Path, Path]:
    """A 20-step TopoDisc ProVQ fit logging to TensorBoard and CSV at once; their run dirs."""
    from provq_lightning.tools.fit import main

    out = tmp_path_factory.mktemp("loggers")
    cfg = effective_config(REPO / "experiments" / "topodisc_provq.yaml")
    cfg["trainer"].update(max_steps=STEPS, val_check_interval=EVERY, enable_progress_bar=False,
                          enable_model_summary=False)
    cfg["trainer"]["logger"] = [
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
         "init_args": {"save_dir": str(out), "name": "tb", "version": "v"}},
        {"class_path": "lightning.pytorch.loggers.CSVLogger",
         "init_args": {"save_dir": str(out), "name": "csv", "version": "v"}},
    ]
    cfg["curriculum"].update(
        warmup_steps=5, transition_steps=5, kmeans_collect_batches=2)
    cfg["model"]["init_args"].update(num_codes=16, figure_every_n_steps=EVERY)
    cfg["data"]["init_args"].update(steps_per_epoch=EVERY)
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    argv = sys.argv
    try:
        main(["--config", str(config)])
    finally:
        sys.argv = argv
    return out / "tb" / "v", out / "csv" / "v"


def test_csv_logger_gets_figures_and_histograms_as_png_files(two_logger_run):
    _, csv_run = two_logger_run
    for tag in ("val/embeddings", "val/code_usage"):
        pngs = sorted((csv_run / "images" / tag).glob("*.png"))
        assert [p.name for p in pngs] == ["10.png", "20.png"], tag
        for png in pngs:
            image = Image.open(png)
            assert image.format == "PNG" and image.width > 200 and image.height > 150


def test_tensorboard_still_gets_images_and_histograms_natively(two_logger_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_run, _ = two_logger_run
    events = EventAccumulator(str(tb_run), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    assert [im.step for im in events.Images("val/embeddings")] == [EVERY, STEPS]
    assert events.Images("val/embeddings")[0].encoded_image_string[:4] == b"\x89PNG"
    usage = events.Histograms("val/code_usage")
    assert [h.step for h in usage] == [EVERY, STEPS]
    assert usage[-1].histogram_value.num == 16  # one share of the uses per code
    assert not (tb_run / "images").exists()  # TensorBoard needs no PNG copies
