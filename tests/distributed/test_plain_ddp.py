"""Warmup + transition under plain ``strategy: ddp`` (no ``find_unused_parameters``), 2 gloo
processes: the bypassed codebook and the idle discriminator get zero-weight terms, so every
backward reaches every parameter (issue 14).

The image run also accumulates 2 batches per step (DDP's ``no_sync`` inside a window) and turns
the GAN on during the run, and its TensorBoard file must hold the images/s and learning-rate
scalars of the monitors the shipped image configs use.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.distributed import launch
from tests.helpers import effective_config
from tests.image.helpers import TINY, write_flat_folder

REPO = Path(__file__).resolve().parents[2]
WARMUP, TRANSITION = 4, 4


class SaveParameters(L.Callback):
    """Each rank saves its parameters at the end (``{rank}`` in ``path``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module):
        params = {k: v.detach().cpu() for k, v in pl_module.named_parameters()}
        torch.save(params, self.path.format(rank=trainer.global_rank))


def fit_plain_ddp(config: dict, tmp: Path) -> dict:
    config["trainer"]["callbacks"].append({
        "class_path": "tests.distributed.test_plain_ddp.SaveParameters",
        "init_args": {"path": str(tmp / "params_rank{rank}.pt")},
    })
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    logs = [tmp / f"rank{r}.log" for r in range(2)]
    codes = launch.ddp_fit(["--config", str(path)], logs, strategy="ddp", timeout=300)
    if codes != [0, 0]:
        pytest.fail(f"exit codes {codes}; rank 0 log tail:\n{logs[0].read_text()[-3000:]}")
    # The same parameters on every rank (the image run reads other photos on each rank).
    rank0, rank1 = (torch.load(tmp / f"params_rank{r}.pt") for r in range(2))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    ckpt = next(tmp.rglob("last.ckpt"))
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def base_trainer(config: dict, tmp: Path, steps: int) -> dict:
    trainer = config["trainer"]
    trainer.update(max_steps=steps, log_every_n_steps=1, limit_val_batches=0,
                   enable_progress_bar=False, enable_model_summary=False)
    trainer["logger"]["init_args"].update(save_dir=str(tmp), name="run", version="v")
    curriculum = config["curriculum"]
    curriculum.update(warmup_steps=WARMUP, transition_steps=TRANSITION, kmeans_collect_batches=1)
    return trainer


def curriculum_state(checkpoint: dict) -> dict:
    return next(v for k, v in checkpoint["callbacks"].items() if "CurriculumCallback" in k)


def test_topodisc_warmup_and_transition_under_plain_ddp(tmp_path):
    config = effective_config(REPO / "experiments" / "topodisc_provq.yaml")
    base_trainer(config, tmp_path, WARMUP + TRANSITION + 2)
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 5
    config["model"]["init_args"].update(num_codes=16, figure_every_n_steps=0)
    checkpoint = fit_plain_ddp(config, tmp_path)
    assert checkpoint["global_step"] == WARMUP + TRANSITION + 2
    assert curriculum_state(checkpoint)["seeded_at_step"] == WARMUP


def test_image_tokenizer_warmup_transition_and_gan_under_plain_ddp(tmp_path):
    photos = tmp_path / "photos"
    write_flat_folder(photos, 32)
    config = effective_config(REPO / "experiments" / "imagenet_sample_64px.yaml")
    trainer = base_trainer(config, tmp_path, WARMUP + TRANSITION + 2)
    callbacks = trainer["callbacks"]
    config["curriculum"].update(kmeans_samples=4096)
    callbacks[0]["init_args"]["every_n_train_steps"] = 5
    throughput = next(c for c in callbacks if c["class_path"].endswith("ThroughputMonitor"))
    throughput["init_args"]["window_size"] = 2
    config["model"]["init_args"] = {**TINY, "ch_mult": list(TINY["ch_mult"]), "disc_weight": 0.5,
                                    "disc_start": 2, "disc_start_from": "quantization",
                                    "accumulate_grad_batches": 2, "ema_decay": 0.9, "lr": 2e-4}
    config["data"]["init_args"].update(root=str(photos), image_size=16, batch_size=4,
                                       val_batch_size=4, num_workers=0)
    checkpoint = fit_plain_ddp(config, tmp_path)
    assert checkpoint["global_step"] == WARMUP + TRANSITION + 2  # optimizer steps, 2 batches each
    assert curriculum_state(checkpoint)["seeded_at_step"] == WARMUP
    assert int(checkpoint["state_dict"]["quantization_start"]) == WARMUP
    # The GAN trained from step WARMUP + 2: its optimizer has state.
    assert checkpoint["optimizer_states"][1]["state"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "v")).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("lr-AdamW", "lr-AdamW-1", "train/samples_per_sec", "train/device/samples_per_sec"):
        assert tag in tags, sorted(tags)
    assert events.Scalars("lr-AdamW")[-1].value == pytest.approx(2e-4)
    assert all(s.value > 0 for s in events.Scalars("train/samples_per_sec"))
