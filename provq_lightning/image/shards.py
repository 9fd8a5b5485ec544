"""Webdataset shards of images: the index file, URL expansion, per-rank/worker planning, reading.

A shard is a tar file whose members are grouped into samples by key (the member name up to its
first dot), as webdataset writes them: ``<key>.jpg`` (original JPEG bytes), ``<key>.cls``
(class index as text) and ``<key>.wnid``. ``provq-make-shards`` also writes ``index.json``
next to the shards with every shard's sample count (and per-class counts). With the counts
known, an epoch is planned at the sample level: every (rank, worker) reads a disjoint range of
one global, epoch-shuffled order, so no sample is read twice and every rank gets the same number
of batches however uneven the shards are.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import webdataset

from provq_lightning.errors import ProvqError

INDEX_NAME = "index.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")


@dataclass(frozen=True)
class ShardInfo:
    """One shard: where it is, how many samples it holds, and how many of each class."""

    url: str
    count: int
    classes: dict[str, int] | None = None


@dataclass
class RawSample:
    """The members of one sample, undecoded."""

    shard: str
    key: str
    members: dict[str, bytes] = field(default_factory=dict)


def expand_urls(pattern: str | list[str]) -> list[str]:
    """Shard URLs from a brace pattern (``shards-{000..099}.tar``), a list, or ``a::b``."""
    patterns = pattern if isinstance(pattern, list) else str(pattern).split("::")
    urls: list[str] = []
    for p in patterns:
        urls.extend(braceexpand.braceexpand(p))
    return urls


def read_index(path: str | Path) -> list[ShardInfo]:
    """Shards listed by an ``index.json``; their URLs are resolved relative to the index."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProvqError(
            f"shard index {path} not found; write shards with provq-make-shards (it creates "
            f"{INDEX_NAME}) or give shard URLs plus data.init_args.samples_per_shard"
        ) from None
    except (OSError, json.JSONDecodeError) as err:
        raise ProvqError(f"shard index {path} cannot be read ({type(err).__name__}: {err}); "
                         "write the shards again with provq-make-shards") from None
    shards = []
    for entry in payload["shards"]:
        url = entry["url"]
        if "://" not in url and not url.startswith("pipe:") and not Path(url).is_absolute():
            url = str(path.parent / url)
        shards.append(ShardInfo(url, int(entry["count"]), entry.get("classes")))
    return shards


def write_index(path: Path, shards: list[ShardInfo], extra: dict | None = None) -> None:
    entries = []
    for s in shards:
        entry = {"url": s.url, "count": s.count}
        if s.classes is not None:
            entry["classes"] = s.classes
        entries.append(entry)
    payload = {"shards": entries, "total": sum(s.count for s in shards), **(extra or {})}
    path.write_text(json.dumps(payload, separators=(",", ":")) + "\n")


def selected_count(shard: ShardInfo, classes: frozenset[str] | None) -> int:
    """Samples of ``shard`` that pass the class filter."""
    if classes is None:
        return shard.count
    if shard.classes is None:
        raise ValueError(
            f"a class subset needs per-class counts in the shard index, which {shard.url} lacks; "
            "rewrite the shards with provq-make-shards (or with --classes for the subset)"
        )
    return sum(n for wnid, n in shard.classes.items() if wnid in classes)


# -- planning -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slice:
    """Read samples ``[start, stop)`` (positions among the selected samples) of one shard."""

    url: str
    start: int
    stop: int


def epoch_order(shards: list[ShardInfo], seed: int, epoch: int, shuffle: bool) -> list[ShardInfo]:
    """The shard order of an epoch, identical on every rank (same seed, same epoch)."""
    order = list(shards)
    if shuffle:
        random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def batches_per_rank(total: int, world_size: int, batch_size: int) -> int:
    """Full batches every rank yields per epoch; the remainder is left for the next epochs."""
    return total // (world_size * batch_size)


def split_batches(num_batches: int, parts: int) -> list[int]:
    """Spread ``num_batches`` over ``parts`` workers as evenly as possible."""
    return [num_batches // parts + (1 if i < num_batches % parts else 0) for i in range(parts)]


def plan_range(
    counts: list[tuple[str, int]], start: int, stop: int
) -> list[Slice]:
    """The shard slices covering positions ``[start, stop)`` of the concatenated order."""
    slices: list[Slice] = []
    offset = 0
    for url, n in counts:
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            slices.append(Slice(url, lo - offset, hi - offset))
        offset += n
        if offset >= stop:
            break
    return slices


def plan_worker(
    shards: list[ShardInfo],
    *,
    classes: frozenset[str] | None,
    batch_size: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    epoch: int,
    seed: int,
    shuffle: bool,
    limit: int | None = None,
    drop_last: bool = True,
) -> tuple[list[Slice], int]:
    """Slices one (rank, worker) reads this epoch and the number of batches it yields.

    ``drop_last`` (training): ranks take consecutive blocks of ``batches_per_rank *
    batch_size`` samples of the epoch's order, so all ranks run the same number of full
    batches; the remainder waits for a later epoch's order. Otherwise (evaluation, tokenizing)
    the ranks split every sample between them and the last batches may be partial. Each
    rank's block is cut into consecutive whole-batch worker ranges. The ranges are disjoint,
    so every selected sample is read at most once per epoch across all processes.
    ``limit`` caps the samples used per epoch (the first ones of the order).
    """
    order = epoch_order(shards, seed, epoch, shuffle)
    counts = [(s.url, selected_count(s, classes)) for s in order]
    total = sum(n for _, n in counts)
    total = total if limit is None else min(total, limit)
    if drop_last:
        per_rank = batches_per_rank(total, world_size, batch_size)
        rank_start, rank_stop = rank * per_rank * batch_size, (rank + 1) * per_rank * batch_size
    else:
        rank_start, rank_stop = rank * total // world_size, (rank + 1) * total // world_size
        per_rank = -(-(rank_stop - rank_start) // batch_size)
    mine = split_batches(per_rank, num_workers)
    start = rank_start + sum(mine[:worker]) * batch_size
    stop = min(start + mine[worker] * batch_size, rank_stop)
    return plan_range(counts, start, stop), mine[worker]


# -- reading --------------------------------------------------------------------------------
def split_member_name(name: str) -> tuple[str, str]:
    """``dir/n0144_tench.jpg`` -> (``dir/n0144_tench``, ``jpg``), webdataset's key rule."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower()


def iter_shard(url: str) -> Iterator[RawSample]:
    """Samples of one shard in stored order; a truncated or unreadable tar ends the shard.

    Raises ``ShardReadError`` (after yielding what it could read) so the caller can count it.
    """
    current: RawSample | None = None
    try:
        with webdataset.gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                data = tar.extractfile(info).read()
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = RawSample(url, key)
                current.members[ext] = data
    except (tarfile.TarError, OSError, EOFError) as exc:
        if current is not None:
            yield current
        raise ShardReadError(url, exc) from exc
    if current is not None:
        yield current


class ShardReadError(RuntimeError):
    """A shard ended early; ``lost``: the planned samples that could not be read (if known)."""

    def __init__(self, url: str, cause: BaseException, lost: int | None = None) -> None:
        tail = f" ({lost} planned samples lost)" if lost is not None else ""
        super().__init__(f"shard {url} could not be read to the end: {cause}{tail}")
        self.url = url
        self.cause = cause
        self.lost = lost


def image_member(sample: RawSample) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample.members:
            return sample.members[ext]
    return None


def sample_wnid(sample: RawSample) -> str | None:
    raw = sample.members.get("wnid")
    return raw.decode("utf-8").strip() if raw is not None else None


def sample_label(sample: RawSample) -> int:
    raw = sample.members.get("cls")
    try:
        return int(raw.decode("utf-8").strip()) if raw is not None else -1
    except ValueError:
        return -1


def read_slice(piece: Slice, classes: frozenset[str] | None) -> Iterator[RawSample]:
    """Selected samples ``[start, stop)`` of a shard (reads through the earlier ones).

    A shard that ends before ``stop`` (cut short, unreadable from some point, or smaller than
    its index says) raises ``ShardReadError`` after its last sample, with ``lost`` the samples
    of ``[start, stop)`` it could not deliver, so the loss is counted, not silent.
    """
    position = 0
    try:
        for sample in iter_shard(piece.url):
            if classes is not None and sample_wnid(sample) not in classes:
                continue
            if position >= piece.stop:
                return
            if position >= piece.start:
                yield sample
            position += 1
    except ShardReadError as exc:
        raise ShardReadError(piece.url, exc.cause, lost_samples(piece, position)) from exc
    if position < piece.stop:
        cause = EOFError(f"ended after {position} samples, expected {piece.stop}")
        raise ShardReadError(piece.url, cause, lost_samples(piece, position))


def lost_samples(piece: Slice, position: int) -> int:
    """Samples of ``piece`` not delivered when its shard ended after ``position`` samples."""
    return max(0, piece.stop - max(position, piece.start))


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """A tar of samples in memory (tests and small tools)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
