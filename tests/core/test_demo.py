"""``make demo``: the TopoDisc sweep file's tasks in the demo's run directories, and its table."""

from __future__ import annotations

from provq_lightning.tools import demo


def test_demo_runs_the_topodisc_sweep_file_in_its_own_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(demo.REPO)  # as demo.main does: the file's config paths are relative
    sweep = demo.demo_sweep(["provq", "vanilla"], [0, 3], max_steps=50)
    assert [t.name for t in sweep.tasks] == [
        "vanilla-seed0", "vanilla-seed3", "provq-seed0", "provq-seed3"
    ]
    task = sweep.tasks[3]
    assert tmp_path / task.run_dir == demo.run_dir(tmp_path, "provq", 3)
    pairs = dict(zip(task.args[::2], task.args[1::2], strict=True))
    assert pairs["--config"] == "experiments/topodisc_provq.yaml"
    assert pairs["--seed_everything"] == pairs["--data.init_args.seed"] == "3"
    assert pairs["--trainer.max_steps"] == "50"


def test_summary_table_is_mean_sd_per_variant_against_vanilla():
    def run(disk: float, triangle: float) -> dict[str, float]:
        return {"val/mse_disk": disk, "val/mse_triangle": triangle, "val/mse": 0.05,
                "val/utilization": 1.0, "val/perplexity": 20.0}

    results = {"vanilla": [run(0.02, 0.2), run(0.03, 0.1)], "provq": [run(0.03, 0.0375)]}
    summary = demo.summarize(results)
    assert summary["provq"]["triangle_improvement"] == 0.75
    assert demo.summary_markdown(results, summary, [0, 1]).splitlines() == [
        "| variant | MSE disk | MSE triangle | MSE all | utilization | triangle vs vanilla |",
        "|---|---|---|---|---|---|",
        "| vanilla | 0.0250 ± 0.0071 | 0.1500 ± 0.0707 | 0.0500 | 1.00 | baseline |",
        "| provq | 0.0300 ± 0.0000 | 0.0375 ± 0.0000 | 0.0500 | 1.00 | -75.0% |",
        "",
        "Mean ± std over seeds 0, 1; hard-quantized validation.",
    ]
