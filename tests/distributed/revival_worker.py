"""Worker for test_revival_ddp.py: one rank of a raw 2-process gloo group training a quantizer
with dead-code revival, each rank on latents of its own region."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from provq_lightning.vq.quantizer import VectorQuantizer

NUM_CODES, DIM, STEPS = 8, 2, 40


def build_quantizer() -> VectorQuantizer:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(NUM_CODES, DIM, dead_code_threshold=0.2, dead_code_decay=0.8)
    # Every code starts near the origin, where no latent of either rank lies: all die.
    quantizer.set_codebook(torch.randn(NUM_CODES, DIM) * 0.01)
    return quantizer.train()


def latents_of(rank: int, step: int) -> torch.Tensor:
    # Rank 1's latents lie only around (10, 10): its region must win codes on rank 0 too.
    gen = torch.Generator().manual_seed(1000 * rank + step)
    centre = torch.tensor([10.0, 10.0]) if rank == 1 else torch.tensor([0.0, 0.0])
    return centre + torch.randn(16 + 4 * rank, DIM, generator=gen)


def train(quantizer: VectorQuantizer, rank: int | None) -> list[torch.Tensor]:
    """The codebook after every step; ``rank`` None: one process seeing both ranks' latents."""
    books = []
    for step in range(STEPS):
        if rank is None:
            z = torch.cat([latents_of(0, step), latents_of(1, step)])
        else:
            z = latents_of(rank, step)
        quantizer(z)
        books.append(quantizer.codebook().detach().clone())
    return books


def worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    quantizer = build_quantizer()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        books = train(quantizer, rank)
        result = {"books": torch.stack(books), "revived": quantizer.revival.revived_total}
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out) / f"rank{rank}.pt")
