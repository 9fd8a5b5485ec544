"""``provq-tokenize`` / ``provq-decode``: dataset -> discrete codes -> reconstructions.

Generic over modalities: the model and datamodule come from a run's ``config.yaml`` (the one
``provq-fit`` writes; found next to the checkpoint's ``checkpoints/`` folder by default), the
weights from a checkpoint, and the work from two hooks every tokenizer implements:
``tokenize_batch(batch) -> [(key, int codes)]`` and
``decode_tokens_to_file(key, codes, out_dir) -> path``.

Output formats (``--format``), each with ``meta.json`` (format, number of codes, code shape):

- ``npy``: ``codes/<key>.npy`` per item plus ``index.jsonl`` (key, file, shape per line);
- ``wds``: webdataset shards ``codes-000000.tar`` of ``<key>.npy`` members plus ``index.json``;
- ``fasta``: one ``codes.fasta`` with ``>key`` then the space-separated ids (flattened).

    provq-tokenize --ckpt runs/x/v/checkpoints/last.ckpt --out runs/x/v/tokens --format npy
    provq-decode --ckpt runs/x/v/checkpoints/last.ckpt --tokens runs/x/v/tokens --out recon/
"""

from __future__ import annotations

import argparse
import io
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from rich.progress import Progress

FORMATS = ("npy", "wds", "fasta")
SPLITS = ("predict", "val", "test", "train")


# -- building the model and data from a run --------------------------------------------------
def find_config(ckpt: Path) -> Path:
    """``<log_dir>/config.yaml`` for ``<log_dir>/checkpoints/<name>.ckpt``."""
    for folder in (ckpt.parent, ckpt.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise FileNotFoundError(
        f"no config.yaml next to {ckpt} or its parent folder; pass --config (the config.yaml "
        "that provq-fit wrote for this run)"
    )


def instantiate(config: dict[str, Any], key: str, base: type) -> Any:
    """A ``class_path``/``init_args`` section built through jsonargparse, like provq-fit does."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, key)
    parsed = parser.parse_object({key: config[key]})
    return parser.instantiate_classes(parsed)[key]


def load_run(
    ckpt: Path, config: Path | None, data_config: Path | None, device: str
) -> tuple[LightningModule, dict[str, Any]]:
    """The model with the checkpoint's weights (eval mode) and the run's config."""
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} not found")
    config_path = config or find_config(ckpt)
    cfg = yaml.safe_load(config_path.read_text())
    if data_config is not None:
        cfg["data"] = yaml.safe_load(data_config.read_text())["data"]
    model = instantiate(cfg, "model", LightningModule)
    for hook in ("tokenize_batch", "decode_tokens_to_file"):
        if not callable(getattr(model, hook, None)):
            raise TypeError(f"{type(model).__name__} does not implement {hook}()")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), cfg


def dataloader(cfg: dict[str, Any], split: str) -> Any:
    data = instantiate(cfg, "data", LightningDataModule)
    data.setup({"train": "fit", "val": "validate"}.get(split, split))
    loader = getattr(data, f"{split}_dataloader")()
    return loader, data


# -- writers ------------------------------------------------------------------------------
def safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


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
            name = f"codes/{safe_name(key)}.npy"
            np.save(self.out / name, array, allow_pickle=False)
            self._index.write(json.dumps({"key": key, "file": name, "shape": array.shape}) + "\n")
        elif self.fmt == "fasta":
            self._fasta.write(f">{key}\n{' '.join(map(str, array.reshape(-1).tolist()))}\n")
        else:
            if self._tar is None or self.shards[-1]["count"] >= self.shard_size:
                self._next_shard()
            data = npy_bytes(array)
            info = tarfile.TarInfo(f"{safe_name(key).replace('.', '_')}.npy")
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


# -- readers ------------------------------------------------------------------------------
def read_codes(tokens: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, codes) pairs from a folder written by ``provq-tokenize`` (any format)."""
    meta_path = tokens / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: is {tokens} a provq-tokenize output?")
    meta = json.loads(meta_path.read_text())
    shape = meta.get("code_shape")
    if meta["format"] == "npy":
        for line in (tokens / "index.jsonl").read_text().splitlines():
            entry = json.loads(line)
            yield entry["key"], torch.from_numpy(np.load(tokens / entry["file"]).astype(np.int64))
    elif meta["format"] == "fasta":
        key = None
        for line in (tokens / "codes.fasta").read_text().splitlines():
            if line.startswith(">"):
                key = line[1:].strip()
            elif key is not None:
                ids = torch.tensor([int(t) for t in line.split()], dtype=torch.long)
                yield key, ids.reshape(shape) if shape and ids.numel() == np.prod(shape) else ids
                key = None
    else:
        index = json.loads((tokens / "index.json").read_text())
        for shard in index["shards"]:
            with tarfile.open(tokens / shard["url"]) as tar:
                for info in tar:
                    data = tar.extractfile(info).read()
                    array = np.load(io.BytesIO(data), allow_pickle=False)
                    yield info.name.rsplit(".", 1)[0], torch.from_numpy(array.astype(np.int64))


# -- entry points ---------------------------------------------------------------------------
def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint of the tokenizer")
    parser.add_argument("--config", type=Path, help="the run's config.yaml (default: found "
                        "next to the checkpoint)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--limit", type=int, help="stop after this many items")


def tokenize_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="provq-tokenize", description=__doc__.split("\n")[0])
    _common(parser)
    parser.add_argument("--format", choices=FORMATS, default="npy")
    parser.add_argument("--split", choices=SPLITS, default="predict",
                        help="which dataloader of the datamodule (predict: the whole "
                        "training set, deterministic crops)")
    parser.add_argument("--data-config", type=Path,
                        help="a YAML whose data: section replaces the run's (another dataset)")
    parser.add_argument("--shard-size", type=int, default=10000, help="items per wds shard")
    args = parser.parse_args(argv)
    model, cfg = load_run(args.ckpt, args.config, args.data_config, args.device)
    loader, _ = dataloader(cfg, args.split)
    writer = CodeWriter(args.out, args.format, code_dtype(model.quantizer.num_codes),
                        args.shard_size)
    with Progress() as progress, torch.inference_mode():
        task = progress.add_task("tokenizing", total=args.limit)
        for batch in loader:
            for key, codes in model.tokenize_batch(batch):
                if args.limit is not None and writer.count >= args.limit:
                    break
                writer.add(key, codes)
                progress.advance(task)
            if args.limit is not None and writer.count >= args.limit:
                break
    writer.close({"num_codes": model.quantizer.num_codes, "checkpoint": str(args.ckpt),
                  "model": cfg["model"]["class_path"], "split": args.split})
    print(f"wrote codes of {writer.count} items to {args.out} ({args.format})")


def decode_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="provq-decode", description="codes -> reconstructions")
    _common(parser)
    parser.add_argument("--tokens", type=Path, required=True, help="a provq-tokenize output")
    parser.add_argument("--keys", nargs="*", help="only these items")
    args = parser.parse_args(argv)
    model, _ = load_run(args.ckpt, args.config, None, args.device)
    wanted = set(args.keys) if args.keys else None
    written = 0
    with Progress() as progress, torch.inference_mode():
        task = progress.add_task("decoding", total=args.limit)
        for key, codes in read_codes(args.tokens):
            if wanted is not None and key not in wanted:
                continue
            model.decode_tokens_to_file(key, codes, args.out)
            written += 1
            progress.advance(task)
            if args.limit is not None and written >= args.limit:
                break
    print(f"decoded {written} items to {args.out}")


if __name__ == "__main__":
    tokenize_main()
