"""provq-make-shards on the shared photos, then 2-process DDP (gloo) training from the shards:
every image is seen exactly once per epoch across the ranks, and both ranks run the same
number of steps although the shards are uneven."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from provq_lightning.image.make_shards import main as make_shards
from provq_lightning.image.make_shards import sample_key

REPO = Path(__file__).resolve().parents[2]


def test_two_rank_epoch_sees_every_photo_once(sample_photos, tmp_path):
    shards = tmp_path / "shards"
    make_shards([str(sample_photos), str(shards), "--shard-size", "130"])  # 6 x 130 + 20
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "image" / "ddp_shards_run.py"),
         str(shards / "index.json"), str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [(tmp_path / f"keys_rank{r}.txt").read_text().split() for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 400  # 25 batches of 16 on each rank
    seen = ranks[0] + ranks[1]
    photos = {p.stem for p in sample_photos.iterdir()}
    assert len(photos) == 800 and len(set(seen)) == 800
    assert set(seen) == {sample_key(p.split("_")[0], p) for p in photos}
