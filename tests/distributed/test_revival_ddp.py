"""Dead-code revival under 2-process gloo DDP keeps one codebook on every rank, equal to a single
process that sees both ranks' latents (counts summed, candidates gathered, same draws)."""

from __future__ import annotations

import torch

from tests.distributed import launch, revival_worker


def test_revival_under_ddp_matches_one_process_and_ranks_agree(tmp_path):
    ctx = launch.forkserver()
    port = launch.free_port()
    procs = [
        ctx.Process(target=revival_worker.worker, args=(rank, port, str(tmp_path)))
        for rank in (0, 1)
    ]
    for proc in procs:
        proc.start()
    assert launch.join(procs, timeout=120) == [0, 0]
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    single = revival_worker.build_quantizer()
    books = torch.stack(revival_worker.train(single, None))
    assert torch.equal(got[0]["books"], got[1]["books"])
    assert torch.equal(got[0]["books"], books)
    assert int(got[0]["revived"]) > 0
    # Some code moved to rank 1's region, which rank 0 never saw itself.
    assert (got[0]["books"][-1] - 10.0).norm(dim=1).min() < 3.0
