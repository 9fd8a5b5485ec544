"""``CodePredictionWriter``: ``provq-fit predict`` writes the codes ``provq-tokenize`` writes.

``provq-fit predict`` adds one by default (unless the config brings its own prediction writer);
each model's ``predict_step`` returns ``(key, codes)`` pairs from its ``tokenize_batch`` hook and
this callback hands them to ``provq-tokenize``'s own ``CodeWriter``, so the output folder reads
back with ``provq-decode`` and ``provq_lightning.tokens.reader`` like any ``provq-tokenize``
output. Configure it like any callback, e.g.::

    provq-fit predict --config run/config.yaml --ckpt_path run/checkpoints/last.ckpt \\
        --trainer.callbacks+=provq_lightning.callbacks.prediction_writer.CodePredictionWriter \\
        --trainer.callbacks.output_dir tokens/ --trainer.callbacks.format wds

``format: llamagen`` (image tokenizers) writes LlamaGen's numbered code and label files
(``provq_lightning.image.llamagen_codes``), the files ``provq-tokenize --format llamagen``
writes. Under DDP every rank writes its share into one hidden staging folder beside the output
folder and rank 0 numbers them all into one LlamaGen folder, then renames it into place, so the
output folder appears whole or not at all (the output folder must be on a file system every
rank sees).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import IterableDataset

from provq_lightning.errors import ProvqError
from provq_lightning.tokenizer import VQTokenizer
from provq_lightning.tokens.reader import FORMATS
from provq_lightning.tokens.staging import (
    NO_SPACE,
    begin_staging,
    commit_staging,
    discard_staging,
    no_space_error,
    staging_folder,
)
from provq_lightning.tokens.writer import LLAMAGEN, CodeWriter, code_dtype


class CodePredictionWriter(BasePredictionWriter):
    """Write the codes of every predicted item as ``provq-tokenize --format <format>`` does.

    Args:
        output_dir: the output folder; default ``<run dir>/predictions``, the run directory
            being the logger's (``trainer.log_dir``) of this ``provq-fit predict`` run. Under
            DDP each rank writes its own ``rank_<N>`` folder inside it, except for
            ``llamagen``, whose ranks' shares are merged into the one folder.
        format: ``npy``, ``wds``, ``fasta`` or ``llamagen`` (see ``provq-tokenize --help``).
        shard_size: items per ``wds`` shard.
        image_size: ``llamagen``: the crop size S of the codes' file names
            (``imagenet<S>_codes``); default the datamodule's ``image_size``. Needed with
            ``ten_crop``, where the datamodule's ``image_size`` is the larger centre crop.
        ten_crop: ``llamagen``: LlamaGen's ten crops of a centre crop of
            ``int(image_size * crop_range)`` (set ``--data.init_args.image_size`` to it)
            instead of the image and its horizontal flip.
        crop_range: ``llamagen`` with ``ten_crop``: the enlargement of that centre crop.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        format: str = "npy",
        shard_size: int = 10000,
        image_size: int | None = None,
        ten_crop: bool = False,
        crop_range: float = 1.1,
    ) -> None:
        super().__init__(write_interval="batch")
        if format not in (*FORMATS, LLAMAGEN):
            raise ProvqError(
                f"CodePredictionWriter format: {format!r} is not allowed; choose one of "
                f"{', '.join((*FORMATS, LLAMAGEN))}"
            )
        if format != LLAMAGEN and (ten_crop or image_size is not None):
            raise ProvqError("CodePredictionWriter image_size and ten_crop only apply to format "
                             "llamagen; drop them or set format llamagen")
        if ten_crop and crop_range < 1:
            raise ProvqError(f"CodePredictionWriter crop_range {crop_range} is below 1; the ten "
                             "crops are cut from a larger centre crop: use e.g. 1.1")
        self.output_dir = output_dir
        self.format = format
        self.shard_size = shard_size
        self.image_size = image_size
        self.ten_crop = ten_crop
        self.crop_range = crop_range
        self.out: Path | None = None
        self._writer: CodeWriter | None = None
        self._llamagen: _LlamaGenShares | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        # trainer.log_dir is a broadcast under DDP: every rank asks, before any rank writes.
        base = self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "predictions"
        out = Path(base)
        if self.format == LLAMAGEN:
            self.out = out
            size = self._llamagen_size(trainer)
            self._llamagen = _LlamaGenShares(trainer, out, size, self.ten_crop)
            return
        self.out = out / f"rank_{trainer.global_rank}" if trainer.world_size > 1 else out

    def _llamagen_size(self, trainer: Trainer) -> int:
        """The crop size S of the LlamaGen files, checked against the datamodule's image size."""
        from provq_lightning.image.llamagen_codes import ten_crop_source_size

        data = trainer.datamodule
        size = (getattr(data, "hparams", None) or {}).get("image_size")
        if not isinstance(size, int):
            raise ProvqError(
                "CodePredictionWriter format llamagen needs an image datamodule with "
                f"init_args.image_size (the crop size); {type(data).__name__} has {size!r}")
        if not self.ten_crop:
            if self.image_size not in (None, size):
                raise ProvqError(
                    f"CodePredictionWriter image_size {self.image_size} is not the datamodule's "
                    f"image_size {size} (the two views are the whole crop); drop it or set "
                    f"--data.init_args.image_size {self.image_size}")
            return size
        if self.image_size is None:
            raise ProvqError(
                "CodePredictionWriter ten_crop needs image_size, the size S of the ten crops "
                "(the datamodule's image_size is the centre crop int(S * crop_range) they are "
                f"cut from), e.g. image_size {int(size / self.crop_range)}")
        source = ten_crop_source_size(self.image_size, self.crop_range)
        if source != size:
            raise ProvqError(
                f"CodePredictionWriter ten_crop: the ten {self.image_size}px crops are cut from "
                f"a {source}px centre crop (image_size x crop_range {self.crop_range}), but the "
                f"datamodule's image_size is {size}; set --data.init_args.image_size {source}")
        return self.image_size

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not isinstance(pl_module, VQTokenizer):
            raise ProvqError(
                f"CodePredictionWriter: {type(pl_module).__name__} has no quantizer, so there are "
                "no codes to write; predict with a provq tokenizer (a VQTokenizer)"
            )
        if self._llamagen is not None:
            self._llamagen.start()
            return
        dtype = code_dtype(pl_module.quantizer.num_codes)
        self._writer = CodeWriter(self.out, self.format, dtype, self.shard_size)

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if self._llamagen is not None:
            self._llamagen.add_batch(pl_module, batch, batch_indices)
            return
        for key, codes in prediction:
            self._writer.add(key, codes)

    def _meta(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        model = type(pl_module)
        return {
            "num_codes": pl_module.quantizer.num_codes,
            "checkpoint": None if trainer.ckpt_path is None else str(trainer.ckpt_path),
            "model": f"{model.__module__}.{model.__qualname__}",
            "split": "predict",
        }

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._llamagen is not None:
            shares, self._llamagen = self._llamagen, None
            meta = {**self._meta(trainer, pl_module), "ten_crop": self.ten_crop,
                    "image_size": shares.image_size}
            count = shares.finish(meta)
            if trainer.is_global_zero:
                print(f"[provq] wrote LlamaGen codes of {count} images to {self.out}")
            return
        writer, self._writer = self._writer, None
        if writer is None:
            return
        writer.close(self._meta(trainer, pl_module))
        print(f"[provq] wrote codes of {writer.count} items to {self.out} ({self.format})")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        shares, self._llamagen = self._llamagen, None
        if shares is not None:
            shares.abandon()


def local_share(trainer: Trainer) -> int:
    """How many items this rank will predict (batches for a stream that only knows those);
    -1 where the loader cannot say."""
    data = trainer.datamodule
    loader = data.predict_dataloader() if data is not None else None
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and not isinstance(dataset, IterableDataset):
        # Lightning's predict sampler deals items out rank by rank, without padding.
        return len(range(trainer.global_rank, len(dataset), trainer.world_size))
    try:
        return len(loader)
    except TypeError:
        return -1


class _LlamaGenShares:
    """``format: llamagen`` on one rank: its share of the images in the staging folder, and on
    rank 0 the merge into the one output folder (``provq_lightning.image.llamagen_codes``)."""

    def __init__(self, trainer: Trainer, out: Path, image_size: int, ten_crop: bool) -> None:
        self.trainer, self.out, self.image_size, self.ten_crop = trainer, out, image_size, ten_crop
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        # A rank without images skips the predict hooks, so the merge would wait for it forever.
        shares = trainer.strategy.all_gather(torch.tensor(local_share(trainer))).reshape(-1)
        empty = [rank for rank, share in enumerate(shares.tolist()) if share == 0]
        if len(empty) == self.world_size:
            raise ProvqError("CodePredictionWriter format llamagen: the predict set has no "
                             "images; check the data config")
        if empty:
            raise ProvqError(
                f"CodePredictionWriter format llamagen: rank(s) {empty} of {self.world_size} get "
                "no images of the predict set; predict on fewer devices")
        error, token = None, None
        if trainer.is_global_zero:
            try:
                begin_staging(out, os.getpid())
                token = os.getpid()
            except ProvqError as err:
                error = str(err)
            if "flip" not in str(out):
                print("provq-fit: warning: LlamaGen's CustomDataset keeps one random view per "
                      f"image only when its code path contains 'flip'; {out} does not (name it "
                      "like imagenet_code_c2i_flip_ten_crop)", file=sys.stderr)
        # Every rank stops with rank 0's refusal instead of waiting for it.
        error, token = trainer.strategy.broadcast((error, token), src=0)
        if error is not None:
            raise ProvqError(error)
        self.staged = staging_folder(out, token)
        self._share = None

    def share_folder(self, rank: int) -> Path:
        return self.staged / f"rank_{rank}"

    def start(self) -> None:
        from provq_lightning.image.llamagen_codes import LlamaGenCodeWriter

        self._share = LlamaGenCodeWriter(self.share_folder(self.rank), self.image_size)

    def add_batch(self, model: LightningModule, batch: Any,
                  batch_indices: Sequence[int] | None) -> None:
        from provq_lightning.image.llamagen_codes import tokenize_views

        items = tokenize_views(model, batch, self.image_size, self.ten_crop)
        # The dataset index orders images as one process would number them; without indices
        # (a stream), a batch short of an unreadable image, rank and position do.
        indexed = batch_indices is not None and len(batch_indices) == len(items)
        first = list(batch_indices)[:1] if batch_indices else []
        for i, (key, label, codes) in enumerate(items):
            if indexed:
                order = [int(batch_indices[i]), 0]
            elif first:
                order = [int(first[0]), i]
            else:
                order = [self.rank, self._share.count]
            try:
                self._share.add(key, label, codes, order)
            except OSError as err:
                if err.errno in NO_SPACE:
                    raise no_space_error(self.out) from None
                raise

    def finish(self, meta: dict[str, Any]) -> int:
        """Close this rank's share; rank 0 merges all and commits; returns the image count."""
        from provq_lightning.image.llamagen_codes import LlamaGenCodeWriter, merge_shares

        self._share.close({"rank": self.rank})
        self._share = None
        self.trainer.strategy.barrier("llamagen_shares_written")
        error, count = None, 0
        if self.trainer.is_global_zero:
            try:
                writer = LlamaGenCodeWriter(self.staged, self.image_size)
                shares = [self.share_folder(r) for r in range(self.world_size)]
                merge_shares(shares, writer)
                for share in shares:
                    shutil.rmtree(share)
                writer.close(meta)
                count = writer.count
                commit_staging(self.staged, self.out)
            except (ProvqError, OSError) as err:
                # Told to every rank below, so none waits for a merge that failed.
                discard_staging(self.staged)
                if isinstance(err, ProvqError):
                    error = str(err)
                elif err.errno in NO_SPACE:
                    error = str(no_space_error(self.out))
                else:
                    error = f"merging the ranks' LlamaGen codes into {self.out} failed: {err}"
        error, count = self.trainer.strategy.broadcast((error, count), src=0)
        if error is not None:
            raise ProvqError(error)
        return count

    def abandon(self) -> None:
        if self._share is not None:
            self._share.close({"rank": self.rank})
            self._share = None
        if self.trainer.is_global_zero:
            discard_staging(self.staged)
