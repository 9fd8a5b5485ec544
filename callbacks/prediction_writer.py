"""``CodePredictionWriter``: ``provq-fit predict`` writes the codes ``provq-tokenize`` writes.

``provq-fit predict`` adds one by default (unless the config brings its own prediction writer);
each model's ``predict_step`` returns ``(key, codes)`` pairs from its ``tokenize_batch`` hook and
this callback hands them to ``provq-tokenize``'s own ``CodeWriter``, so the output folder reads
back with ``provq-decode`` and ``provq_lightning.tokens.reader`` like any ``provq-tokenize``
output. Configure it like any callback, e.g.::

    provq-fit predict --config run/config.yaml --ckpt_path run/checkpoints/last.ckpt \\
        --trainer.callbacks+=provq_lightning.callbacks.prediction_writer.CodePredictionWriter \\
        --trainer.callbacks.output_dir tokens/ --trainer.callbacks.format wds
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from provq_lightning.errors import ProvqError
from provq_lightning.tokenizer import VQTokenizer
from provq_lightning.tokens.reader import FORMATS
from provq_lightning.tokens.writer import CodeWriter, code_dtype


class CodePredictionWriter(BasePredictionWriter):
    """Write the codes of every predicted item as ``provq-tokenize --format <format>`` does.

    Args:
        output_dir: the output folder; default ``<run dir>/predictions``, the run directory
            being the logger's (``trainer.log_dir``) of this ``provq-fit predict`` run. Under
            DDP each rank writes its own ``rank_<N>`` folder inside it.
        format: ``npy``, ``wds`` or ``fasta`` (see ``provq-tokenize --help``).
        shard_size: items per ``wds`` shard.
    """

    def __init__(
        self, output_dir: str | None = None, format: str = "npy", shard_size: int = 10000
    ) -> None:
        super().__init__(write_interval="batch")
        if format not in FORMATS:
            raise ProvqError(
                f"CodePredictionWriter format: {format!r} is not allowed; choose one of "
                f"{', '.join(FORMATS)}"
            )
        self.output_dir = output_dir
        self.format = format
        self.shard_size = shard_size
        self.out: Path | None = None
        self._writer: CodeWriter | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        # trainer.log_dir is a broadcast under DDP: every rank asks, before any rank writes.
        base = self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "predictions"
        out = Path(base)
        self.out = out / f"rank_{trainer.global_rank}" if trainer.world_size > 1 else out

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not isinstance(pl_module, VQTokenizer):
            raise ProvqError(
                f"CodePredictionWriter: {type(pl_module).__name__} has no quantizer, so there are "
                "no codes to write; predict with a provq tokenizer (a VQTokenizer)"
            )
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
        for key, codes in prediction:
            self._writer.add(key, codes)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        model = type(pl_module)
        writer.close({
            "num_codes": pl_module.quantizer.num_codes,
            "checkpoint": None if trainer.ckpt_path is None else str(trainer.ckpt_path),
            "model": f"{model.__module__}.{model.__qualname__}",
            "split": "predict",
        })
        print(f"[provq] wrote codes of {writer.count} items to {self.out} ({self.format})")
