"""ImageNet (or any image set) streamed from webdataset shards, DDP- and worker-aware.

Each epoch every rank yields exactly ``total // (world_size * batch_size)`` full batches, read
from disjoint ranges of one epoch-shuffled global order (see ``provq_lightning.image.shards``):
no sample is read twice per epoch, and uneven shards cannot make one rank stop early and hang
the others. A corrupt sample (truncated JPEG, non-image member, unreadable tar tail) is skipped,
counted and logged with its shard and key; its rank then tops its last batch up with samples it
already decoded this epoch, so the batch count stays fixed. A shard that ends early is logged
with the number of planned samples lost, and they count as skipped.

Resuming mid-epoch: the training loader is resumable (a ``ResumableDataModule``,
``provq_lightning.data.resumable``): the checkpoint holds the epoch and, per rank and loader
worker, the batches the training steps took and the corrupt samples met in them. On resume each
worker replays its stream without decoding: it reads the tar bytes of the samples it had
delivered, draws their crop randomness (so the shuffle buffer and the crops continue exactly as
in the uninterrupted run) and keeps the ones still in the shuffle buffer undecoded until they
are used. Decoding, the expensive part, is done only for samples that reach a batch.

Batches are dicts: ``image`` (B, 3, H, W) uint8 (the model maps it to [-1, 1] on its device),
``label`` (B,) and ``key`` (list of str).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from provq_lightning.data.paths import experiments_parent, resolve_data_path
from provq_lightning.data.resumable import ResumableDataModule
from provq_lightning.data.stream_position import ResumableLoader, SlotStart
from provq_lightning.errors import ProvqError
from provq_lightning.image import shards as sh
from provq_lightning.image.transforms import (
    UndecodableImage,
    center_crop,
    decode_image,
    random_crop,
    to_uint8_tensor,
)

log = logging.getLogger("provq.data")
REST_OF_SHARD = "<rest of shard>"
# rng.random() calls random_crop makes per image (scale, left, top, flip): a sample skipped on
# resume draws them without being decoded. tests/image/test_stream_resume.py checks the count.
CROP_DRAWS = 4


def resolve_path(path: str | Path) -> Path:
    """Config paths: ``../shared/data/...`` honours ``PROVQ_SHARED_DATA``; relative paths are
    taken from the working directory when they exist there, else from the folder holding the
    shipped ``experiments/`` (whose class lists the shipped configs name)."""
    return resolve_data_path(path, root=experiments_parent())


def read_class_list(path: str | Path) -> frozenset[str]:
    """wnids from a text file, one per line (``#`` comments and blank lines ignored)."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class list {path} not found (one wnid per line)")
    wnids = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    wnids = [w for w in wnids if w]
    if not wnids:
        raise ValueError(f"class list {path} names no classes")
    return frozenset(wnids)


def shard_infos(
    shards: str | list[str], samples_per_shard: int | None = None
) -> list[sh.ShardInfo]:
    """Shard list from an ``index.json`` path or from URL patterns (with a per-shard count)."""
    if isinstance(shards, str) and shards.endswith(".json"):
        return sh.read_index(resolve_path(shards))
    folder = resolve_path(shards) if isinstance(shards, str) and "{" not in shards else None
    if folder is not None and folder.is_dir():
        if (folder / sh.INDEX_NAME).is_file():  # the folder provq-make-shards wrote
            return sh.read_index(folder / sh.INDEX_NAME)
        raise ProvqError(
            f"shard folder {folder} has no {sh.INDEX_NAME}; write the shards with "
            f"`provq-make-shards <images> {folder}`, or give the shard URLs with "
            "data.init_args.samples_per_shard"
        )
    if samples_per_shard is None:
        raise ProvqError(
            f"shards {shards!r} are URLs without an index.json: give "
            "data.init_args.samples_per_shard (the sample count of every shard) or point "
            "shards at the index.json provq-make-shards wrote"
        )
    urls = []
    for url in sh.expand_urls(shards):
        local = "://" not in url and not url.startswith("pipe:")
        urls.append(str(resolve_path(url)) if local else url)
    return [sh.ShardInfo(url, samples_per_shard) for url in urls]


@dataclass
class Undecoded:
    """A sample read while replaying a resumed stream: its crop draws are taken (the RNG stays
    in step with the uninterrupted run), its image is decoded only if a batch uses it."""

    sample: sh.RawSample
    draws: list[float]


class _Playback(random.Random):
    """Gives back recorded ``random()`` values: applies a crop drawn earlier."""

    def __init__(self, values: list[float]) -> None:
        super().__init__(0)
        self._values = iter(values)

    def random(self) -> float:
        return next(self._values)


class _Replay:
    """Whether the stream is still replaying batches delivered before the resume."""

    def __init__(self, start: SlotStart) -> None:
        self.active = start.skip > 0
        self.bad = start.bad


class ShardImageDataset(IterableDataset):
    """Yields whole uint8 batches; see the module docstring for the epoch contract.

    ``epoch``, ``rank``, ``world_size`` and ``starts`` (per worker: batches to skip on resume)
    are set by the loader in the main process before workers start, so they reach the workers
    whatever the start method. Each batch names the ``worker`` that made it.
    """

    def __init__(
        self,
        shards: list[sh.ShardInfo],
        *,
        image_size: int,
        batch_size: int,
        train: bool,
        classes: frozenset[str] | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        min_crop_frac: float = 0.8,
        max_crop_frac: float = 1.0,
        draft_decode: bool = True,
        limit: int | None = None,
        drop_last: bool | None = None,
    ) -> None:
        if not shards:
            raise ValueError("no shards given")
        self.shards = shards
        self.image_size = image_size
        self.batch_size = batch_size
        self.train = train
        self.classes = classes
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.seed = seed
        self.min_crop_frac = min_crop_frac
        self.max_crop_frac = max_crop_frac
        self.draft_decode = draft_decode
        self.epoch = 0
        self.rank = 0
        self.world_size = 1
        self.starts: list[SlotStart] | None = None
        self.worker_offset = 0
        # Training needs equal full batches on every rank; evaluation needs every sample.
        self.drop_last = train if drop_last is None else drop_last
        self.limit = limit
        self.total = sum(sh.selected_count(s, classes) for s in shards)
        if limit is not None:
            self.total = min(self.total, limit)
        if self.drop_last and self.total < batch_size:
            raise ValueError(f"{self.total} samples cannot fill one batch of {batch_size}")

    def __len__(self) -> int:
        if self.drop_last:
            return sh.batches_per_rank(self.total, self.world_size, self.batch_size)
        mine = (self.rank + 1) * self.total // self.world_size - self.rank * self.total // (
            self.world_size
        )
        return -(-mine // self.batch_size)

    # -- per-sample work ------------------------------------------------------------------
    def _transform(self, sample: sh.RawSample, rng: random.Random) -> torch.Tensor:
        data = sh.image_member(sample)
        if data is None:
            members = ", ".join(sorted(sample.members)) or "none"
            raise UndecodableImage(f"no image member (members: {members})")
        size = self.image_size
        draft = round(size / self.min_crop_frac) + 1 if self.train else size
        img = decode_image(data, draft if self.draft_decode else None)
        if self.train:
            img = random_crop(img, size, rng, self.min_crop_frac, self.max_crop_frac)
        else:
            img = center_crop(img, size)
        return to_uint8_tensor(img)

    def _decoded(
        self, slices: list[sh.Slice], rng: random.Random, skipped: list[tuple], replay: _Replay
    ) -> Iterator[tuple[torch.Tensor | Undecoded, int, str]]:
        """(image, label, key) per readable sample; ``skipped`` gets (shard, key, reason, lost).

        While ``replay.active`` samples are not decoded: the known corrupt ones are passed over,
        the others draw their crop and come out ``Undecoded``.
        """
        for piece in slices:
            try:
                for sample in sh.read_slice(piece, self.classes):
                    label = sh.sample_label(sample)
                    if replay.active:
                        if (sample.shard, sample.key) in replay.bad:
                            skipped.append((sample.shard, sample.key, "corrupt", 1))
                            continue
                        draws = [rng.random() for _ in range(CROP_DRAWS)] if self.train else []
                        yield Undecoded(sample, draws), label, sample.key
                        continue
                    try:
                        image = self._transform(sample, rng)
                    except UndecodableImage as exc:
                        skipped.append((sample.shard, sample.key, str(exc), 1))
                        continue
                    yield image, label, sample.key
            except sh.ShardReadError as exc:
                skipped.append((piece.url, REST_OF_SHARD, str(exc), exc.lost or 0))

    def _image(self, item: tuple) -> torch.Tensor:
        image = item[0]
        if isinstance(image, Undecoded):
            return self._transform(image.sample, _Playback(image.draws))
        return image

    def _shuffled(self, items: Iterator, rng: random.Random) -> Iterator:
        if self.shuffle_buffer <= 1:
            yield from items
            return
        buffer: list = []
        for item in items:
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches from its workers in turn, starting with worker 0. After
        # a resume the turn belongs to the worker after the one that made the last batch taken,
        # so loader worker 0 plays that worker's part.
        worker = (worker + self.worker_offset) % num_workers
        slices, num_batches = sh.plan_worker(
            self.shards,
            classes=self.classes,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            epoch=self.epoch,
            seed=self.seed,
            shuffle=self.train,
            limit=self.limit,
            drop_last=self.drop_last,
        )
        rng = random.Random(hash((self.seed, self.epoch, self.rank, worker)))
        skipped: list[tuple] = []
        start = self.starts[worker] if self.starts else SlotStart()
        replay = _Replay(start)
        stream = self._shuffled(self._decoded(slices, rng, skipped, replay), rng)
        recent: list[tuple] = []
        for index in range(num_batches):
            # Batches before start.skip were delivered before the resume: rebuilt, not yielded.
            replay.active = index < start.skip
            items = []
            for item in stream:
                if not replay.active and isinstance(item[0], Undecoded):
                    try:
                        item = (self._image(item), item[1], item[2])
                    except UndecodableImage as exc:
                        sample = item[0].sample
                        skipped.append((sample.shard, sample.key, str(exc), 1))
                        continue
                items.append(item)
                if len(items) == self.batch_size:
                    break
            refilled = 0
            if not self.drop_last and not items:
                break
            while self.drop_last and len(items) < self.batch_size:
                # Corrupt samples left this range short: repeat decoded ones so that every
                # rank still runs the same number of steps (DDP would hang otherwise).
                if not recent:
                    raise RuntimeError(
                        f"rank {self.rank} worker {worker}: every sample of its range was "
                        f"unreadable ({len(skipped)} skipped, e.g. {skipped[:3]})"
                    )
                items.append(recent[refilled % len(recent)])
                refilled += 1
            recent = (recent + items)[-4 * self.batch_size :]
            if replay.active:
                skipped.clear()  # reported before the resume
                continue
            yield {
                "image": torch.stack([self._image(it) for it in items]),
                "label": torch.tensor([it[1] for it in items], dtype=torch.long),
                "key": [it[2] for it in items],
                "skipped": skipped[:],
                "refilled": refilled,
                "worker": worker,
            }
            skipped.clear()


class EpochLoader(DataLoader):
    """A DataLoader that tells its ``ShardImageDataset`` the epoch, rank and world size each
    time an epoch starts (Lightning only calls ``set_epoch`` on samplers, and an iterable
    dataset has none)."""

    def __init__(self, *args: Any, context: Callable[[], tuple[int, int, int]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.context = context

    def __iter__(self):
        epoch, rank, world_size = self.context()
        self.dataset.epoch, self.dataset.rank, self.dataset.world_size = epoch, rank, world_size
        self.dataset.starts, self.dataset.worker_offset = None, 0
        return super().__iter__()


class ResumableShardLoader(ResumableLoader):
    """The training loader: ``EpochLoader``'s contract plus its position in checkpoints (one
    slot per loader worker; see ``provq_lightning.data.stream_position``)."""

    def layout(self, world_size: int) -> dict[str, int]:
        return {**super().layout(world_size), "batch_size": self.dataset.batch_size}

    def start_epoch(self, epoch: int, rank: int, world_size: int, starts: list[SlotStart]) -> None:
        ds = self.dataset
        ds.epoch, ds.rank, ds.world_size, ds.starts = epoch, rank, world_size, starts
        ds.worker_offset = sum(s.skip for s in starts) % len(starts)


class ImageNetDataModule(ResumableDataModule):
    """Webdataset shards for training and validation.

    Args:
        train_shards: an ``index.json`` written by ``provq-make-shards`` or URL patterns
            (brace expansion, ``pipe:`` commands, ``a::b`` lists) with ``samples_per_shard``.
        val_shards: the same for validation (centre crops, no shuffling).
        image_size: crop size (256 for the paper's 16x16 tokens, 384 for 24x24).
        batch_size: per-rank batch size.
        class_list: text file of wnids, e.g. the 100 classes of ImageNet-100.
        num_workers: loader processes per rank.
        shuffle_buffer: samples held for the in-stream shuffle (after the shard-order shuffle).
        seed: seed of the shard order and the augmentation.
        min_crop_frac, max_crop_frac: LlamaGen's random-crop scale range.
        val_samples: cap on validation samples (the first ones of the fixed order); None = all.
    """

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        image_size: int = 256,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        samples_per_shard: int | None = None,
        class_list: str | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        min_crop_frac: float = 0.8,
        max_crop_frac: float = 1.0,
        draft_decode: bool = True,
        val_samples: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.skipped_count = 0
        self.refilled_count = 0

    def _dataset(self, shards: str | list[str], train: bool) -> ShardImageDataset:
        hp = self.hparams
        classes = read_class_list(hp.class_list) if hp.class_list else None
        infos = shard_infos(shards, hp.samples_per_shard)
        batch = hp.batch_size if train else (hp.val_batch_size or hp.batch_size)
        dataset = ShardImageDataset(
            infos,
            image_size=hp.image_size,
            batch_size=batch,
            train=train,
            classes=classes,
            shuffle_buffer=hp.shuffle_buffer,
            seed=hp.seed,
            min_crop_frac=hp.min_crop_frac,
            max_crop_frac=hp.max_crop_frac,
            draft_decode=hp.draft_decode,
            limit=None if train else hp.val_samples,
        )
        _, dataset.rank, dataset.world_size = self.stream_context()
        return dataset

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_set = self._dataset(self.hparams.train_shards, train=True)
        val = self.hparams.val_shards
        self.val_set = self._dataset(val, train=False) if val is not None else None

    def _loader(self, dataset: ShardImageDataset) -> EpochLoader:
        workers = self.hparams.num_workers
        return EpochLoader(
            dataset,
            batch_size=None,  # the dataset yields whole batches
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            context=self.stream_context,
        )

    def train_dataloader(self) -> ResumableShardLoader:
        workers = self.hparams.num_workers
        return ResumableShardLoader(
            self.train_set,
            batch_size=None,  # the dataset yields whole batches
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            context=self.stream_context,
            position=self.position,
            slots=max(1, workers),
        )

    def val_dataloader(self) -> EpochLoader | list:
        return self._loader(self.val_set) if self.val_set is not None else []

    def test_dataloader(self) -> EpochLoader | list:
        return self.val_dataloader()

    def predict_dataloader(self) -> EpochLoader:
        """Every training sample once, centre-cropped, in stored order (for provq-tokenize)."""
        return self._loader(self._dataset(self.hparams.train_shards, train=False))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # The stream's batches carry their loader worker (the slot) and what was skipped in them.
        if isinstance(batch, dict) and "skipped" in batch:
            skipped = batch.pop("skipped")
            note_skipped(self, skipped, int(batch.pop("refilled")))
            bad = [(shard, key) for shard, key, *_ in skipped if key != REST_OF_SHARD]
            self.note_training_batch(int(batch.pop("worker", 0)), bad)
        return batch


def note_skipped(dm: Any, skipped: list[tuple[str, str, str, int]], refilled: int) -> None:
    """Count and log lost samples with shard and key (on the rank that met them).

    ``skipped`` holds (shard, key, reason, lost): one corrupt sample, or for a shard that ended
    early (key ``REST_OF_SHARD``) the number of planned samples it could not deliver.
    """
    if not skipped and not refilled:
        return
    dm.skipped_count += sum(lost for *_, lost in skipped)
    dm.refilled_count += refilled
    rank = dm.trainer.global_rank if dm.trainer is not None else 0
    for shard, key, reason, lost in skipped:
        if key == REST_OF_SHARD:
            log.warning("[rank %d] lost %d samples of shard %s, which ended early: %s",
                        rank, lost, shard, reason)
        else:
            log.warning("[rank %d] skipped corrupt sample %s in shard %s: %s",
                        rank, key, shard, reason)
    if refilled:
        log.warning("[rank %d] repeated %d samples to keep the batch count fixed", rank, refilled)
    trainer = dm.trainer
    if trainer is not None and trainer.logger is not None:
        trainer.logger.log_metrics(
            {
                f"data/skipped_samples_rank{rank}": float(dm.skipped_count),
                f"data/refilled_samples_rank{rank}": float(dm.refilled_count),
            },
            step=trainer.global_step,
        )
