"""``make demo``'s embedding figure loads each run's checkpoint (weights-only) and draws it."""

from __future__ import annotations

import json

from tests.helpers import short_topodisc_run


def test_embedding_panel_draws_a_finished_run(tmp_path):
    from provq_lightning.tools.demo import embedding_panel

    run = short_topodisc_run(tmp_path, version="seed_0")
    assert "val/mse_triangle" in json.loads((run / "metrics.json").read_text())
    figure = tmp_path / "embeddings.png"
    embedding_panel(tmp_path, ["provq"], 0, figure)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
