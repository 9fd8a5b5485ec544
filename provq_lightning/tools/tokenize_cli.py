"""``provq-tokenize`` / ``provq-decode``: dataset -> discrete codes -> reconstructions.

Generic over modalities: the model and datamodule come from a run's ``config.yaml`` (the one
``provq-fit`` writes; found next to the checkpoint's ``checkpoints/`` folder by default), the
weights from a checkpoint, and the work from two members of the tokenizer contract
(``provq_lightning.tokenizer.CONTRACT``, checked when the run is loaded):
``tokenize_batch(batch) -> [(key, int codes)]`` and
``decode_tokens_to_file(key, codes, out_dir) -> path``.

Output formats (``--format``; written by ``provq_lightning.tokens.writer``), each with
``meta.json`` (format, number of codes, code shape):

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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from rich.progress import Progress

from provq_lightning.errors import ProvqError
from provq_lightning.runs.loading import dataloader, load_run
from provq_lightning.tokens.reader import FORMATS, RETOKENIZE, read_codes, read_meta
from provq_lightning.tokens.staging import check_output_folder, staged_output
from provq_lightning.tokens.writer import LLAMAGEN, CodeWriter, code_dtype

SPLITS = ("predict", "val", "test", "train")


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
    if args.format != LLAMAGEN:
        check_output_folder(args.out)  # before minutes of loading and tokenizing
    model, cfg = load_run(args.ckpt, args.config, args.data_config, args.device)
    if args.format == LLAMAGEN:
        _tokenize_llamagen(args, model, cfg)
        return
    loader, _ = dataloader(cfg, args.split)
    with staged_output(args.out) as out:
        writer = CodeWriter(out, args.format, code_dtype(model.quantizer.num_codes),
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
