"""No decision about cross-rank syncing is taken before the process group exists.

The metric, the tokenizer and a first question to ``provq_lightning.vq.distributed`` happen
before ``init_process_group`` (as in ``provq-fit``, which builds model, data and callbacks
before the Trainer creates the group). Had any of them cached "not distributed" (a cached
``is_distributed()``, ``sync_on_compute`` or a process group captured at construction), the
ranks would report their own histograms and rows instead of the reduced ones below.
"""

from __future__ import annotations

import torch

from tests.distributed import collectives, launch


def test_objects_built_before_the_process_group_still_sync(tmp_path):
    ctx = launch.forkserver()
    port = launch.free_port()
    procs = [
        ctx.Process(target=collectives.worker, args=(rank, port, str(tmp_path)))
        for rank in (0, 1)
    ]
    for proc in procs:
        proc.start()
    assert launch.join(procs, timeout=120) == [0, 0]
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    # What a single process sees over both ranks' data.
    all_ids = torch.tensor(collectives.IDS[0] + collectives.IDS[1])
    histogram = torch.bincount(all_ids, minlength=collectives.NUM_CODES)
    model = collectives.build_model()
    model.update_codebook_metrics(all_ids)
    metrics = model.codebook_metrics()
    rows = torch.cat([collectives.rows_of(0), collectives.rows_of(1)])

    for rank, result in enumerate(got):
        assert result["asked_before"] == (False, 0)
        assert result["asked_after"] == (True, rank)
        assert torch.equal(result["histogram"], histogram)
        assert result["metrics"].keys() == metrics.keys()
        for key, value in metrics.items():
            assert torch.equal(result["metrics"][key], value), key
        assert torch.equal(result["gathered"], rows)  # uneven row counts, in rank order
        assert torch.equal(result["broadcast"], torch.full((2,), 10.0))
    # Codes only rank 1 used count as used on rank 0 too (rank 0 alone leaves 4 dead).
    assert got[0]["metrics"]["val/dead_codes"] == 0
