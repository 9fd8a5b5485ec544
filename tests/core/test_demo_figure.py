"""``make demo``'s embedding figure loads each run's checkpoint (weights-only) and draws it."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import provq_fit

REPO = Path(__file__).resolve().parents[2]


def test_embedding_panel_draws_a_finished_run(tmp_path):
    from provq_lightning.tools.demo import embedding_panel

    provq_fit("--config", str(REPO / "experiments" / "topodisc_provq.yaml"),
              "--trainer.max_steps", "6", "--trainer.val_check_interval", "6",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--trainer.logger.init_args.version", "seed_0",
              "--curriculum.warmup_steps", "2", "--curriculum.transition_steps", "2",
              "--curriculum.kmeans_collect_batches", "1")
    run = tmp_path / "topodisc_provq" / "seed_0"
    assert "val/mse_triangle" in json.loads((run / "metrics.json").read_text())
    figure = tmp_path / "embeddings.png"
    embedding_panel(tmp_path, ["provq"], 0, figure)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
