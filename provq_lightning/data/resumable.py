"""``ResumableDataModule``: the base of a datamodule whose training stream resumes mid-epoch.

The stream-position protocol (its parts are in ``provq_lightning.data.stream_position``):

1. Position: the datamodule holds one ``StreamPosition`` of its training stream,
   ``self.position`` (the epoch, and per rank and slot the batches taken).
2. Loader: ``train_dataloader`` returns a ``ResumableLoader`` over that position, so Lightning
   saves the position in the checkpoint (the loader is stateful) and hands it back before a
   resumed run's first batch. A map-style dataset takes ``self.sampler_loader(dataset, ...)``
   (an ``EpochSampler`` split by rank, skipping is dropping indices); a stream brings its own
   ``ResumableLoader`` subclass, given ``position=self.position`` and
   ``context=self.stream_context`` (the shard stream: one slot per loader worker).
3. Counting: a batch counts when a training step takes it, not when the loader yields it:
   ``on_before_batch_transfer`` calls ``self.note_training_batch()``. A datamodule whose batches
   carry their slot, or the corrupt samples skipped in them, overrides the hook and passes them.

A resumed run then trains every later step on the batches (and random crops) the uninterrupted
run would have used: ``tests/image/test_stream_resume.py``, ``tests/protein/test_stream_resume.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lightning.pytorch import LightningDataModule

from provq_lightning.data.stream_position import (
    EpochSampler,
    SamplerLoader,
    StreamPosition,
    global_seed,
)


class ResumableDataModule(LightningDataModule):
    """A ``LightningDataModule`` that keeps the stream-position protocol (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.position = StreamPosition()  # of the training stream, saved by its loader

    def stream_context(self) -> tuple[int, int, int]:
        """(epoch, rank, world_size) of the trainer iterating the loaders, or (0, 0, 1)."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0, 1
        return trainer.current_epoch, trainer.global_rank, trainer.world_size

    def sampler_loader(self, dataset: Any, **loader_args: Any) -> SamplerLoader:
        """The resumable training loader of a map-style ``dataset``: an ``EpochSampler`` split by
        rank, seeded like Lightning's own sampler. ``loader_args`` go to the ``DataLoader``
        (batch size, workers, collate)."""
        _, rank, world_size = self.stream_context()
        sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, seed=global_seed())
        return SamplerLoader(
            dataset,
            sampler=sampler,
            context=self.stream_context,
            position=self.position,
            **loader_args,
        )

    def note_training_batch(self, slot: int = 0, bad: Iterable[tuple[str, str]] = ()) -> None:
        """Count a batch of ``slot`` (``bad``: corrupt samples skipped in it) if a training step
        is taking it; evaluation and prediction batches do not move the position."""
        trainer = self.trainer
        if trainer is not None and trainer.training:
            self.position.consumed(slot, bad)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.note_training_batch()
        return batch
