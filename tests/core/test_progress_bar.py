"""The progress bar of a provq fit: step out of max_steps, the curriculum phase by name and the
training loss, and neither the logger's ``v_num`` nor Lightning's ``Epoch 1/-2``."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from provq_lightning.callbacks.curriculum import CurriculumCallback
from provq_lightning.callbacks.progress import ProvqProgressBar
from provq_lightning.datamodules.topodisc import TopoDiscDataModule
from provq_lightning.topodisc import TopoDiscTokenizer


class ReadBar(pl.Callback):
    """What the bar shows after each training batch, and its description."""

    def __init__(self, bar: ProvqProgressBar) -> None:
        self.bar, self.shown, self.descriptions = bar, {}, set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.shown[trainer.global_step] = self.bar.get_metrics(trainer, pl_module)
        self.descriptions.add(self.bar._get_train_description(trainer.current_epoch))


def test_bar_shows_step_phase_and_loss_without_v_num(tmp_path):
    pl.seed_everything(0, verbose=False)
    bar = ProvqProgressBar()
    reader = ReadBar(bar)
    trainer = pl.Trainer(
        max_steps=12, max_epochs=-1, logger=TensorBoardLogger(tmp_path, name="bar"),
        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1,
        num_sanity_val_steps=0, check_val_every_n_epoch=10**6, accelerator="cpu",
        callbacks=[CurriculumCallback(warmup_steps=4, transition_steps=4, kmeans_samples=64,
                                      kmeans_collect_batches=1), bar, reader],
    )
    trainer.fit(TopoDiscTokenizer(num_codes=8), TopoDiscDataModule(steps_per_epoch=5))
    shown = reader.shown
    assert [shown[s]["step"] for s in (1, 12)] == ["1/12", "12/12"]
    assert [shown[s]["phase"] for s in (4, 5, 8, 9, 12)] == [
        "warmup", "transition", "transition", "hard", "hard"]
    assert all(isinstance(items["loss"], float) for items in shown.values())
    assert all("v_num" not in items for items in shown.values())
    assert all(d.strip() in ("Epoch 0", "Epoch 1", "Epoch 2") for d in reader.descriptions)
