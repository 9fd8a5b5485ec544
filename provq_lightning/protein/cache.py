"""Parse structure files once into tensor shards; every later epoch and DDP rank reads those.

Layout of a cache directory::

    manifest.json      fingerprint, options, split, per-file status, counts, shard list
    skipped.tsv        path <TAB> reason, one line per skipped file
    train-00000.pt     a shard: ids, concatenated per-residue tensors and offsets
    val-00000.pt

The train/validation split is a pure function of the entry name (file stem without format
suffix, lower-cased) and ``split_seed``, so it does not depend on file order or on which other
files are present, and the PDB and mmCIF copies of an entry always land in the same split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from provq_lightning.protein.chain import ProteinChain
from provq_lightning.protein.parsing import (
    ParseOptions,
    StructureSkip,
    is_structure_file,
    parse_structure,
    strip_suffixes,
)

log = logging.getLogger("provq.protein")

CACHE_VERSION = 1
SPLITS = ("train", "val")


# -- discovering inputs -------------------------------------------------------------------
@dataclass
class Sources:
    """Structure files to parse, plus files found in the folders that are not structures."""

    files: list[Path]
    ignored: list[Path] = field(default_factory=list)


def discover(sources: Sequence[str | Path]) -> Sources:
    """Expand folders (recursively), structure files and list files (one path per line)."""
    files: list[Path] = []
    ignored: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            for p in sorted(q for q in path.rglob("*") if q.is_file()):
                (files if is_structure_file(p) else ignored).append(p)
        elif path.is_file() and is_structure_file(path):
            files.append(path)
        elif path.is_file():
            # A list file: paths relative to the list's folder; '#' starts a comment.
            for line in path.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    item = Path(line) if Path(line).is_absolute() else path.parent / line
                    files.append(item)
        else:
            raise FileNotFoundError(
                f"structure source {path} does not exist; give a folder, a structure file "
                "(.pdb/.cif/.bcif, optionally .gz) or a text file listing them"
            )
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return Sources(unique, ignored)


def entry_names(files: Sequence[Path]) -> dict[Path, str]:
    """Chain-id prefix per file: the stem, or stem + format where two files share a stem."""
    stems = [strip_suffixes(p.name)[0] for p in files]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s.lower()] = counts.get(s.lower(), 0) + 1
    names = {}
    for p, s in zip(files, stems, strict=True):
        if counts[s.lower()] == 1:
            names[p] = s
        else:  # e.g. 1aki.pdb and 1aki.cif -> 1aki.pdb_A, 1aki.cif_A
            names[p] = s + strip_suffixes(p.name)[1]
    return names


def split_key(entry: str) -> str:
    return strip_suffixes(entry)[0].lower()


def split_score(entry: str, seed: int) -> float:
    """Deterministic uniform number in [0, 1) for an entry."""
    digest = hashlib.sha256(f"{seed}:{split_key(entry)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(entries: Iterable[str], val_fraction: float, seed: int) -> dict[str, str]:
    """``entry -> 'train' | 'val'``; at least one validation entry when there are two or more."""
    entries = list(entries)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    scores = {e: split_score(e, seed) for e in entries}
    out = {e: "val" if scores[e] < val_fraction else "train" for e in entries}
    if val_fraction > 0 and "val" not in out.values() and len({split_key(e) for e in entries}) > 1:
        lowest = split_key(min(entries, key=scores.__getitem__))
        out.update({e: "val" for e in entries if split_key(e) == lowest})
    return out


# -- fingerprint and manifest -------------------------------------------------------------
@dataclass(frozen=True)
class CacheSettings:
    """Everything the cached tensors depend on besides the files themselves."""

    options: ParseOptions = ParseOptions()
    val_fraction: float = 0.1
    split_seed: int = 0
    chains: tuple[str, ...] | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["chains"] = list(self.chains) if self.chains is not None else None
        return d


def fingerprint(files: Sequence[Path], settings: CacheSettings) -> str:
    stats = []
    for p in files:
        st = p.stat() if p.exists() else None
        stats.append([str(p), st.st_size if st else -1, st.st_mtime_ns if st else -1])
    payload = {"version": CACHE_VERSION, "files": stats, "settings": settings.to_json()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def load_manifest(cache_dir: Path | str) -> dict:
    path = Path(cache_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no structure cache at {cache_dir} (missing manifest.json); build it with "
            f"`provq-prep-structures <folder> --cache-dir {cache_dir}`"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("version") != CACHE_VERSION:
        raise ValueError(
            f"structure cache {cache_dir} has version {manifest.get('version')}, this provq "
            f"reads version {CACHE_VERSION}; rebuild it with provq-prep-structures"
        )
    return manifest


# -- parsing ------------------------------------------------------------------------------
@dataclass
class FileResult:
    path: str
    entry: str
    chains: list[ProteinChain]
    dropped: list[str]
    skip_reason: str | None


def _parse_one(args: tuple[Path, str, ParseOptions, tuple[str, ...] | None]) -> FileResult:
    path, entry, options, wanted = args
    try:
        parsed = parse_structure(path, options, entry=entry, wanted=wanted)
    except StructureSkip as skip:
        return FileResult(str(path), entry, [], [], str(skip))
    except Exception as err:  # never let one odd file kill a long prep
        return FileResult(str(path), entry, [], [], f"{type(err).__name__}: {err}")
    return FileResult(str(path), entry, parsed.chains, parsed.dropped, None)


def parse_files(
    files: Sequence[Path],
    options: ParseOptions,
    wanted: tuple[str, ...] | None = None,
    workers: int = 1,
    progress: bool = True,
) -> Iterable[FileResult]:
    """Parse files (in a process pool when ``workers`` > 1), yielding results in input order."""
    names = entry_names(files)
    jobs = [(p, names[p], options, wanted) for p in files]
    if workers > 1 and len(jobs) > 1:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(_parse_one, jobs, chunksize=4)
    else:
        pool = None
        results = map(_parse_one, jobs)
    try:
        if progress:
            from rich.progress import track

            results = track(results, total=len(jobs), description="parsing structures")
        yield from results
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


# -- shards -------------------------------------------------------------------------------
def pack_shard(chains: Sequence[ProteinChain]) -> dict:
    lengths = torch.tensor([len(c) for c in chains], dtype=torch.int64)
    return {
        "ids": [c.id for c in chains],
        "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        "coords": torch.from_numpy(np.concatenate([c.coords for c in chains])),
        "residue_index": torch.from_numpy(np.concatenate([c.residue_index for c in chains])),
        "aatype": torch.from_numpy(np.concatenate([c.aatype for c in chains])),
    }


def unpack_chain(shard: dict, i: int) -> ProteinChain:
    a, b = int(shard["offsets"][i]), int(shard["offsets"][i + 1])
    return ProteinChain(
        shard["ids"][i],
        shard["coords"][a:b].numpy(),
        shard["residue_index"][a:b].numpy(),
        shard["aatype"][a:b].numpy(),
    )


def load_shard(path: Path | str) -> dict:
    # mmap: a rank touches only the pages of the chains it reads.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def prepare_cache(
    sources: Sequence[str | Path],
    cache_dir: Path | str,
    settings: CacheSettings | None = None,
    workers: int = 1,
    shard_size: int = 512,
    progress: bool = True,
    force: bool = False,
) -> dict:
    """Build (or reuse, when the fingerprint matches) the cache; return its manifest."""
    settings = settings or CacheSettings()
    cache_dir = Path(cache_dir)
    found = discover(sources)
    fp = fingerprint(found.files, settings)
    if not force and (cache_dir / "manifest.json").is_file():
        try:
            manifest = load_manifest(cache_dir)
        except ValueError:
            manifest = {}
        if manifest.get("fingerprint") == fp:
            log.info("structure cache %s is up to date (%s)", cache_dir, fp)
            return manifest
    if not found.files:
        raise FileNotFoundError(f"no structure files (.pdb/.cif/.bcif[.gz]) in {list(sources)}")

    by_split: dict[str, list[ProteinChain]] = {s: [] for s in SPLITS}
    files_report: dict[str, dict] = {}
    names = entry_names(found.files)
    split_of = assign_splits(names.values(), settings.val_fraction, settings.split_seed)
    for result in parse_files(found.files, settings.options, settings.chains, workers, progress):
        if result.skip_reason is not None:
            log.warning("skipped %s: %s", result.path, result.skip_reason)
            files_report[result.path] = {"status": "skipped", "reason": result.skip_reason}
            continue
        split = split_of[result.entry]
        by_split[split].extend(result.chains)
        files_report[result.path] = {
            "status": "loaded",
            "split": split,
            "chains": [c.id for c in result.chains],
            "dropped_chains": result.dropped,
        }
    for p in found.ignored:
        files_report[str(p)] = {"status": "ignored", "reason": "not a structure file suffix"}

    tmp = cache_dir.with_name(cache_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: dict[str, list[dict]] = {}
    for split, chains in by_split.items():
        chains.sort(key=lambda c: c.id)
        shards[split] = []
        for n, start in enumerate(range(0, len(chains), shard_size)):
            part = chains[start : start + shard_size]
            name = f"{split}-{n:05d}.pt"
            torch.save(pack_shard(part), tmp / name)
            shards[split].append({"file": name, "chains": len(part)})
    statuses = [r["status"] for r in files_report.values()]
    counts = {
        "files": len(found.files),
        "loaded": statuses.count("loaded"),
        "skipped": statuses.count("skipped"),
        "ignored": statuses.count("ignored"),
        "chains": {s: len(c) for s, c in by_split.items()},
        "residues": {s: int(sum(len(c) for c in by_split[s])) for s in SPLITS},
        "dropped_chains": sum(len(r.get("dropped_chains", [])) for r in files_report.values()),
    }
    manifest = {
        "version": CACHE_VERSION,
        "fingerprint": fp,
        "settings": settings.to_json(),
        "counts": counts,
        "shards": shards,
        "files": files_report,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    skipped = [f"{p}\t{r['reason']}" for p, r in files_report.items() if r["status"] == "skipped"]
    (tmp / "skipped.tsv").write_text("".join(line + "\n" for line in skipped))
    # Swap in atomically-enough: readers never see a half-written cache directory.
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    os.replace(tmp, cache_dir)
    return manifest
