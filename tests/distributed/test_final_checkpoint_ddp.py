"""``FinalCheckpoint`` under DDP (2 gloo processes): the final save at the end of a fit off the
checkpoint interval, and a Ctrl-C that reaches one rank only, are collectives every rank takes
part in, so neither hangs and both leave ``last.ckpt`` at the last completed step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.distributed import launch
from tests.helpers import effective_config

REPO = Path(__file__).resolve().parents[2]


def ddp_topodisc(tmp: Path, steps: int, callbacks: list[dict]) -> tuple[list[int], Path, list]:
    config = effective_config(REPO / "experiments" / "topodisc_provq.yaml")
    trainer = config["trainer"]
    trainer.update(max_steps=steps, limit_val_batches=0, enable_progress_bar=False,
                   enable_model_summary=False)
    trainer["logger"]["init_args"].update(save_dir=str(tmp), name="run", version="v")
    trainer["callbacks"][0]["init_args"]["every_n_train_steps"] = 5
    trainer["callbacks"] += callbacks
    config["model"]["init_args"].update(num_codes=16, figure_every_n_steps=0)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    logs = [tmp / f"rank{r}.log" for r in range(2)]
    codes = launch.ddp_fit(["--config", str(path)], logs, strategy="ddp", timeout=300)
    return codes, tmp / "run" / "v" / "checkpoints" / "last.ckpt", logs


def step_of(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


def test_final_save_off_the_interval_under_ddp(tmp_path):
    codes, ckpt, logs = ddp_topodisc(tmp_path, 7, [])
    if codes != [0, 0]:
        pytest.fail(f"exit codes {codes}; rank 0 log tail:\n{logs[0].read_text()[-3000:]}")
    assert step_of(ckpt) == 7


def test_ctrl_c_on_one_rank_stops_both_at_the_same_saved_step(tmp_path):
    sigint = {"class_path": "tests.core.helpers.SigintAtStep",
              "init_args": {"step": 7, "rank": 1}}
    codes, ckpt, logs = ddp_topodisc(tmp_path, 20, [sigint])
    assert codes == [1, 1], f"exit codes {codes}; rank 0 log:\n{logs[0].read_text()[-3000:]}"
    assert step_of(ckpt) == 7
    assert "Ctrl-C: stopped at step 7" in logs[0].read_text()
