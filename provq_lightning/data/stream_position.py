"""Where a training data stream stands, saved in the checkpoint so a resumed run continues it.

The parts of the stream-position protocol, which ``ResumableDataModule``
(``provq_lightning.data.resumable``) keeps for a datamodule. The design: the training
``DataLoader`` is *stateful* in Lightning's sense (``state_dict`` / ``load_state_dict``), so
Lightning stores its state in the checkpoint (``loops.fit_loop.state_dict.combined_loader``)
and hands it back before the first batch of a resumed run; it then also stops warning that the
loader is not resumable.

What is saved is a ``StreamPosition``: the epoch and, for every rank and every "slot" (a loader
worker for the shard stream, the single index stream for map-style datasets), how many batches
the training loop has taken. Batches are counted when Lightning hands one to a training step
(the datamodule's ``on_before_batch_transfer`` calls ``consumed`` through
``ResumableDataModule.note_training_batch``), not when the loader yields it, so a batch a loader
worker prefetched but no step used is not counted. Checkpoints are written at step boundaries
(``on_train_batch_end``), where the count is exact. The slot counts are gathered from every rank
when the state is saved, so under DDP each rank resumes from its own position. A finished epoch
is saved as the start of the next one.

On resume the first epoch the loader starts is the saved one, and each slot first skips what it
had already delivered (``skip`` per slot): a map-style sampler just drops those indices; the
shard stream replays its reading without decoding (see
``provq_lightning.datamodules.imagenet``). The order of an uninterrupted run does not change: the
position only tells where to start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

log = logging.getLogger("provq.data")
STATE_VERSION = 1
# (epoch, rank, world_size) of the run that iterates the loader now.
Context = Callable[[], tuple[int, int, int]]


@dataclass(frozen=True)
class SlotStart:
    """Where one slot starts an epoch: batches to skip, and the samples (shard, key) it already
    found corrupt in them (known without decoding them again)."""

    skip: int = 0
    bad: frozenset[tuple[str, str]] = frozenset()


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank (just ``[obj]`` outside a multi-process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


class StreamPosition:
    """The epoch and per-slot batch counts of this rank's training stream (see module doc)."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batches: list[int] = [0]
        self.bad: list[set[tuple[str, str]]] = [set()]
        self.layout: dict[str, int] = {}
        self._pending: dict[str, Any] | None = None

    def begin(self, epoch: int, rank: int, layout: dict[str, int]) -> tuple[int, list[SlotStart]]:
        """An epoch starts: the epoch to plan and where each of ``layout['slots']`` starts.

        After ``load_state_dict`` the saved epoch wins over ``epoch`` (Lightning creates the
        first iterator before it advances its own counter past a finished epoch).
        """
        slots = layout["slots"]
        starts = [SlotStart() for _ in range(slots)]
        pending, self._pending = self._pending, None
        if pending is not None:
            epoch = int(pending["epoch"])
            if pending["layout"] != layout:
                log.warning(
                    "resuming epoch %d from its first batch: the checkpoint's data stream was "
                    "saved with %s, this run has %s (resume with the same settings to continue "
                    "mid-epoch)",
                    epoch,
                    pending["layout"],
                    layout,
                )
            else:
                mine = pending["ranks"][rank]
                starts = [
                    SlotStart(int(n), frozenset((s, k) for s, k in bad))
                    for n, bad in zip(mine["batches"], mine["bad"], strict=True)
                ]
        self.epoch, self.layout = epoch, dict(layout)
        self.batches = [s.skip for s in starts]
        self.bad = [set(s.bad) for s in starts]
        return epoch, starts

    def consumed(self, slot: int = 0, bad: Iterable[tuple[str, str]] = ()) -> None:
        """A training step took a batch of ``slot``; ``bad``: corrupt samples it skipped."""
        if slot >= len(self.batches):  # a batch before any begin(): e.g. a bare DataLoader
            return
        self.batches[slot] += 1
        self.bad[slot].update(bad)

    def state_dict(self, epoch_length: int) -> dict[str, Any]:
        """The position of every rank (a collective under DDP: call it on all ranks).

        ``epoch_length``: batches per epoch on this rank; a finished epoch is saved as the
        start of the next one.
        """
        if not self.layout:  # never started: keep what was loaded, or the very beginning
            return (
                dict(self._pending)
                if self._pending is not None
                else {"version": STATE_VERSION, "epoch": self.epoch, "layout": {}, "ranks": []}
            )
        mine = {"batches": list(self.batches), "bad": [sorted(map(list, b)) for b in self.bad]}
        ranks = gather_objects(mine)
        epoch = self.epoch
        if epoch_length > 0 and sum(self.batches) >= epoch_length:
            epoch += 1
            empty = {"batches": [0] * len(self.batches), "bad": [[] for _ in self.batches]}
            ranks = [empty for _ in ranks]
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "layout": dict(self.layout),
            "ranks": ranks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or not state.get("layout"):
            return  # nothing usable: the epoch starts from its beginning, as before
        self._pending = dict(state)


class ResumableLoader(DataLoader):
    """A training DataLoader whose position is saved in checkpoints (Lightning ``_Stateful``).

    ``context`` gives (epoch, rank, world_size) when an epoch starts; subclasses apply the
    epoch and the per-slot starts in ``start_epoch`` before the iterator (and workers) exist.
    """

    def __init__(
        self, *args: Any, context: Context, position: StreamPosition, slots: int = 1, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.context = context
        self.position = position
        self.slots = slots

    def layout(self, world_size: int) -> dict[str, int]:
        """What must match for a saved position to be meaningful in this run."""
        return {
            "world_size": world_size,
            "batch_size": int(self.batch_size or 0),
            "slots": self.slots,
        }

    def start_epoch(self, epoch: int, rank: int, world_size: int, starts: list[SlotStart]) -> None:
        """Position the sampler or dataset at ``starts`` (one per slot) of ``epoch``."""
        raise NotImplementedError(f"{type(self).__name__} must say how it starts an epoch part-way")

    def __iter__(self) -> Iterator:
        epoch, rank, world_size = self.context()
        epoch, starts = self.position.begin(epoch, rank, self.layout(world_size))
        self.start_epoch(epoch, rank, world_size, starts)
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        return self.position.state_dict(len(self))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position.load_state_dict(state_dict)


class EpochSampler(DistributedSampler):
    """``DistributedSampler``'s order (a ``seed + epoch`` permutation, ranks interleaved), able to
    start part-way. A ``DistributedSampler`` subclass, so Lightning does not replace it under
    DDP. The epoch is set by ``SamplerLoader`` when iteration starts; Lightning's later
    ``set_epoch`` call is ignored (it may lag behind after a resume).

    Yields ``(index, item_seed)``: a dataset that crops at random seeds its crop with
    ``item_seed``, so a resumed run draws the same crops as the uninterrupted one.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        num_replicas: int,
        rank: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        pass  # see the class docstring

    def begin(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003
        indices = list(super().__iter__())
        for index in indices[self.start :]:
            yield index, base + index


class SamplerLoader(ResumableLoader):
    """The resumable loader of a map-style dataset read through an ``EpochSampler``: skipping
    is dropping the first ``skip * batch_size`` indices (nothing is loaded for them)."""

    def start_epoch(self, epoch: int, rank: int, world_size: int, starts: list[SlotStart]) -> None:
        self.sampler.begin(epoch, starts[0].skip * int(self.batch_size or 1))


def global_seed() -> int:
    """The seed ``seed_everything`` set (what Lightning's own ``DistributedSampler`` uses)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


__all__ = [
    "EpochSampler",
    "ResumableLoader",
    "SamplerLoader",
    "SlotStart",
    "StreamPosition",
    "gather_objects",
    "global_seed",
]
