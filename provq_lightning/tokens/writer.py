"""Writing ``(key, codes)`` pairs in one of the ``provq-tokenize`` formats (``token_reader``
reads them back): ``provq-tokenize`` and ``provq-fit predict``'s ``CodePredictionWriter`` share
this writer, so both produce the same folder.

- ``npy``: ``codes/<key>.npy`` per item plus ``index.jsonl`` (key, file, shape per line);
- ``wds``: webdataset shards ``codes-000000.tar`` of ``<key>.npy`` members plus ``index.json``;
- ``fasta``: one ``codes.fasta`` with ``>key`` then the space-separated ids (flattened);

each with ``meta.json`` (format, number of codes, code shape).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from provq_lightning.tokens.names import safe_file_name

# LlamaGen's layout (provq_lightning.image.llamagen_codes): written for LlamaGen's GPT training,
# never read back by provq, so not one of the reader's FORMATS.
LLAMAGEN = "llamagen"


def code_dtype(num_codes: int) -> np.dtype:
    """The smallest signed dtype holding ids and the -1 "no code" marker."""
    return np.dtype(np.int16) if num_codes <= 32767 else np.dtype(np.int32)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class CodeWriter:
    """Writes (key, codes) pairs in one of ``FORMATS`` under ``out``."""

    def __init__(self, out: Path, fmt: str, dtype: np.dtype, shard_size: int = 10000) -> None:
        self.out, self.fmt, self.dtype, self.shard_size = out, fmt, dtype, shard_size
        out.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.shapes: set[tuple[int, ...]] = set()
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        if fmt == "npy":
            (out / "codes").mkdir(exist_ok=True)
            self._index = (out / "index.jsonl").open("w")
        elif fmt == "fasta":
            self._fasta = (out / "codes.fasta").open("w")

    def add(self, key: str, codes: torch.Tensor) -> None:
        array = codes.cpu().numpy().astype(self.dtype)
        self.shapes.add(tuple(array.shape))
        if self.fmt == "npy":
            name = f"codes/{safe_file_name(key)}.npy"
            np.save(self.out / name, array, allow_pickle=False)
            self._index.write(json.dumps({"key": key, "file": name, "shape": array.shape}) + "\n")
        elif self.fmt == "fasta":
            self._fasta.write(f">{key}\n{' '.join(map(str, array.reshape(-1).tolist()))}\n")
        else:
            if self._tar is None or self.shards[-1]["count"] >= self.shard_size:
                self._next_shard()
            data = npy_bytes(array)
            info = tarfile.TarInfo(f"{safe_file_name(key).replace('.', '_')}.npy")
            info.size = len(data)
            self._tar.addfile(info, io.BytesIO(data))
            self.shards[-1]["count"] += 1
        self.count += 1

    def _next_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
        name = f"codes-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(self.out / name, "w")
        self.shards.append({"url": name, "count": 0})

    def close(self, meta: dict[str, Any]) -> None:
        if self.fmt == "npy":
            self._index.close()
        elif self.fmt == "fasta":
            self._fasta.close()
        elif self._tar is not None:
            self._tar.close()
            index = {"shards": self.shards, "total": self.count}
            (self.out / "index.json").write_text(json.dumps(index) + "\n")
        shape = list(next(iter(self.shapes))) if len(self.shapes) == 1 else None
        meta = {**meta, "format": self.fmt, "count": self.count, "code_shape": shape}
        (self.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
