"""Diverging runs stop at the first non-finite loss, never checkpoint NaN weights, and
``metrics.json`` says how every run ended."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from provq_lightning.callbacks.metrics_json import MetricsJsonCallback
from provq_lightning.callbacks.nonfinite import NonFiniteError, NonFiniteGuard
from provq_lightning.errors import ProvqError
from provq_lightning.tools.fit import provq_callbacks
from provq_lightning.vq.kmeans import NonFiniteInputError, kmeans
from tests.helpers import effective_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "experiments" / "topodisc_provq.yaml"


class RecordLoss(Callback):
    """Append each step's training loss to a JSON-lines file (used by the provq-fit run below).

    Listed in the config, it runs before provq's guard, so it sees the step the guard stops at.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": self.step, "loss": repr(float(outputs["loss"]))}) + "\n")


def _nonfinite_tensors(checkpoint: dict[str, Any]) -> list[str]:
    return [
        name
        for name, value in checkpoint["state_dict"].items()
        if value.is_floating_point() and not torch.isfinite(value).all()
    ]


def test_diverging_topodisc_fit_stops_at_the_first_nan_naming_the_term(tmp_path):
    # The command (`--model.init_args.lr 1e8`), plus a checkpoint after every step, so a
    # checkpoint would be written right after the NaN step if the guard let it.
    cfg = effective_config(CONFIG)
    record = tmp_path / "losses.jsonl"
    trainer = cfg["trainer"]
    trainer.update(max_steps=100, log_every_n_steps=1, enable_progress_bar=False)
    trainer["logger"]["init_args"].update(save_dir=str(tmp_path), version="v")
    ckpt = next(c for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
    ckpt["init_args"].update(every_n_train_steps=1, save_top_k=-1)
    trainer["callbacks"].append(
        {"class_path": f"{__name__}.RecordLoss", "init_args": {"path": str(record)}}
    )
    cfg["model"]["init_args"]["lr"] = 1e8
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    fit = subprocess.run(
        [sys.executable, "-m", "provq_lightning.tools.fit", "--config", str(config)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fit.returncode == 1, fit.stderr[-3000:]
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    losses = {row["step"]: float(row["loss"]) for row in rows}
    first_nan = min(step for step, loss in losses.items() if not math.isfinite(loss))
    assert max(losses) == first_nan  # stopped in the very step the loss went non-finite
    assert first_nan < 20  # it diverges within a few steps, long before max_steps

    line = fit.stderr.strip().splitlines()[-1]
    assert line.startswith(f"provq-fit: error: non-finite loss at step {first_nan} "), line
    assert "curriculum phase warmup" in line
    assert re.search(r"train/recon=(nan|inf|-inf)", line), line

    run = tmp_path / "topodisc_provq" / "v"
    saved = sorted((run / "checkpoints").glob("*.ckpt"))
    assert saved, "a checkpoint per step up to the NaN step"
    for path in saved:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert _nonfinite_tensors(checkpoint) == [], path.name
        assert checkpoint["global_step"] <= first_nan
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert f"last.ckpt (step {last['global_step']})" in line

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    assert "non-finite loss" in metrics["error"]


# -- in-process runs of a tiny model -------------------------------------------------------
class Tiny(LightningModule):
    """y = w x on random data; ``spare`` takes no part in the loss."""

    def __init__(self, nan_at: int | None = None, poison_spare_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.spare = nn.Parameter(torch.zeros(3))
        self.nan_at = nan_at
        self.poison_spare_at = poison_spare_at

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = self.net(x).pow(2).mean()
        recon = loss * 2
        if self.global_step == self.nan_at:
            recon = recon * float("nan")
        self.log("train/recon", recon)
        return loss + recon

    def validation_step(self, batch, batch_idx) -> None:
        self.log_dict({"val/ok": 1.0, "val/bad": float("nan"), "val/big": float("-inf")})

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Module hooks run after every callback's: the weight turns NaN after that step's save.
        if self.global_step - 1 == self.poison_spare_at:
            with torch.no_grad():
                self.spare.fill_(float("nan"))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class TinyGan(Tiny):
    """Manual optimization with a second ("discriminator") loss that is not returned."""

    def __init__(self, d_nan_at: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.d_nan_at = d_nan_at

    def training_step(self, batch, batch_idx):
        (x,) = batch
        step = self.global_step  # opt.step() below advances it
        opt = self.optimizers()
        loss = self.net(x).pow(2).mean()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        d_loss = self.spare.pow(2).sum()
        if step == self.d_nan_at:
            d_loss = d_loss * float("nan")
        self.manual_backward(d_loss)  # no optimizer step: spare stays finite
        return loss.detach()


def loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=8)


def fit(
    tmp_path: Path, model: LightningModule, callbacks: list[Callback], validate: bool = False
) -> None:
    """Six steps; with ``validate``, a one-batch validation at steps 3 and 6."""
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=6,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        log_every_n_steps=1,
        callbacks=callbacks,
        val_check_interval=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, loader(), loader() if validate else None)


def read_metrics(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "metrics.json").read_text())


def test_guard_names_the_logged_term_and_says_no_checkpoint_yet(tmp_path):
    with pytest.raises(NonFiniteError) as err:
        fit(tmp_path, Tiny(nan_at=3), [NonFiniteGuard(), MetricsJsonCallback()])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("non-finite loss at step 3 (curriculum phase n/a): train/recon=nan")
    assert "no checkpoint written yet" in message
    metrics = read_metrics(tmp_path)  # the run ended before any validation: still recorded
    # At the step the message names (the trainer's counter had moved on to 4).
    assert metrics["status"] == "failed" and metrics["global_step"] == 3.0


def test_guard_checks_a_manual_optimization_loss_that_is_not_returned(tmp_path):
    with pytest.raises(NonFiniteError, match=r"^non-finite loss at step 2 .*backward #2=nan"):
        fit(tmp_path, TinyGan(d_nan_at=2), [NonFiniteGuard()])


def test_checkpoint_with_nan_weights_is_refused_and_the_last_finite_one_kept(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    with pytest.raises(NonFiniteError) as err:
        fit(tmp_path, Tiny(poison_spare_at=2), [NonFiniteGuard(), ckpt])
    last = tmp_path / "ckpt" / "last.ckpt"
    assert str(err.value) == (
        "refusing to write a checkpoint at step 4 (curriculum phase n/a): spare holds nan; "
        f"last checkpoint with finite weights: {last} (step 3); lower the learning rate or "
        "check the data, then resume from it or start over (NonFiniteGuard enabled: false "
        "turns this check off)"
    )
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3 and _nonfinite_tensors(checkpoint) == []


def test_disabled_guard_lets_the_run_go_on_and_replaces_provq_default(tmp_path):
    fit(tmp_path, Tiny(nan_at=2), [NonFiniteGuard(enabled=False), MetricsJsonCallback()])
    assert read_metrics(tmp_path)["status"] == "finished"
    configured = NonFiniteGuard(enabled=False)
    added = provq_callbacks({"callbacks": [configured]})
    assert not any(isinstance(c, NonFiniteGuard) for c in added)
    assert any(isinstance(c, NonFiniteGuard) and c.enabled for c in provq_callbacks({}))


def test_finished_run_records_status_and_nonfinite_validation_metrics(tmp_path):
    fit(tmp_path, Tiny(), [MetricsJsonCallback()], validate=True)
    metrics = read_metrics(tmp_path)
    assert metrics["status"] == "finished" and metrics["global_step"] == 6.0
    assert metrics["val/ok"] == 1.0
    assert (metrics["val/bad"], metrics["val/big"]) == ("nan", "-inf")
    assert metrics["nonfinite"] == ["val/bad", "val/big"]
    assert math.isnan(float(metrics["val/bad"]))  # readers get the number back with float()


def test_validate_keeps_the_fit_status_and_records_its_own_without_one(tmp_path):
    def validate(directory: Path) -> dict[str, Any]:
        trainer = Trainer(
            default_root_dir=directory,
            logger=False,
            accelerator="cpu",
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[MetricsJsonCallback()],
            limit_val_batches=1,
        )
        trainer.validate(Tiny(), loader())
        return read_metrics(directory)

    assert validate(tmp_path / "fresh")["status"] == "finished"
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "metrics.json").write_text('{"status": "failed", "error": "E: x"}')
    after = validate(tmp_path / "failed")
    assert (after["status"], after["error"], after["val/ok"]) == ("failed", "E: x", 1.0)


class Stop(Callback):
    """At step 2: raise ``error``, or stop the fit as a preemption handler does."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error
        self.requeued = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            if self.error is None:
                self.requeued = True
                trainer.should_stop = True
            else:
                raise self.error


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (None, "interrupted"),  # a callback that requeued the job
        (KeyboardInterrupt(), "interrupted"),
        (SIGTERMException(), "interrupted"),
        (RuntimeError("disk on fire\nsecond line"), "failed"),
    ],
)
def test_metrics_json_records_how_the_run_ended(tmp_path, error, status):
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT after a Ctrl-C
    try:
        fit(tmp_path, Tiny(), [MetricsJsonCallback(), Stop(error)])
    except (KeyboardInterrupt, SystemExit, RuntimeError):
        assert error is not None
    finally:
        signal.signal(signal.SIGINT, sigint)
    metrics = read_metrics(tmp_path)
    assert metrics["status"] == status and metrics["global_step"] == 2.0
    if status == "failed":
        assert metrics["error"] == "RuntimeError: disk on fire"
    else:
        assert "error" not in metrics


def test_kmeans_refuses_non_finite_rows():
    x = torch.randn(200, 2)
    x[7, 1] = float("nan")
    x[50, 0] = float("inf")
    with pytest.raises(NonFiniteInputError, match=r"2 non-finite rows of 200 \(first: row 7\)"):
        kmeans(x, 8)
    assert issubclass(NonFiniteInputError, ProvqError)
