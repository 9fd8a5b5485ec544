"""Every shipped experiment config builds (the lightning-hydra-template habit): ``provq-fit``'s own
parser reads it and instantiates the model, the datamodule, the callbacks, the logger and the
Trainer, without fitting. Every task of every shipped sweep does the same with its arguments.

Cheap enough for every config: the models are built on the meta device (their constructors run in
full, only no memory is allocated, so a 16384-code VQGAN costs ~0.3 s, not seconds), and nothing
reads data or downloads weights (that happens in ``setup``, which is not called). The one
setting changed is ``trainer.accelerator``: a GPU config must still build on a CPU test machine.
``test_layering`` separately checks every ``class_path`` string, also those a sweep passes on.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import Logger

from provq_lightning.tools.fit import ProvqCLI
from provq_lightning.tools.sweep_spec import load_sweep
from tests.helpers import effective_config

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
SWEEPS = sorted((EXPERIMENTS / "sweeps").glob("*.yaml"))
# Fit configs: all but the sweep specs, which are another format (read by load_sweep).
CONFIGS = sorted(p for p in EXPERIMENTS.rglob("*.yaml") if p.parent != EXPERIMENTS / "sweeps")
CPU = ["--trainer.accelerator", "cpu"]


def _config_args(config: Path) -> list[str]:
    """``--config`` arguments for ``config``: a variant in a folder with a ``base.yaml`` (the
    in100 ablations) is used on top of that base, as its header says."""
    base = config.parent / "base.yaml"
    configs = [base, config] if base.is_file() and base != config else [config]
    return [arg for c in configs for arg in ("--config", str(c))]


def _build(args: list[str]) -> ProvqCLI:
    """Parse ``args`` as ``provq-fit`` does and instantiate everything, fitting nothing."""
    with torch.device("meta"):
        return ProvqCLI(args=[*args, *CPU], run=False)


def _check_built(cli: ProvqCLI) -> None:
    assert isinstance(cli.model, LightningModule)
    assert isinstance(cli.datamodule, LightningDataModule)
    assert isinstance(cli.trainer, Trainer)
    configured: Any = cli.config_init["trainer"].get("callbacks") or []
    assert all(isinstance(c, Callback) for c in configured)
    assert all(c in cli.trainer.callbacks for c in configured)
    assert all(isinstance(logger, Logger) for logger in cli.trainer.loggers)


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    # Paths inside a config (classes.txt, ../shared/data, sweeps' config lists) are relative to
    # the working directory, as for a user in a checkout.
    monkeypatch.chdir(REPO)
    # The CLI takes its arguments from ``args``; pytest's own must not look like extra ones.
    monkeypatch.setattr(sys, "argv", ["provq-fit"])


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(EXPERIMENTS)) for c in CONFIGS])
def test_every_experiment_config_builds(config):
    _check_built(_build(_config_args(config)))


@pytest.mark.parametrize("sweep", SWEEPS, ids=[s.name for s in SWEEPS])
def test_every_task_of_every_sweep_builds(sweep):
    tasks = load_sweep(sweep).tasks
    assert tasks
    for task in tasks:
        try:
            _check_built(_build(task.args))
        except BaseException as err:  # SystemExit from the parser included
            raise AssertionError(f"{sweep.name} task {task.index} ({task.name}): {err!r}") from err



def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"trainer.logger.init_args.name": ..., ...}``: every leaf of a nested config."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    found: dict[str, Any] = {}
    for key, item in value.items():
        found.update(_leaves(item, f"{prefix}.{key}" if prefix else str(key)))
    return found


VARIANTS = sorted(p for p in CONFIGS if "config" in (yaml.safe_load(p.read_text()) or {}))


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_a_variant_keeps_every_base_setting_it_does_not_set(variant):
    """A variant names its base (``config: X_base.yaml``) and sets what differs. jsonargparse
    replaces a whole nested section given there, so a variant sets dotted keys; a section that
    silently dropped base settings fails here, naming them."""
    own = yaml.safe_load(variant.read_text())
    base = variant.parent / own.pop("config")
    sets = tuple(_leaves(own))
    base_leaves = _leaves(effective_config(base))
    variant_leaves = _leaves(effective_config(variant))
    changed = [key for key in base_leaves.keys() | variant_leaves.keys()
               if base_leaves.get(key) != variant_leaves.get(key)]
    unexplained = [key for key in changed if not key.startswith(sets)]
    assert not unexplained, f"{variant.name} changes base settings it does not set: {unexplained}"
