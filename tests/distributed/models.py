"""TopoDisc model and data variants for the DDP tests, loadable by ``provq-fit`` configs."""

from __future__ import annotations

import torch.distributed as dist
from torch.utils.data import DataLoader

from provq_lightning.datamodules.topodisc import DISK, TRIANGLE, FullBatch, TopoDiscDataModule
from provq_lightning.topodisc import TopoDiscTokenizer


class EagerMetricsTopoDisc(TopoDiscTokenizer):
    """``TopoDiscTokenizer`` that checks its metrics were built without a process group.

    ``provq-fit`` builds the model before the Trainer creates the process group, so anything
    this constructor decides about cross-rank syncing (``VQTokenizer.__init__`` builds the
    codebook-usage metric) is decided without one; the test means something only then.
    """

    def __init__(self, num_codes: int = 32, lr: float = 1e-3, figure_every_n_steps: int = 0):
        super().__init__(num_codes=num_codes, lr=lr, figure_every_n_steps=figure_every_n_steps)
        self.built_without_process_group = not (dist.is_available() and dist.is_initialized())

    def on_fit_start(self) -> None:
        # The test means something only if the group came after the metric.
        world = self.trainer.world_size
        if world > 1 and not (self.built_without_process_group and dist.is_initialized()):
            raise RuntimeError("expected the model built before the process group existed")


class RankSplitTopoDisc(TopoDiscDataModule):
    """Full-batch TopoDisc whose training data is split by component across 2 ranks.

    Rank 0 trains on the disk only and rank 1 on the triangle only, so every training vector
    is seen by exactly one rank. Validation is the usual set.
    """

    def train_dataloader(self) -> DataLoader:
        x, labels = self.train_set.tensors
        trainer = self.trainer
        if trainer is not None and trainer.world_size == 2:
            keep = labels == (DISK if trainer.global_rank == 0 else TRIANGLE)
            x, labels = x[keep], labels[keep]
        full = FullBatch((x, labels), self.steps_per_epoch)
        return DataLoader(full, batch_size=None, shuffle=False)
