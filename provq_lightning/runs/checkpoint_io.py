"""``AtomicCheckpointIO``: every checkpoint provq writes is replaced atomically, never truncated.

Lightning's own ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file
lives in ``$TMPDIR`` and is then moved onto the target: across file systems (run directory on
NFS/Lustre/tmpfs, ``$TMPDIR`` node-local) that move is a copy over ``last.ckpt`` in place, so a
kill or a full disk during a save destroys the last good checkpoint and leaves the temporary
behind. Here the checkpoint is serialized in memory first (its size is known before the disk is
touched), the free space of the target's directory is checked, and the bytes go to a temporary
file in the target's own directory that is fsynced and ``os.replace``d onto the target. The
target therefore always holds either the previous or the new checkpoint, whole.

A save killed mid-write leaves its temporary (``.<name>.provq-<pid>@<host>.tmp``); the next save
into (or load from) that directory removes those whose process is gone.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from provq_lightning.errors import ProvqError
from provq_lightning.runs.checkpoint_check import check_checkpoint_file
from provq_lightning.runs.safe_load import load_weights_only, refusal

log = logging.getLogger(__name__)

# Errors that mean "no room": a full file system or an exhausted (user/group/project) quota.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.provq-(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]+)\.tmp$")
# Temporaries this process is writing right now (a wrapping AsyncCheckpointIO saves from a
# thread): never "stale", even though their PID is alive and ours.
_in_flight: set[Path] = set()


def _host() -> str:
    # Only characters the temporary-name pattern accepts, so the host round-trips.
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "localhost"


def temporary_path(target: Path) -> Path:
    """The temporary file a save of ``target`` writes first: same directory, provq's name."""
    return target.with_name(f".{target.name}.provq-{os.getpid()}@{_host()}.tmp")


def human_size(num_bytes: int) -> str:
    """``1536`` -> ``'1.5 KiB'``: sizes in error messages, in binary units."""
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use on ``directory``'s file system."""
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` on this host is alive (a zombie, killed but unreaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    # A killed child its parent has not reaped yet still answers signal 0: a zombie is dead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _is_stale(name: str) -> bool:
    match = _TEMP_RE.match(name)
    if match is None or match["host"] != _host():
        # Not provq's, or another node's on a shared file system: its PID means nothing here.
        return False
    pid = int(match["pid"])
    # Our own PID: a previous process of the same PID (PID reuse across a requeue) left it,
    # since the ones this process is writing are in ``_in_flight``.
    return pid == os.getpid() or not pid_alive(pid)


def remove_stale_temporaries(directory: _PATH) -> list[Path]:
    """Delete the temporaries of killed saves in ``directory`` (dead PID on this host).

    Returns the removed paths. Best effort: a directory that does not exist or cannot be
    written is left as it is.
    """
    directory = Path(directory)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        path = directory / name
        if path in _in_flight or not _is_stale(name):
            continue
        try:
            path.unlink()
        except FileNotFoundError:  # another rank or process cleaned it first
            continue
        except OSError as err:
            log.warning("could not remove stale checkpoint temporary %s: %s", path, err)
            continue
        log.info("removed %s, left by a checkpoint save that was killed", path)
        removed.append(path)
    return removed


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable. Some file systems cannot fsync a directory; the data
    # is already fsynced then, and the rename is as durable as that file system allows.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _no_space_error(target: Path, needed: int) -> ProvqError:
    free = free_bytes(target.parent)
    # The same guarantee for every file written this way; "checkpoint" only where it is one.
    what = "checkpoint" if target.suffix == ".ckpt" else "file"
    return ProvqError(
        f"cannot save {what} {target}: it needs {human_size(needed)} but its file system has "
        f"{human_size(free)} free (or the quota is exhausted); the previous {what} there is "
        "kept: free space or raise the quota, then resume with --ckpt_path last"
    )


def write_atomically(target: Path, data: bytes | memoryview) -> None:
    """Replace ``target`` by ``data`` so that it is always either the old or the new file.

    Raises ``ProvqError`` (one line: path, size needed, space free, fix) when the file system
    is full or the quota exhausted, before or while writing; the temporary is removed then.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    if len(data) > free_bytes(target.parent):
        raise _no_space_error(target, len(data))
    tmp = temporary_path(target)
    _in_flight.add(tmp)
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_directory(target.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in NO_SPACE_ERRNOS:
            raise _no_space_error(target, len(data)) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _in_flight.discard(tmp)


def write_json_atomic(path: Path, payload: dict) -> None:
    """``payload`` as indented, key-sorted JSON, written by ``write_atomically``."""
    # A reader never sees a half-written file; a full disk is one line, as for checkpoints.
    write_atomically(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic on any local file system and space-checked.

    Remote paths (``s3://`` ...) keep Lightning's behaviour. Loading is Lightning's, except
    that a truncated, empty or foreign file raises ``ProvqError`` naming it.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            # Lightning's error for storage_options; object stores have their own atomicity.
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomically(Path(url_to_fs(str(path))[1]), buffer.getbuffer())

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        # weights_only is forced: a checkpoint may come from a colleague, and Lightning's own
        # default unpickles remote files (and local ones on torch < 2.6).
        if not _is_local_file_protocol(path):
            try:
                return super().load_checkpoint(path, map_location, weights_only=True)
            except pickle.UnpicklingError as err:
                raise (refusal(path, err, "checkpoint") or err) from None
        local = Path(url_to_fs(str(path))[1])
        # A run that starts by resuming here cleans up after the saves killed before it.
        remove_stale_temporaries(local.parent)
        if local.exists():  # a missing file stays Lightning's FileNotFoundError
            try:
                check_checkpoint_file(local)  # magic bytes and zip directory: no unpickling
            except ProvqError as err:
                reason = str(err).removeprefix(f"checkpoint {local} ").split(";")[0]
                raise ProvqError(
                    f"checkpoint {local} ({human_size(local.stat().st_size)}) is truncated or "
                    f"not a checkpoint ({reason}), and cannot be loaded; resume from another "
                    "checkpoint (--ckpt_path PATH) or start a new run"
                ) from None
            return load_weights_only(local, "checkpoint", map_location)
        return super().load_checkpoint(path, map_location, weights_only=True)
