"""An ESM3 or StructTokenBench structure tokenizer written as a provq run.

``provq-tokenize`` and ``provq-decode`` read a run: its ``config.yaml`` and a checkpoint. This
writes both for a model loaded by ``ProteinTokenizer.from_esm3`` / ``from_structtokenbench``
(``protein/esm3.py``), so a folder of structures can be tokenized with ESM3's or
StructTokenBench's codebook (the data comes from ``--data-config``)::

    python -m provq_lightning.protein.esm3_convert --esm3 esm3_structure_encoder_v0.pth \\
        --esm3-decoder esm3_structure_decoder_v0.pth --out runs/esm3
    provq-tokenize --ckpt runs/esm3/checkpoints/converted.ckpt --data-config data.yaml \\
        --out runs/esm3_tokens
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from provq_lightning.errors import ProvqError
from provq_lightning.protein.esm3 import DEEPSPEED_FILE, HEAD_DIM
from provq_lightning.protein.tokenizer import ProteinTokenizer
from provq_lightning.runs.migrations import mark_format

CHECKPOINT_NAME = "converted.ckpt"


def write_run(model: ProteinTokenizer, out: str | Path) -> Path:
    """``out/config.yaml`` (the model section) and ``out/checkpoints/converted.ckpt``; returns
    the checkpoint's path."""
    out = Path(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    # The weights are in the checkpoint: the config must not send a reader back to the files.
    init_args = {k: v for k, v in dict(model.hparams).items() if k != "init_from"}
    cls = type(model)
    config = {"model": {"class_path": f"{cls.__module__}.{cls.__qualname__}",
                        "init_args": init_args}}
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": init_args}
    mark_format(checkpoint)
    path = out / "checkpoints" / CHECKPOINT_NAME
    torch.save(checkpoint, path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m provq_lightning.protein.esm3_convert",
        description="Write an ESM3 or StructTokenBench structure tokenizer as a provq run.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--esm3", type=Path, help="ESM3's esm3_structure_encoder_v0.pth")
    source.add_argument("--structtokenbench", type=Path,
                        help="a StructTokenBench DeepSpeed checkpoint folder (or its "
                        f"{DEEPSPEED_FILE})")
    parser.add_argument("--esm3-decoder", type=Path,
                        help="with --esm3: ESM3's esm3_structure_decoder_v0.pth")
    parser.add_argument("--decoder-heads", type=int,
                        help=f"decoder attention heads (default: width / {HEAD_DIM})")
    parser.add_argument("--out", type=Path, required=True, help="the run folder to write")
    args = parser.parse_args(argv)
    try:
        if args.esm3_decoder is not None and args.esm3 is None:
            raise ProvqError("--esm3-decoder goes with --esm3 (the encoder it decodes)")
        overrides = {} if args.decoder_heads is None else {"decoder_heads": args.decoder_heads}
        if args.esm3 is not None:
            model = ProteinTokenizer.from_esm3(args.esm3, args.esm3_decoder, **overrides)
        else:
            model = ProteinTokenizer.from_structtokenbench(args.structtokenbench, **overrides)
        path = write_run(model, args.out)
    except ProvqError as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    print(f"wrote {path}; tokenize with: provq-tokenize --ckpt {path} --data-config DATA.yaml "
          "--out TOKENS")


if __name__ == "__main__":
    main()
