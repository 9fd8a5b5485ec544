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

from provq_lightning.errors import ProvqError
from provq_lightning.protein import parsing
from provq_lightning.protein.chain import ProteinChain
from provq_lightning.protein.parsing import (
    ParseOptions,
    StructureSkip,
    is_structure_file,
    parse_structure,
    strip_suffixes,
)
from provq_lightning.runs.safe_load import load_weights_only

log = logging.getLogger("provq.protein")

CACHE_VERSION = 1
SPLITS = ("train", "val")
IGNORED_WARN_ABOVE = 3  # more ignored files than this in the sources: one warning line
IGNORED_REASON = "not a structure file (no .pdb/.cif/.bcif suffix, no PDB/mmCIF/BCIF content)"


# -- discovering inputs -------------------------------------------------------------------
@dataclass
class Sources:
    """Structure files to parse, plus files found in the folders that are not structures."""

    files: list[Path]
    ignored: list[Path] = field(default_factory=list)


def read_path_list(path: Path) -> list[Path]:
    """Paths named by a list file, relative to its folder; '#' starts a comment.

    Called only for files that are no structure by suffix or content; a file none of whose
    lines names an existing file is refused rather than read as hundreds of missing paths.
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    lines = [ln.split("#", 1)[0].strip() for ln in (text or "").splitlines()]
    items = [Path(ln) if Path(ln).is_absolute() else path.parent / ln for ln in lines if ln]
    if text is None or "\x00" in text or (items and not any(p.is_file() for p in items)):
        first = f" (line 1: {items[0].name[:60]!r})" if items and text else ""
        raise ProvqError(
            f"structure source {path} is neither a structure file (no .pdb/.cif/.bcif suffix, "
            f"no PDB/mmCIF/BinaryCIF content) nor a list of existing files{first}; give a "
            "folder, a structure file or a text file with one structure path per line"
        )
    return items


def discover(sources: Sequence[str | Path]) -> Sources:
    """Expand folders (recursively), structure files and list files (one path per line).

    Structure files are recognised by suffix or, failing that, by content, the same way in a
    folder and as a source of their own (CATH dompdb files have no suffix).
    """
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
            files.extend(read_path_list(path))
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
    """``entry -> 'train' | 'val'``; at least one validation entry when there are two or more.
    ``val_fraction`` 1.0 puts every entry in validation (evaluate a whole set)."""
    entries = list(entries)
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1], got {val_fraction}")
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


def reader_versions() -> dict[str, str | int]:
    """What turns files into chains besides the settings: provq's parser and biotite."""
    import biotite

    return {"parser": parsing.PARSER_VERSION, "biotite": biotite.__version__}


def fingerprint(files: Sequence[Path], settings: CacheSettings) -> str:
    stats = []
    for p in files:
        st = p.stat() if p.exists() else None
        stats.append([str(p), st.st_size if st else -1, st.st_mtime_ns if st else -1])
    payload = {
        "version": CACHE_VERSION,
        "readers": reader_versions(),
        "files": stats,
        "settings": settings.to_json(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def counts_line(manifest: dict) -> str:
    """The one-line load/skip/ignore summary printed by provq-prep-structures and provq-fit."""
    c = manifest["counts"]
    return (
        f"{c['files']} structure files: {c['loaded']} loaded, {c['skipped']} skipped "
        f"({c['ignored']} other files ignored); chains train {c['chains']['train']}, "
        f"val {c['chains']['val']} ({c['dropped_chains']} chains dropped by the filters); "
        f"residues train {c['residues']['train']}, val {c['residues']['val']}"
    )


def log_ignored(manifest: dict) -> None:
    """One debug line per ignored file; a warning when more than a few were ignored."""
    ignored = [p for p, r in manifest["files"].items() if r["status"] == "ignored"]
    for p in ignored:
        log.debug("ignored %s: %s", p, manifest["files"][p].get("reason", IGNORED_REASON))
    if len(ignored) > IGNORED_WARN_ABOVE:
        names = ", ".join(Path(p).name for p in ignored[:3])
        log.warning(
            "ignored %d files that are no structure by suffix or content (%s, ...); if they "
            "are structures, check their format; debug logging lists each one",
            len(ignored), names,
        )


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
    try:
        return load_weights_only(path, "structure cache shard", mmap=True)
    except FileNotFoundError:
        # The cache is found at setup; a shard gone since (a cleanup job, a deleted working
        # directory under a relative cache_dir) would otherwise stop the run with a traceback.
        raise ProvqError(
            f"structure cache shard {path} disappeared during the run; the cache folder was "
            "removed or moved: resume the run (--ckpt_path last) to rebuild it, and give "
            "data.init_args.cache_dir an absolute path outside folders that get cleaned"
        ) from None


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
        raise FileNotFoundError(
            f"no structure files (.pdb/.cif/.bcif[.gz], or PDB/mmCIF/BCIF content) in "
            f"{[str(s) for s in sources]}"
        )

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
        files_report[str(p)] = {"status": "ignored", "reason": IGNORED_REASON}

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
        "readers": reader_versions(),
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
