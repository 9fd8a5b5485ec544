"""Live monitoring: what a real TopoDisc run writes to TensorBoard, and ``make tensorboard``.

A short ProVQ run (warmup 20, transition 20, 60 steps) is read back from its event files: the
losses, the curriculum's alpha/omega/phase and the legend of the phase values, the codebook
metrics (validations inside warmup under ``val_warmup/``), code usage as shares and as counts,
the embedding figure, and no ``hp_metric`` placeholder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from provq_lightning.vq.codebook_metrics import CODEBOOK_METRIC_NAMES
from tests.helpers import effective_config

REPO = Path(__file__).resolve().parents[2]
WARMUP, TRANSITION, STEPS = 20, 20, 60

SCALARS = {
    "train/loss",
    "train/recon",
    "train/vq",
    "curriculum/alpha",
    "curriculum/omega",
    "curriculum/phase",
    "val/mse",
    "val/mse_disk",
    "val/mse_triangle",
    *(f"val/{name}" for name in CODEBOOK_METRIC_NAMES),
}


def fit_config(config: dict, tmp: Path) -> None:
    """Write ``config`` into ``tmp`` and run ``provq-fit`` on it, failing with its stderr."""
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "provq_lightning.tools.fit", "fit", "--config", str(path)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tb")
    config = effective_config(REPO / "experiments" / "topodisc_provq.yaml")
    trainer = config["trainer"]
    trainer.update(
        max_steps=STEPS,
        val_check_interval=10,
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer["logger"]["init_args"].update(save_dir=str(tmp), name="topodisc", version="run")
    config["curriculum"].update(
        warmup_steps=WARMUP, transition_steps=TRANSITION, kmeans_collect_batches=4
    )
    config["model"]["init_args"].update(num_codes=16, figure_every_n_steps=30)
    config["data"]["init_args"].update(steps_per_epoch=10)
    fit_config(config, tmp)
    return tmp / "topodisc" / "run"


@pytest.fixture(scope="module")
def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    return acc


def series(events, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_scalars_cover_losses_curriculum_and_codebook_metrics(events, run_dir):
    tags = set(events.Tags()["scalars"])
    assert SCALARS <= tags, sorted(SCALARS - tags)
    assert "hp_metric" not in tags  # the configs turn TensorBoard's -1 placeholder off
    assert len(series(events, "train/loss")) == STEPS // 5
    # One validation per epoch (every 10 steps); those inside warmup (after steps 10 and 20: a
    # codebook not yet seeded) go under val_warmup/, so their spikes do not flatten val/.
    # (Lightning writes validation scalars at the last training step, 9 for step 10's.)
    util = series(events, "val/utilization")
    assert [step for step, _ in util] == [29, 39, 49, 59]
    assert [step for step, _ in series(events, "val_warmup/utilization")] == [9, 19]
    assert [step for step, _ in series(events, "val_warmup/mse")] == [9, 19]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert util[-1][1] == pytest.approx(metrics["val/utilization"])


def test_phase_values_are_explained_in_tensorboard(events):
    from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata

    from provq_lightning.reporting.curriculum_tags import PHASE_CHART

    (legend,) = events.Tensors("curriculum/phase_legend/text_summary")
    text = legend.tensor_proto.string_val[0].decode()
    assert "0 = warmup" in text and "1 = soft transition" in text and "2 = hard VQ" in text
    (layout,) = events.Tensors(custom_scalar_metadata.CONFIG_SUMMARY_TAG)
    assert PHASE_CHART.encode() in layout.tensor_proto.string_val[0]


def test_alpha_omega_and_phase_follow_the_curriculum(events):
    alpha = series(events, "curriculum/alpha")
    omega = dict(series(events, "curriculum/omega"))
    phase = dict(series(events, "curriculum/phase"))
    values = [a for _, a in alpha]
    assert values == sorted(values, reverse=True)  # the ramp only goes down
    for step, a in alpha:
        if step < WARMUP:
            assert a == 1.0 and phase[step] == 0
        elif step < WARMUP + TRANSITION:
            assert 0.0 < a < 1.0 and phase[step] == 1
            assert omega[step] == pytest.approx(0.5 + 0.5 * (1 - a))  # lam = 0.5
        else:
            assert a == 0.0 and phase[step] == 2 and omega[step] == 1.0


def test_embedding_figures_are_logged_as_images(events):
    assert "val/embeddings" in events.Tags()["images"]
    images = events.Images("val/embeddings")
    assert [im.step for im in images] == [30, 60]  # every 30 steps
    assert all(im.width > 200 and im.height > 200 for im in images)
    assert images[0].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"


def test_code_usage_is_logged_as_shares_and_as_counts(events):
    shares, counts = events.Histograms("val/code_usage"), events.Histograms("val/code_use_counts")
    assert [h.step for h in shares] == [h.step for h in counts] == [30, 40, 50, 60]
    assert [h.step for h in events.Histograms("val_warmup/code_usage")] == [10, 20]
    for share, count in zip(shares, counts, strict=True):
        assert share.histogram_value.num == count.histogram_value.num == 16  # one per code
        assert share.histogram_value.sum == pytest.approx(1.0)  # each code's share of uses
        assert share.histogram_value.max <= 1.0 < count.histogram_value.max
        assert count.histogram_value.sum == 675  # every validation point has one code


TENSORBOARD_CONFIGS = sorted(
    path.relative_to(REPO / "experiments") for path in (REPO / "experiments").rglob("*.yaml")
    if "loggers.TensorBoardLogger" in path.read_text()
)


@pytest.mark.parametrize("config", TENSORBOARD_CONFIGS, ids=str)
def test_every_shipped_tensorboard_logger_turns_the_hp_metric_placeholder_off(config):
    loggers = [line for line in (REPO / "experiments" / config).read_text().splitlines()
               if "default_hp_metric:" in line]
    assert [line.split(":")[1].split("#")[0].strip() for line in loggers] == ["false"], (
        f"add default_hp_metric: false to the TensorBoardLogger init_args of {config}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_tensorboard_serves_the_run(run_dir):
    port = free_port()
    logdir = run_dir.parent.parent
    server = subprocess.Popen(
        ["make", "-s", "tensorboard", f"RUN={logdir}", f"TB_PORT={port}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped with make's children below
    )
    try:
        deadline = time.monotonic() + 90
        runs = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as r:
                    runs = json.loads(r.read())
                if runs:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert server.poll() is None, server.stdout.read().decode()[-2000:]
        assert runs == ["topodisc/run"], runs
        tags_url = f"http://127.0.0.1:{port}/data/plugin/scalars/tags"
        with urllib.request.urlopen(tags_url, timeout=10) as r:
            assert "curriculum/alpha" in json.loads(r.read())["topodisc/run"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def image_events(tmp_path_factory):
    """A 3-step ImageTokenizer run on synthetic JPEGs: the modality that logs histograms."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.image.helpers import write_flat_folder

    tmp = tmp_path_factory.mktemp("tb_image")
    write_flat_folder(tmp / "photos", 20)
    config = effective_config(REPO / "experiments" / "imagenet_sample_64px.yaml")
    config["trainer"].update(
        max_steps=3,
        val_check_interval=3,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    config["trainer"]["logger"]["init_args"].update(save_dir=str(tmp), name="img", version="run")
    config["curriculum"].update(
        warmup_steps=1, transition_steps=1, kmeans_samples=64, kmeans_collect_batches=1
    )
    config["model"]["init_args"].update(
        ch=16, ch_mult=[1, 2, 2, 4], z_channels=16, num_codes=32, num_log_images=2
    )
    config["data"]["init_args"].update(
        root=str(tmp / "photos"), image_size=32, batch_size=4, num_workers=0, val_fraction=0.2
    )
    fit_config(config, tmp)
    acc = EventAccumulator(
        str(tmp / "img" / "run"), size_guidance={"scalars": 0, "images": 0, "histograms": 0}
    )
    acc.Reload()
    return acc


def test_image_tokenizer_logs_code_usage_histogram_and_reconstructions(image_events):
    tags = image_events.Tags()
    assert "val/code_usage" in tags["histograms"]
    (histogram,) = image_events.Histograms("val/code_usage")
    assert histogram.step == 3 and histogram.histogram_value.num == 32  # one share per code
    assert histogram.histogram_value.sum == pytest.approx(1.0)
    (counts,) = image_events.Histograms("val/code_use_counts")
    assert counts.histogram_value.num == 32 and counts.histogram_value.sum > 1
    assert "val/input_vs_reconstruction" in tags["images"]
    assert {"val/psnr", "val/utilization", "curriculum/alpha", "train/loss"} <= set(tags["scalars"])
