"""``provq-tokenize`` / ``provq-decode``: dataset -> discrete codes -> reconstructions.

Generic over modalities: the model and datamodule come from a run's ``config.yaml`` (the one
``provq-fit`` writes; found next to the checkpoint's ``checkpoints/`` folder by default), the
weights from a checkpoint, and the work from two hooks every tokenizer implements:
``tokenize_batch(batch) -> [(key, int codes)]`` and
``decode_tokens_to_file(key, codes, out_dir) -> path``.

Output formats (``--format``), each with ``meta.json`` (format, number of codes, code shape):

- ``npy``: ``codes/<key>.npy`` per item plus ``index.jsonl`` (key, file, shape per line);
- ``wds``: webdataset shards ``codes-000000.tar`` of ``<key>.npy`` members plus ``index.json``;
- ``fasta``: one ``codes.fasta`` with ``>key`` then the space-separated ids (flattened);
- ``llamagen`` (images): LlamaGen's ``imagenet<S>_codes/<n>.npy`` and ``_labels/<n>.npy``
  (``provq_lightning.image.llamagen_codes``), with ``--ten-crop`` as LlamaGen's option.

    provq-tokenize --ckpt runs/x/v/checkpoints/last.ckpt --out runs/x/v/tokens --format npy
    provq-decode --ckpt runs/x/v/checkpoints/last.ckpt --tokens runs/x/v/tokens --out recon/

A broken checkpoint, a code map that does not match ``meta.json`` or a decode that decodes
nothing is one ``<prog>: error:`` line naming the file and record, and exit status 1.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from rich.progress import Progress

from provq_lightning.checkpoint_check import check_checkpoint_file, load_checkpoint
from provq_lightning.errors import ProvqError
from provq_lightning.token_reader import FORMATS, RETOKENIZE, read_codes, read_meta

SPLITS = ("predict", "val", "test", "train")
LLAMAGEN = "llamagen"  # written by provq-tokenize only: LlamaGen's layout, not read back


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
    # A missing checkpoint is named before its missing config.yaml; a broken one after it.
    config_path = config or (find_config(ckpt) if ckpt.is_file() else None)
    check_checkpoint_file(ckpt)
    config_path = config_path or find_config(ckpt)
    cfg = yaml.safe_load(config_path.read_text())
    if data_config is not None:
        cfg["data"] = yaml.safe_load(data_config.read_text())["data"]
    model = instantiate(cfg, "model", LightningModule)
    for hook in ("tokenize_batch", "decode_tokens_to_file"):
        if not callable(getattr(model, hook, None)):
            raise TypeError(f"{type(model).__name__} does not implement {hook}()")
    state = load_checkpoint(ckpt)["state_dict"]  # outside the try: its errors name the file
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        # torch lists every mismatching weight over many lines; the first one is enough here.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else "RuntimeError"
        raise ProvqError(
            f"checkpoint {ckpt} does not fit the model of {config_path} ({detail[:160]}); pass "
            "--config with the config.yaml of the run that wrote this checkpoint"
        ) from None
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


# -- entry points ---------------------------------------------------------------------------
def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint of the tokenizer")
    parser.add_argument("--config", type=Path, help="the run's config.yaml (default: found "
                        "next to the checkpoint)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--limit", type=int, help="stop after this many items")


def report_errors(prog: str, body: Callable[[list[str] | None], None],
                  argv: list[str] | None) -> None:
    """Run an entry point's ``body``; a ``ProvqError`` becomes ``<prog>: error: <message>``
    on stderr and a non-zero exit instead of a traceback."""
    try:
        body(argv)
    except ProvqError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


def tokenize_main(argv: list[str] | None = None) -> None:
    report_errors("provq-tokenize", _tokenize, argv)


def decode_main(argv: list[str] | None = None) -> None:
    report_errors("provq-decode", _decode, argv)


def _tokenize(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="provq-tokenize", description=__doc__.split("\n")[0])
    _common(parser)
    parser.add_argument("--format", choices=(*FORMATS, LLAMAGEN), default="npy",
                        help="llamagen: the numbered .npy codes and labels LlamaGen's c2i GPT "
                        "reads (images only; see provq_lightning.image.llamagen_codes)")
    parser.add_argument("--split", choices=SPLITS, default="predict",
                        help="which dataloader of the datamodule (predict: the whole "
                        "training set, deterministic crops)")
    parser.add_argument("--data-config", type=Path,
                        help="a YAML whose data: section replaces the run's (another dataset)")
    parser.add_argument("--shard-size", type=int, default=10000, help="items per wds shard")
    parser.add_argument("--ten-crop", action="store_true", help="--format llamagen: the ten "
                        "crops of a centre crop of image_size x --crop-range (LlamaGen's "
                        "--ten-crop) instead of the centre crop and its flip")
    parser.add_argument("--crop-range", type=float, default=1.1,
                        help="--format llamagen --ten-crop: the enlarged centre crop (1.1)")
    args = parser.parse_args(argv)
    if args.ten_crop and args.format != LLAMAGEN:
        raise ProvqError("--ten-crop only applies to --format llamagen; drop it or add "
                         "--format llamagen")
    model, cfg = load_run(args.ckpt, args.config, args.data_config, args.device)
    if args.format == LLAMAGEN:
        _tokenize_llamagen(args, model, cfg)
        return
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


def _tokenize_llamagen(args: argparse.Namespace, model: LightningModule,
                       cfg: dict[str, Any]) -> None:
    """``--format llamagen``: views of each image -> LlamaGen's numbered code/label files."""
    from provq_lightning.image import llamagen_codes

    data = cfg.get("data") or {}
    size = (data.get("init_args") or {}).get("image_size")
    if not isinstance(size, int):
        raise ProvqError("--format llamagen needs an image datamodule with init_args.image_size "
                         f"(the crop size); the data config has {size!r}; pass --data-config")
    if args.ten_crop:
        source = llamagen_codes.ten_crop_source_size(size, args.crop_range)
        if source < size:
            raise ProvqError(f"--crop-range {args.crop_range} is below 1; the ten {size}px "
                             "crops are cut from a larger centre crop: use e.g. 1.1")
        init_args = {**data["init_args"], "image_size": source}
        cfg = {**cfg, "data": {**data, "init_args": init_args}}
    loader, _ = dataloader(cfg, args.split)
    writer = llamagen_codes.LlamaGenCodeWriter(args.out, size)
    if "flip" not in str(args.out):
        print("provq-tokenize: warning: LlamaGen's CustomDataset keeps one random view per "
              f"image only when its code path contains 'flip'; {args.out} does not (name it "
              "like imagenet_code_c2i_flip_ten_crop)", file=sys.stderr)
    with Progress() as progress, torch.inference_mode():
        task = progress.add_task("tokenizing", total=args.limit)
        for batch in loader:
            for key, label, codes in llamagen_codes.tokenize_views(model, batch, size,
                                                                   args.ten_crop):
                if args.limit is not None and writer.count >= args.limit:
                    break
                writer.add(key, label, codes)
                progress.advance(task)
            if args.limit is not None and writer.count >= args.limit:
                break
    writer.close({"num_codes": model.quantizer.num_codes, "checkpoint": str(args.ckpt),
                  "model": cfg["model"]["class_path"], "split": args.split,
                  "ten_crop": args.ten_crop, "image_size": size})
    print(f"wrote LlamaGen codes of {writer.count} images to {args.out} "
          f"({writer.codes_dir.name}, {writer.labels_dir.name})")


def _decode(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="provq-decode", description="codes -> reconstructions")
    _common(parser)
    parser.add_argument("--tokens", type=Path, required=True, help="a provq-tokenize output")
    parser.add_argument("--keys", nargs="*", help="only these items")
    args = parser.parse_args(argv)
    meta = read_meta(args.tokens)  # a broken meta.json is named before the model loads
    model, _ = load_run(args.ckpt, args.config, None, args.device)
    num_codes = model.quantizer.num_codes
    if meta.num_codes is not None and meta.num_codes != num_codes:
        raise ProvqError(
            f"{meta.path}: the tokens use a codebook of {meta.num_codes} codes but {args.ckpt} "
            f"has {num_codes}; decode with the checkpoint that wrote the tokens"
        )
    wanted = set(args.keys) if args.keys else None
    found: set[str] = set()
    limited = False
    with Progress() as progress, torch.inference_mode():
        task = progress.add_task("decoding", total=args.limit)
        for number, (key, codes) in enumerate(read_codes(args.tokens, num_codes), 1):
            if wanted is not None and key not in wanted:
                continue
            try:
                model.decode_tokens_to_file(key, codes, args.out)
            except ValueError as err:  # the model's own check of the codes
                raise ProvqError(f"{args.tokens}: record {number} {key!r} cannot be decoded "
                                 f"({str(err).splitlines()[0]}); {RETOKENIZE}") from None
            found.add(key)
            progress.advance(task)
            if args.limit is not None and len(found) >= args.limit:
                limited = True
                break
    if not found:
        what = (f"none of --keys {sorted(wanted)[:5]} is a record of {args.tokens}; check "
                "the keys" if wanted else f"{args.tokens} holds no records; {RETOKENIZE}")
        raise ProvqError(f"nothing decoded: {what}")
    if wanted is not None and not limited and wanted - found:
        missing = sorted(wanted - found)
        print(f"provq-decode: warning: {len(missing)} of --keys not in {args.tokens}: "
              f"{missing[:5]}", file=sys.stderr)
    print(f"decoded {len(found)} items to {args.out}")


if __name__ == "__main__":
    tokenize_main()
