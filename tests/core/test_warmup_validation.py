"""Validation inside warmup quantizes hard with a codebook not yet seeded; the loggers get its
scalars as ``val_warmup/<name>`` so their spikes do not flatten the ``val/`` curves, while
callbacks (a checkpoint monitor, metrics.json) still see ``val/<name>`` in every phase."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from provq_lightning.callbacks.curriculum import CurriculumCallback
from provq_lightning.datamodules.topodisc import TopoDiscDataModule
from provq_lightning.topodisc import TopoDiscTokenizer


class CallbackView(pl.Callback):
    """The validation metrics callbacks see, after each validation."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, set[str]]] = []

    def on_validation_end(self, trainer, pl_module):
        self.seen.append((trainer.global_step, set(trainer.callback_metrics)))


def test_loggers_get_warmup_validations_apart_and_callbacks_see_val_throughout(tmp_path):
    pl.seed_everything(0, verbose=False)
    view = CallbackView()
    trainer = pl.Trainer(
        max_steps=20, logger=CSVLogger(tmp_path, name="warm", version="v"),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        check_val_every_n_epoch=1, log_every_n_steps=5, accelerator="cpu",
        callbacks=[
            CurriculumCallback(warmup_steps=10, transition_steps=5, kmeans_samples=64,
                               kmeans_collect_batches=1),
            ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/mse_triangle", save_top_k=1),
            view,
        ],
    )
    trainer.fit(TopoDiscTokenizer(num_codes=8, figure_every_n_steps=0),
                TopoDiscDataModule(steps_per_epoch=5))
    with (tmp_path / "warm" / "v" / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))

    def steps(tag: str) -> list[int]:
        return [int(r["step"]) for r in rows if r.get(tag) not in (None, "")]

    # Validations after steps 5 and 10 are inside warmup, those after 15 and 20 are not.
    for name in ("mse", "mse_triangle", "utilization"):
        assert steps(f"val_warmup/{name}") == [4, 9] and steps(f"val/{name}") == [14, 19], name
    assert min(steps("train/loss")) < 10  # only val/ scalars move: training ones keep their tag
    assert [step for step, _ in view.seen] == [5, 10, 15, 20]
    assert all({"val/mse", "val/mse_triangle"} <= keys for _, keys in view.seen)
    assert not any(key.startswith("val_warmup/") for _, keys in view.seen for key in keys)
    assert trainer.checkpoint_callback.best_model_path  # the monitor found its metric
