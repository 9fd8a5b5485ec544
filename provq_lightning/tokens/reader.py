"""Reading a ``provq-tokenize`` output back, every record checked against its ``meta.json``.

A code map of another shape, a token id outside the codebook, a FASTA line without a ``>key``
header, a non-integer token or an empty record would otherwise reach the model and come out as a
wrong-sized image or a ``permute`` / ``int()`` traceback naming no record. Each is a
``ProvqError`` here, one line naming the file, the record (number and key) and the fix.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from provq_lightning.errors import ProvqError

FORMATS = ("npy", "wds", "fasta")
MISSING_CODE = -1  # the "no code" marker provq-tokenize may write (e.g. residues w/o backbone)
RETOKENIZE = "re-run provq-tokenize to rewrite it"


@dataclass(frozen=True)
class TokenMeta:
    """What ``meta.json`` promises about every record of a tokenize output."""

    path: Path
    format: str
    num_codes: int | None
    code_shape: tuple[int, ...] | None


def _json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ProvqError(f"{path} not found: is {path.parent} a provq-tokenize output? "
                         f"({what}); {RETOKENIZE}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = (f"line {err.lineno} column {err.colno}: {err.msg}"
                 if isinstance(err, json.JSONDecodeError) else "not UTF-8 text")
        raise ProvqError(f"{path} is not valid JSON ({where}); restore the file "
                         f"provq-tokenize wrote or {RETOKENIZE}") from None


def read_meta(tokens: Path) -> TokenMeta:
    """``tokens/meta.json``, checked: format, ``num_codes`` and ``code_shape``."""
    path = tokens / "meta.json"
    meta = _json(path, "it writes meta.json")
    if not isinstance(meta, dict):
        raise ProvqError(f"{path} must hold a JSON object, got {type(meta).__name__}; "
                         f"{RETOKENIZE}")
    fmt = meta.get("format")
    if fmt not in FORMATS:
        raise ProvqError(f"{path}: 'format' is {fmt!r}, expected one of {', '.join(FORMATS)}; "
                         f"{RETOKENIZE}")
    num_codes = meta.get("num_codes")
    if num_codes is not None and (type(num_codes) is not int or num_codes < 1):
        raise ProvqError(f"{path}: 'num_codes' is {num_codes!r}, expected a positive integer "
                         f"(the codebook size); {RETOKENIZE}")
    shape = meta.get("code_shape")
    if shape is not None and (not isinstance(shape, list)
                              or not all(type(n) is int and n > 0 for n in shape)):
        raise ProvqError(f"{path}: 'code_shape' is {shape!r}, expected a list of positive "
                         f"integers or null (variable shapes); {RETOKENIZE}")
    return TokenMeta(path, fmt, num_codes, tuple(shape) if shape is not None else None)


def check_record(
    where: str, number: int, key: str, codes: torch.Tensor, meta: TokenMeta, num_codes: int | None
) -> torch.Tensor:
    """``codes`` in ``meta``'s code shape, every id in ``[0, num_codes)`` or the missing marker."""
    name = f"{where}: record {number} {key!r}"
    if codes.numel() == 0:
        raise ProvqError(f"{name} has no token ids; remove the record or {RETOKENIZE}")
    if meta.code_shape is not None:
        if codes.dim() == 1 and codes.numel() == math.prod(meta.code_shape):
            codes = codes.reshape(meta.code_shape)  # FASTA stores code maps flattened
        if tuple(codes.shape) != meta.code_shape:
            found = (f"{codes.numel()} token ids" if codes.dim() == 1
                     else f"shape {list(codes.shape)}")
            raise ProvqError(
                f"{name} has {found} but {meta.path} code_shape "
                f"{list(meta.code_shape)} needs {math.prod(meta.code_shape)} ids; the record is "
                f"cut or edited: {RETOKENIZE}"
            )
    if num_codes is not None:
        low, high = int(codes.min()), int(codes.max())
        bad = low if low < MISSING_CODE else high if high >= num_codes else None
        if bad is not None:
            raise ProvqError(
                f"{name} has token id {bad}, outside [0, {num_codes}) (the codebook size; "
                f"{MISSING_CODE} marks a missing code); decode with the checkpoint that wrote "
                f"these tokens or {RETOKENIZE}"
            )
    return codes


def _integer_array(array: np.ndarray, name: str) -> torch.Tensor:
    if array.dtype.kind not in "iu":
        raise ProvqError(f"{name} holds {array.dtype} values, not integer token ids; "
                         f"{RETOKENIZE}")
    return torch.from_numpy(array.astype(np.int64))


def _npy_records(tokens: Path) -> Iterator[tuple[str, str, torch.Tensor]]:
    index = tokens / "index.jsonl"
    if not index.is_file():
        raise ProvqError(f"{index} not found (npy outputs list their records there); "
                         f"{RETOKENIZE}")
    for number, line in enumerate(index.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            key, file = str(entry["key"]), tokens / entry["file"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ProvqError(f"{index}: line {number} is not a {{\"key\", \"file\"}} record "
                             f"({type(err).__name__}: {err}); {RETOKENIZE}") from None
        try:
            array = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            text = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ProvqError(f"{file}: record {number} {key!r} cannot be read as .npy ({text}); "
                             f"{RETOKENIZE}") from None
        yield str(file), key, _integer_array(array, f"{file}: record {number} {key!r}")


def _fasta_records(tokens: Path) -> Iterator[tuple[str, str, torch.Tensor]]:
    """``>key`` then its space-separated ids (wrapped over several lines is fine)."""
    path = tokens / "codes.fasta"
    if not path.is_file():
        raise ProvqError(f"{path} not found (fasta outputs hold their codes there); "
                         f"{RETOKENIZE}")
    number, key, start, ids = 0, None, 0, []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if line.startswith(">"):
            if key is not None:
                yield f"{path} (line {start})", key, torch.tensor(ids, dtype=torch.long)
            number, key, start, ids = number + 1, line[1:].strip(), line_no, []
            if not key:
                raise ProvqError(f"{path}: line {line_no}: record {number} has an empty name "
                                 "after '>'; every record starts with a '>key' line")
        elif line:
            if key is None:
                raise ProvqError(
                    f"{path}: line {line_no} has token ids before any '>key' header; every "
                    "record is a '>key' line followed by its space-separated ids (the layout "
                    "provq-tokenize --format fasta writes)"
                )
            for token in line.split():
                try:
                    ids.append(int(token))
                except ValueError:
                    raise ProvqError(f"{path}: line {line_no}: record {number} {key!r} has "
                                     f"token {token[:20]!r}, not an integer; codes are "
                                     "space-separated integer ids") from None
    if key is not None:
        yield f"{path} (line {start})", key, torch.tensor(ids, dtype=torch.long)


def _wds_records(tokens: Path) -> Iterator[tuple[str, str, torch.Tensor]]:
    index_path = tokens / "index.json"
    index = _json(index_path, "wds outputs list their shards there")
    try:
        urls = [str(shard["url"]) for shard in index["shards"]]
    except (KeyError, TypeError) as err:
        raise ProvqError(f"{index_path} has no list of shards with a 'url' "
                         f"({type(err).__name__}: {err}); {RETOKENIZE}") from None
    for url in urls:
        shard = tokens / url
        try:
            with tarfile.open(shard) as tar:
                for info in tar:
                    data = tar.extractfile(info).read()
                    array = np.load(io.BytesIO(data), allow_pickle=False)
                    key = info.name.rsplit(".", 1)[0]
                    where = f"{shard} (member {info.name})"
                    yield where, key, _integer_array(array, where)
        except (OSError, tarfile.TarError, ValueError, EOFError) as err:
            text = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ProvqError(f"{shard} cannot be read ({type(err).__name__}: {text}); "
                             f"{RETOKENIZE}") from None


READERS = {"npy": _npy_records, "fasta": _fasta_records, "wds": _wds_records}


def read_codes(tokens: Path, num_codes: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, codes) pairs from a ``provq-tokenize`` folder (any format), each checked against
    ``meta.json``: shape ``code_shape``, ids below ``num_codes`` (default: meta's)."""
    meta = read_meta(tokens)
    limit = num_codes if num_codes is not None else meta.num_codes
    for number, (where, key, codes) in enumerate(READERS[meta.format](tokens), 1):
        yield key, check_record(where, number, key, codes, meta, limit)
