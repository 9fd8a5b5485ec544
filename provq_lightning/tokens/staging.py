"""A token folder appears whole or not at all.

``provq-tokenize`` writes into a hidden sibling folder (``.<name>.partial-<pid>``) and renames it
to ``--out`` only after ``meta.json`` is written, so a kill or a full disk never leaves a
half-written folder that ``provq-decode`` or a training job would take for a whole one. A
previous token folder at ``--out`` is replaced; any other non-empty folder is refused before
any work, so provq never deletes what it did not write.

``provq-fit predict`` under DDP uses the same steps apart: rank 0 begins the staging folder
(named by its pid, which every rank is told), every rank writes its share into it, and rank 0
commits it (``begin_staging`` / ``commit_staging`` / ``discard_staging``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from provq_lightning.errors import ProvqError

META = "meta.json"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def check_output_folder(out: Path) -> None:
    """Refuse an ``--out`` that exists and is neither empty nor a provq token folder."""
    if out.exists() and not out.is_dir():
        raise ProvqError(f"--out {out} is a file; give a folder (it is created)")
    if out.is_dir() and any(out.iterdir()) and not (out / META).is_file():
        raise ProvqError(f"--out {out} holds files that are not a provq token folder (no "
                         f"{META}); give a new or empty folder, or remove {out} first")


def staging_folder(out: Path, token: int | str) -> Path:
    """The hidden sibling of ``out`` that one writer (``token``: its pid) fills."""
    return out.parent / f".{out.name}.partial-{token}"


def no_space_error(out: Path) -> ProvqError:
    return ProvqError(
        f"no space left on the device of {out} while writing the codes; nothing was "
        f"written to {out}: free space (or raise the quota) and re-run"
    )


def begin_staging(out: Path, token: int | str) -> Path:
    """Check ``out``, remove the partial folders of earlier killed writers (any token but
    ``token``) and create a fresh, empty staging folder for ``token``."""
    out = Path(out)
    check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = staging_folder(out, token)
    for path in out.parent.glob(f".{out.name}.partial-*"):
        if path != staged:
            shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(staged, ignore_errors=True)
    try:
        staged.mkdir()
    except OSError as err:
        if err.errno in NO_SPACE:
            raise no_space_error(out) from None
        raise
    return staged


def commit_staging(staged: Path, out: Path) -> None:
    """Make the finished ``staged`` folder ``out``, replacing an earlier token folder there."""
    out = Path(out)
    try:
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(staged, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staged, out)
    except OSError as err:
        discard_staging(staged)
        if err.errno in NO_SPACE:
            raise no_space_error(out) from None
        raise


def discard_staging(staged: Path) -> None:
    shutil.rmtree(staged, ignore_errors=True)


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A fresh folder to write into; it becomes ``out`` when the block ends without error."""
    out = Path(out)
    staged = begin_staging(out, os.getpid())
    try:
        yield staged
    except OSError as err:
        discard_staging(staged)
        if err.errno in NO_SPACE:
            raise no_space_error(out) from None
        raise
    except BaseException:
        discard_staging(staged)
        raise
    commit_staging(staged, out)
