"""Worker for test_sync_decisions.py: one rank of a raw 2-process gloo group.

Builds everything that could decide about cross-rank syncing (the codebook-usage metric, a
tokenizer with its metric, and a question to ``provq_lightning.vq.distributed``) *before* the
process group exists, then creates the group and uses them, saving what each rank got.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from provq_lightning.topodisc import TopoDiscTokenizer
from provq_lightning.vq import distributed
from provq_lightning.vq.codebook_metrics import CodebookUsage

NUM_CODES = 8
# Codes 5..7 are used only on rank 1, code 0 only on rank 0.
IDS = {0: [0, 1, 1, 2, 3, 3, 3], 1: [1, 2, 4, 5, 6, 7, 7, 7, 7]}


def rows_of(rank: int) -> torch.Tensor:
    """Rank-specific rows; the ranks hold different row counts."""
    return torch.arange(3 * (rank + 2), dtype=torch.float32).view(-1, 3) + 100 * rank


def build_model() -> TopoDiscTokenizer:
    torch.manual_seed(0)  # the same codebook in every process, and in the test's reference
    return TopoDiscTokenizer(num_codes=NUM_CODES)


def worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    usage = CodebookUsage(NUM_CODES)
    model = build_model()  # its codebook-usage metric too, before the group exists
    asked_before = (distributed.is_distributed(), distributed.rank())

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        ids = torch.tensor(IDS[rank])
        usage.update(ids)
        model.update_codebook_metrics(ids)
        result = {
            "asked_before": asked_before,
            "asked_after": (distributed.is_distributed(), distributed.rank()),
            "histogram": usage.compute()["histogram"],
            "metrics": model.codebook_metrics(),
            "gathered": distributed.gather_rows(rows_of(rank)),
            "broadcast": distributed.broadcast_tensor(torch.full((2,), 10.0 + rank), src=0),
        }
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out) / f"rank{rank}.pt")
