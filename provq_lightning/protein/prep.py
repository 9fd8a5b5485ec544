"""``provq-prep-structures``: parse structure files once into a tensor-shard cache.

    provq-prep-structures ../shared/data/proteins --cache-dir runs/cache/proteins

prints one line per skipped file (path and reason), a warning when more than a few files are
not structures (each one at debug level) and a summary of the counts; the cache is
what ``provq_lightning.datamodules.proteins.ProteinStructureDataModule`` reads. A source that
does not exist or holds no structure file, or an option that selects nothing, is one
``<prog>: error:`` line and exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from provq_lightning.data.paths import resolve_data_path
from provq_lightning.errors import ProvqError
from provq_lightning.protein.cache import CacheSettings, counts_line, log_ignored, prepare_cache
from provq_lightning.protein.parsing import ALTLOC_POLICIES, ParseOptions


def read_chain_list(value: str | None) -> tuple[str, ...] | None:
    """Chain selection from a comma list or a file of ids (``<entry>_<chain>`` or entry)."""
    if value is None:
        return None
    path = Path(value)
    items = path.read_text().split() if path.is_file() else value.split(",")
    items = [i.strip() for i in items if i.strip()]
    if not items:
        raise ProvqError(f"--chains {value!r} selects nothing; give a comma list of chain ids "
                         "(e.g. 1aki_A,3o5r) or a file listing them")
    return tuple(items)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="provq-prep-structures",
        description="Parse PDB/mmCIF/BinaryCIF files (optionally gzipped) once into cached "
        "tensor shards with a deterministic train/val split.",
    )
    p.add_argument("sources", nargs="+", help="folders, structure files, or list files")
    p.add_argument("--cache-dir", required=True, help="output folder of the cache")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--altloc", choices=ALTLOC_POLICIES, default="occupancy")
    p.add_argument("--min-length", type=int, default=10, help="min residues with a backbone")
    p.add_argument("--max-length", type=int, default=None, help="drop longer chains")
    p.add_argument("--chains", default=None, help="comma list or file of chain/entry ids")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--shard-size", type=int, default=512, help="chains per shard")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        return run(parser.parse_args(argv))
    except (ProvqError, FileNotFoundError) as err:
        # The cache names a missing source or a folder without structures in one line already.
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 1)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.val_fraction <= 1:
        raise ProvqError(
            f"--val-fraction {args.val_fraction} must lie in [0, 1] (1 puts every chain in the "
            "validation split, for evaluating a trained model)"
        )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    settings = CacheSettings(
        options=ParseOptions(args.altloc, args.min_length, args.max_length),
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        chains=read_chain_list(args.chains),
    )
    sources = [resolve_data_path(s) for s in args.sources]
    manifest = prepare_cache(
        sources,
        resolve_data_path(args.cache_dir, must_exist=False),
        settings,
        workers=args.workers,
        shard_size=args.shard_size,
        progress=not args.quiet,
        force=args.force,
    )
    log_ignored(manifest)
    print(counts_line(manifest))
    print(f"cache: {args.cache_dir} (fingerprint {manifest['fingerprint']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
