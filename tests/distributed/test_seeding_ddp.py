"""ProVQ under 2-process gloo DDP, launched as 2 devices on one node and as 2 nodes of 1 device.

Rank 0 trains on the TopoDisc disk only and rank 1 on the triangle only (``RankSplitTopoDisc``),
so "seeded from vectors of all ranks" is observable: the k-means reservoir must hold encoder
outputs that only rank 1 produced, every rank must end up with the same codebook (k-means of
that reservoir), and the curriculum state must agree on all ranks at every step. The
validation metrics of the DDP run must equal a single process validating the same checkpoint
on the same data. The model builds its codebook-usage metric in ``__init__``, before the
process group exists, so a sync decision taken at construction would show up here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from provq_lightning.vq.codebook_metrics import CODEBOOK_METRIC_NAMES
from provq_lightning.vq.kmeans import kmeans
from tests.core.helpers import read_records as read
from tests.distributed import launch
from tests.helpers import effective_config

REPO = Path(__file__).resolve().parents[2]
WARMUP, TRANSITION, STEPS, COLLECT, K = 20, 10, 40, 4, 16
CODEBOOK_METRICS = tuple(f"val/{name}" for name in CODEBOOK_METRIC_NAMES)


def write_config(tmp: Path, version: str, records: bool) -> Path:
    config = effective_config(REPO / "experiments" / "topodisc_provq.yaml")
    trainer = config["trainer"]
    trainer.update(
        max_steps=STEPS,
        val_check_interval=10,
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer["logger"]["init_args"].update(save_dir=str(tmp), name="topodisc", version=version)
    (checkpoint,) = trainer["callbacks"]
    config["curriculum"].update(
        warmup_steps=WARMUP, transition_steps=TRANSITION, kmeans_collect_batches=COLLECT
    )
    checkpoint["init_args"].update(every_n_train_steps=10)
    if records:
        for name, path in [("RecordCurriculum", "curriculum"), ("RecordSeeding", "seeding")]:
            suffix = "jsonl" if name == "RecordCurriculum" else "pt"
            trainer["callbacks"].append(
                {
                    "class_path": f"tests.core.helpers.{name}",
                    "init_args": {"path": str(tmp / f"{path}_rank{{rank}}.{suffix}")},
                }
            )
    config["model"] = {
        "class_path": "tests.distributed.models.EagerMetricsTopoDisc",
        "init_args": {"num_codes": K},
    }
    config["data"] = {
        "class_path": "tests.distributed.models.RankSplitTopoDisc",
        "init_args": {"seed": 0, "steps_per_epoch": 10},
    }
    path = tmp / f"{version}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rows_in(rows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """For each row, whether it equals (exactly) some row of ``candidates``."""
    return (rows[:, None, :] == candidates[None, :, :]).all(dim=-1).any(dim=1)


@pytest.mark.parametrize("mode", launch.LAUNCH_MODES)
def test_kmeans_seeding_curriculum_and_metrics_agree_across_ranks(tmp_path, mode):
    argv = ["fit", "--config", str(write_config(tmp_path, "ddp", records=True))]
    logs = [tmp_path / f"rank{r}.log" for r in (0, 1)]
    codes = launch.ddp_fit(argv, logs, mode=mode)
    assert codes == [0, 0], "".join(log.read_text() for log in logs)[-3000:]

    # The curriculum state, the codebook at every step, the validation metrics and the
    # callback's final state are identical on both ranks.
    records = [read(tmp_path / f"curriculum_rank{r}.jsonl") for r in (0, 1)]
    assert records[0] == records[1]
    train = {row["step"]: row for row in records[0]["train"]}
    assert sorted(train) == list(range(STEPS))
    assert [train[s]["phase"] for s in (WARMUP - 1, WARMUP, WARMUP + TRANSITION)] == [0, 1, 2]
    end = records[0]["end"][0]["state"]
    assert end == {
        "seeded": True,
        "seed_count": 1,
        "seeded_at_step": WARMUP,
        "reservoir_batches": COLLECT,
        "reservoir_empty": True,
    }

    # The reservoir k-means ran on: identical on both ranks, made only of encoder outputs of
    # the collection steps, and holding outputs of both ranks, i.e. of the triangle, which
    # only rank 1 trains on.
    seeding = [torch.load(tmp_path / f"seeding_rank{r}.pt") for r in (0, 1)]
    reservoir = seeding[0]["reservoir"]
    assert torch.equal(reservoir, seeding[1]["reservoir"])
    assert reservoir.shape == (16 * K, 2)
    assert [len(s["latents"]) for s in seeding] == [COLLECT, COLLECT]
    assert [s["latents"][0].shape[0] for s in seeding] == [400, 275]  # disk | triangle
    latents = [torch.cat(s["latents"]) for s in seeding]
    from_rank = [rows_in(reservoir, lat) for lat in latents]
    assert bool((from_rank[0] | from_rank[1]).all())
    assert not bool((from_rank[0] & from_rank[1]).any())  # the ranks' data are disjoint
    only_rank1 = int(from_rank[1].sum())
    assert 0 < only_rank1 < reservoir.shape[0]

    # The codebook every rank holds from step WARMUP on is k-means of that reservoir, and it
    # places codes on rank 1's outputs: more codes have a rank-1 output as nearest neighbour
    # than a reservoir without rank 1 could give (none).
    seeded = torch.tensor(train[WARMUP]["codebook"])
    assert not torch.equal(seeded, torch.tensor(train[WARMUP - 1]["codebook"]))
    expected = kmeans(reservoir, K, iters=100, seed=0).centers
    torch.testing.assert_close(seeded, expected, atol=1e-5, rtol=0)
    nearest_rank1 = torch.cdist(seeded, latents[1][-275:]).min(dim=1).values
    nearest_rank0 = torch.cdist(seeded, latents[0][-400:]).min(dim=1).values
    codes_on_rank1 = int((nearest_rank1 < nearest_rank0).sum())
    assert codes_on_rank1 >= K // 4, codes_on_rank1
    print(
        f"\n[{mode}] reservoir: {only_rank1}/{reservoir.shape[0]} rows from rank 1 only; "
        f"{codes_on_rank1}/{K} seeded codes nearest to rank-1 outputs; "
        f"max |seeded - kmeans(reservoir)| = {(seeded - expected).abs().max().item():.2e}"
    )

    # Validation metrics of the DDP run (histogram reduced across ranks) equal one process
    # validating the same final checkpoint on the same validation set.
    run_dir = tmp_path / "topodisc" / "ddp"
    ddp_metrics = json.loads((run_dir / "metrics.json").read_text())
    assert ddp_metrics["global_step"] == STEPS
    assert records[0]["val"][-1]["step"] == STEPS
    assert records[0]["val"][-1]["metrics"] == {
        k: v for k, v in ddp_metrics.items() if k.startswith("val/")
    }
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    config = write_config(tmp_path, "single", records=False)
    argv = ["validate", "--config", str(config), "--ckpt_path", str(ckpt)]
    assert launch.fit(argv, tmp_path / "single.log") == 0, (tmp_path / "single.log").read_text()
    single = json.loads((tmp_path / "topodisc" / "single" / "metrics.json").read_text())
    # An evaluation's metrics.json also names the checkpoint, and its step is the checkpoint's.
    assert single.keys() == ddp_metrics.keys() | {"checkpoint"}
    assert single["global_step"] == STEPS and single["checkpoint"] == str(ckpt.resolve())
    for key in CODEBOOK_METRICS:
        assert single[key] == ddp_metrics[key], key
    for key in ("val/mse", "val/mse_disk", "val/mse_triangle"):
        assert single[key] == pytest.approx(ddp_metrics[key], rel=1e-6, abs=0), key
    diffs = {k: abs(single[k] - ddp_metrics[k]) for k in single if k.startswith("val/")}
    print(f"[{mode}] DDP vs single-process metrics, |diff|: {diffs}")
