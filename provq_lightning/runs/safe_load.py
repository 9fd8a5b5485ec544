"""The one way provq reads a torch file: ``torch.load(..., weights_only=True)``, refusals named.

A checkpoint can come from a colleague, a cluster's shared folder or the internet; a pickle can
run any code while it loads. Every file provq reads with torch (checkpoints, its own runs' too,
LlamaGen / LPIPS / Inception weights, structure-cache shards) goes through ``load_weights_only``,
which only admits tensors, containers, primitives and the few globals a caller names. A file
that needs anything else is refused in one line naming the file and the global it asked for.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from provq_lightning.errors import ProvqError

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class UnsafeFileError(ProvqError):
    """A file that only loads by running code (an unexpected global in its pickle)."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:160]}" if text else type(err).__name__


def refusal(path: str | Path, err: BaseException, what: str) -> ProvqError | None:
    """The one-line ``UnsafeFileError`` for a weights-only refusal of ``path``, else ``None``."""
    text = str(err)
    if not isinstance(err, pickle.UnpicklingError) or "weights only" not in text.lower():
        return None
    found = _GLOBAL.search(text)
    named = f"the global {found.group(1)}" if found else "an object that is not plain data"
    return UnsafeFileError(
        f"{what} {path} was refused: loading it would run code ({named}); provq reads files "
        "with torch.load(weights_only=True) only. Use a file written by provq or the original "
        "release, or re-save its tensors (torch.save of a state dict) where you trust it"
    )


def _allowing(allowed: list[Any]) -> contextlib.AbstractContextManager:
    """Admit ``allowed`` for this load only (torch >= 2.5); torch 2.4 has only the process-wide
    list, where they then stay (harmless data classes, but admitted for every later load)."""
    if not allowed:
        return contextlib.nullcontext()
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is not None:
        return scoped(allowed)
    torch.serialization.add_safe_globals(allowed)
    return contextlib.nullcontext()


def load_weights_only(
    path: str | Path,
    what: str = "file",
    map_location: str | Callable | None = "cpu",
    allowed_globals: Iterable[Any] = (),
    mmap: bool = False,
) -> Any:
    """``torch.load(path, weights_only=True)``; every failure is one ``ProvqError`` naming it.

    ``what`` names the kind of file in messages ("checkpoint", "LlamaGen checkpoint", ...);
    ``allowed_globals`` admits a few harmless classes a known format stores (LlamaGen's
    ``argparse.Namespace``). ``FileNotFoundError`` passes through for callers with their own
    message.
    """
    allowed = list(allowed_globals)
    try:
        with _allowing(allowed):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except (EOFError, pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, ValueError) as err:
        unsafe = refusal(path, err, what)
        if unsafe is not None:
            raise unsafe from None
        raise ProvqError(
            f"{what} {path} cannot be read ({_first_line(err)}); it is truncated or corrupt: "
            "use another copy or re-create it"
        ) from None
