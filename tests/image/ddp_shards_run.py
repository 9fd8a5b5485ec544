"""Launched by test_ddp.py: one epoch of a tiny ImageTokenizer on shards, 2 gloo processes.

Each rank appends the keys of every training batch it receives to ``<out>/keys_rank<r>.txt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from provq_lightning.datamodules.imagenet import ImageNetDataModule
from provq_lightning.image.tokenizer import ImageTokenizer
from tests.image.helpers import TINY


class RecordKeys(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with (self.out / f"keys_rank{trainer.global_rank}.txt").open("a") as fh:
            fh.write("\n".join(batch["key"]) + "\n")


def main(index: str, out: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = ImageTokenizer(**{**TINY, "disc_start": 10})
    data = ImageNetDataModule(index, image_size=32, batch_size=16, num_workers=1,
                              shuffle_buffer=50)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(process_group_backend="gloo", find_unused_parameters=True),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RecordKeys(Path(out))],
    )
    trainer.fit(model, data)


if __name__ == "__main__":
    main(*sys.argv[1:3])
