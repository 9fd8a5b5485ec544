"""A token folder appears whole or not at all.

``provq-tokenize`` writes into a hidden sibling folder (``.<name>.partial-<pid>``) and renames it
to ``--out`` only after ``meta.json`` is written, so a kill or a full disk never leaves a
half-written folder that ``provq-decode`` or a training job would take for a whole one. A
previous token folder at ``--out`` is replaced; any other non-empty folder is refused before
any work, so provq never deletes what it did not write.
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


def _remove_leftovers(out: Path) -> None:
    # Partial folders of runs killed earlier (their process is gone: any pid but ours).
    for path in out.parent.glob(f".{out.name}.partial-*"):
        if path.name != f".{out.name}.partial-{os.getpid()}":
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A fresh folder to write into; it becomes ``out`` when the block ends without error."""
    out = Path(out)
    check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)
    staged = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    try:
        staged.mkdir()
        yield staged
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(staged, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staged, out)
    except OSError as err:
        shutil.rmtree(staged, ignore_errors=True)
        if err.errno in NO_SPACE:
            raise ProvqError(
                f"no space left on the device of {out} while writing the codes; nothing was "
                f"written to {out}: free space (or raise the quota) and re-run"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
