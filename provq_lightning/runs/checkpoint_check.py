"""A checkpoint that cannot be one, named in one line before ``torch.load`` sees it.

``torch.load`` of a text file, an empty file or a file cut short by a killed save fails with
``UnpicklingError`` / ``EOFError`` / a zip-reader ``RuntimeError`` that names no path.
``check_checkpoint_file`` looks at the file's structure only (magic bytes and the zip directory,
no tensor is read), so it is cheap enough to run before every load, resume included;
``load_checkpoint`` adds the load itself with the remaining failures named the same way.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from provq_lightning.errors import ProvqError
from provq_lightning.runs.safe_load import load_weights_only

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format since 1.6 is a zip archive
LEGACY_MAGIC = b"\x80"  # the older format is a bare pickle stream (protocol >= 2)
FIX = "pass a checkpoint written by provq-fit (e.g. <run>/checkpoints/last.ckpt)"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def check_checkpoint_file(path: str | Path) -> Path:
    """``path`` if it looks like a PyTorch checkpoint; else ``ProvqError`` naming the path."""
    path = Path(path)
    if not path.exists():
        raise ProvqError(f"checkpoint {path} not found; {FIX}")
    if not path.is_file():
        raise ProvqError(f"checkpoint {path} is a folder, not a file; {FIX}")
    size = path.stat().st_size
    if size == 0:
        raise ProvqError(
            f"checkpoint {path} is empty (0 bytes), probably from a save that was killed; "
            "use an earlier checkpoint or re-run"
        )
    with path.open("rb") as handle:
        start = handle.read(200)
    head = start[: len(ZIP_MAGIC)]
    if b"git-lfs" in start:
        raise ProvqError(f"checkpoint {path} is a Git LFS pointer, not the checkpoint itself; "
                         "fetch it with `git lfs pull`")
    if head.startswith(LEGACY_MAGIC):
        return path  # an old-format pickle has no directory to check; load_checkpoint names it
    if head != ZIP_MAGIC:
        raise ProvqError(f"checkpoint {path} is not a PyTorch checkpoint (starts with {head!r}); "
                         f"{FIX}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        # A save killed mid-write leaves no zip directory at the end of the file.
        raise ProvqError(
            f"checkpoint {path} is truncated or corrupt ({size} bytes, {_first_line(err)}), "
            "probably from a save that was killed; use an earlier checkpoint or re-run"
        ) from None
    if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        raise ProvqError(f"checkpoint {path} is a zip file without data.pkl, not a PyTorch "
                         f"checkpoint; {FIX}")
    return path


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """The checkpoint's dict (with ``state_dict``); every failure is one line naming ``path``."""
    path = check_checkpoint_file(path)
    # provq's checkpoints hold only tensors, containers and primitives: never unpickle code.
    payload = load_weights_only(path, "checkpoint", map_location)
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise ProvqError(f"checkpoint {path} has no state_dict, not a Lightning checkpoint; {FIX}")
    return payload
