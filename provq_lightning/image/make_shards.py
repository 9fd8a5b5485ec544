"""``provq-make-shards``: write webdataset shards (plus ``index.json``) from an image folder.

Accepted layouts: ImageNet's ``<root>/<wnid>/*.JPEG`` (pass ``.../train`` or ``.../val`` with
class folders) or a flat folder of ``<wnid>_<anything>.JPEG``. The original file bytes are
stored unchanged (no re-encoding), the sample order is shuffled with a seed, and each sample
holds ``<key>.<ext>``, ``<key>.cls`` (class index) and ``<key>.wnid``. A non-empty output folder
is refused unless ``--overwrite``, which first removes the shards and index it finds there
(shards of an earlier, larger run would otherwise stay on disk next to the new index).

    provq-make-shards ../shared/data/images/imagenet_sample runs/shards/sample --shard-size 100
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.progress import Progress

from provq_lightning.errors import ProvqError
from provq_lightning.image.shards import INDEX_NAME, ShardInfo, write_index
from provq_lightning.image.transforms import IMAGE_SUFFIXES

WNID = re.compile(r"^(n\d{8})")


@dataclass(frozen=True)
class SourceImage:
    path: Path
    wnid: str
    key: str


def sample_key(wnid: str, stem: str) -> str:
    """A webdataset key: no dots (they separate the extension), no slashes."""
    stem = re.sub(r"[^A-Za-z0-9_\-]", "_", stem)
    return stem if stem.startswith(wnid) else f"{wnid}_{stem}"


def find_images(root: Path) -> list[SourceImage]:
    """Images of an ImageNet-layout folder (class subfolders) or a flat ``<wnid>_*`` folder."""
    if not root.is_dir():
        raise ProvqError(f"image folder {root} does not exist; give the folder of the images")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    images: list[SourceImage] = []
    if class_dirs:
        for folder in class_dirs:
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    key = sample_key(folder.name, path.stem)
                    images.append(SourceImage(path, folder.name, key))
    else:
        for path in sorted(root.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            match = WNID.match(path.name)
            if match is None:
                raise ValueError(
                    f"{path}: a flat folder needs files named <wnid>_*.JPEG (e.g. "
                    "n01440764_tench.JPEG); use class subfolders for other names"
                )
            images.append(SourceImage(path, match.group(1), sample_key(match.group(1), path.stem)))
    if not images:
        raise ProvqError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}; "
                         "give a folder of class subfolders or of <wnid>_*.JPEG files")
    keys = Counter(im.key for im in images)
    dupes = [k for k, n in keys.items() if n > 1]
    if dupes:
        raise ProvqError(f"duplicate sample keys under {root} after sanitising names: "
                         f"{dupes[:5]}; rename those files")
    return images


def read_wnids(path: Path) -> list[str]:
    return [w for w in (line.split("#")[0].strip() for line in path.read_text().splitlines()) if w]


def shard_files(out_dir: Path, prefix: str) -> list[Path]:
    """What an earlier ``provq-make-shards`` left in ``out_dir``: ``index.json``, the shards it
    lists, and ``<prefix>-NNNNNN.tar`` (plus ``.tmp`` leftovers of a killed run)."""
    own = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar(\.tmp)?$")
    found = {p for p in out_dir.iterdir() if p.is_file() and own.match(p.name)}
    index = out_dir / INDEX_NAME
    if index.is_file():
        found.add(index)
        try:
            listed = [str(entry["url"]) for entry in json.loads(index.read_text())["shards"]]
        except (ValueError, KeyError, TypeError):
            listed = []  # an unreadable index lists nothing; the prefix pattern still applies
        for url in listed:
            path = out_dir / url
            # Only plain files directly in out_dir: an index must not make us delete elsewhere.
            if path.parent == out_dir and path.is_file():
                found.add(path)
    return sorted(found)


def prepare_out_dir(out_dir: Path, prefix: str, overwrite: bool) -> list[Path]:
    """Refuse a non-empty ``out_dir`` unless ``overwrite``; then remove its old shards and
    index (other files stay). Returns the removed files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ProvqError(f"output folder {out_dir} is a file; give a folder for the shards")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return []
    stale = shard_files(out_dir, prefix)
    if not overwrite:
        others = sum(1 for _ in out_dir.iterdir()) - len(stale)
        raise ProvqError(
            f"output folder {out_dir} is not empty ({len(stale)} shard/index files, {others} "
            f"other entries); pass --overwrite to replace its shards and {INDEX_NAME}, or "
            "choose an empty folder"
        )
    for path in stale:
        path.unlink()
    return stale


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    images: list[SourceImage],
    out_dir: Path,
    *,
    shard_size: int = 1000,
    prefix: str = "shard",
    seed: int = 0,
    class_index: dict[str, int] | None = None,
) -> list[ShardInfo]:
    """Shuffle and write ``images`` into tar shards of ``shard_size`` samples, plus the index."""
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    wnids = sorted({im.wnid for im in images})
    class_index = class_index or {w: i for i, w in enumerate(wnids)}
    missing = [w for w in wnids if w not in class_index]
    if missing:
        raise ValueError(f"wnids missing from the class list: {missing[:5]}")
    order = list(images)
    random.Random(seed).shuffle(order)
    infos: list[ShardInfo] = []
    with Progress() as progress:
        task = progress.add_task(f"writing shards to {out_dir}", total=len(order))
        for n, start in enumerate(range(0, len(order), shard_size)):
            chunk = order[start : start + shard_size]
            name = f"{prefix}-{n:06d}.tar"
            tmp = out_dir / (name + ".tmp")
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for im in chunk:
                    ext = im.path.suffix.lower().lstrip(".")
                    _add(tar, f"{im.key}.{ext}", im.path.read_bytes())
                    _add(tar, f"{im.key}.cls", str(class_index[im.wnid]).encode())
                    _add(tar, f"{im.key}.wnid", im.wnid.encode())
                    progress.advance(task)
            tmp.replace(out_dir / name)
            infos.append(ShardInfo(name, len(chunk), dict(Counter(im.wnid for im in chunk))))
    write_index(out_dir / INDEX_NAME, infos, {"seed": seed, "num_classes": len(class_index)})
    return infos


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="provq-make-shards", description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="ImageNet-layout or flat <wnid>_* folder")
    parser.add_argument("out_dir", type=Path, help="where the shards and index.json go")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty out_dir, removing its old shards and index")
    parser.add_argument("--classes", type=Path, help="only these wnids (one per line)")
    parser.add_argument(
        "--class-index",
        type=Path,
        help="wnids in class-index order (e.g. all 1000 ImageNet wnids, sorted); "
        "default: sorted wnids found in the source",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv))
    except ProvqError as err:
        # A fault the user can fix: one line, not a traceback.
        print(f"provq-make-shards: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


def run(args: argparse.Namespace) -> None:
    images = find_images(args.source)
    if args.classes is not None:
        keep = set(read_wnids(args.classes))
        images = [im for im in images if im.wnid in keep]
        if not images:
            raise ProvqError(f"no images of the classes in {args.classes} under {args.source}; "
                             "check its wnids")
    # After the sources are listed, so nothing is removed when they are wrong.
    removed = prepare_out_dir(args.out_dir, args.prefix, args.overwrite)
    if removed:
        print(f"removed {len(removed)} old shard/index files from {args.out_dir}/")
    class_index = None
    if args.class_index is not None:
        class_index = {w: i for i, w in enumerate(read_wnids(args.class_index))}
    infos = write_shards(
        images,
        args.out_dir,
        shard_size=args.shard_size,
        prefix=args.prefix,
        seed=args.seed,
        class_index=class_index,
    )
    total = sum(s.count for s in infos)
    print(f"wrote {total} samples in {len(infos)} shards to {args.out_dir}/ ({INDEX_NAME})")


if __name__ == "__main__":
    main()
