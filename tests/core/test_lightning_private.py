"""The private attributes of Lightning (and of torch and torchvision under it) that
provq relies on, each checked on the real object, so that a release that renames or drops one
fails here, naming the attribute and the file to fix, instead of failing opaquely mid-run or,
where the code reads it with ``getattr(..., default)``, silently changing behaviour.

Adding a new private access to the code? Add it to ``CHECKS``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import lightning
import torch
import torchvision
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torchvision.models.inception import Inception3

from provq_lightning.runs.checkpoint_io import AtomicCheckpointIO


def _trainer() -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)


def _should_update_logs() -> None:
    assert isinstance(_trainer()._logger_connector.should_update_logs, bool)


def _ddp_kwargs() -> None:
    assert DDPStrategy(find_unused_parameters=True)._ddp_kwargs == {"find_unused_parameters": True}
    assert DDPStrategy()._ddp_kwargs.get("find_unused_parameters", False) is False


def _module_trainer() -> None:
    module = LightningModule()
    assert module._trainer is None  # where the public property raises
    trainer = _trainer()
    module.trainer = trainer
    assert module._trainer is trainer


def _wrapping_checkpoint_io() -> None:
    from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

    plugin = AsyncCheckpointIO()
    assert isinstance(plugin, _WrappingCheckpointIO)
    base = AtomicCheckpointIO()
    plugin.checkpoint_io = base
    assert plugin.checkpoint_io is base
    plugin.teardown()


def _strategy_checkpoint_io() -> None:
    assert SingleDeviceStrategy("cpu")._checkpoint_io is None
    chosen = AtomicCheckpointIO()
    assert SingleDeviceStrategy("cpu", checkpoint_io=chosen)._checkpoint_io is chosen


def _model_checkpoint_last_saved() -> None:
    checkpoint = ModelCheckpoint()
    assert checkpoint._last_checkpoint_saved == ""
    assert checkpoint._last_global_step_saved == 0


def _cli_methods() -> None:
    # ProvqCLI overrides or calls these; an override of a renamed method is never called.
    expected = {
        "_add_configure_optimizers_method_to_model": ["self", "subcommand"],
        "_parse_ckpt_path": ["self"],
        "_get": ["self", "config", "key", "default"],
        "_instantiate_trainer": ["self", "config", "callbacks"],
        "_parser": ["self", "subcommand"],
    }
    for name, params in expected.items():
        method = getattr(LightningCLI, name)
        assert list(inspect.signature(method).parameters) == params, name


def _inception_forward() -> None:
    assert callable(Inception3._forward)


def _scheduler_last_lr() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    assert scheduler._last_lr == [0.5]


def _rich_train_description() -> None:
    from lightning.pytorch.callbacks import RichProgressBar

    method = RichProgressBar._get_train_description
    assert list(inspect.signature(method).parameters) == ["self", "current_epoch"]
    bar = RichProgressBar()
    bar.setup(_trainer(), LightningModule(), "fit")
    assert bar._get_train_description(3).startswith("Epoch 3")


# (private attribute, the files that rely on it, a check on the real object)
CHECKS: list[tuple[str, str, Callable[[], None]]] = [
    ("Trainer._logger_connector.should_update_logs", "provq_lightning/tokenizer.py",
     _should_update_logs),
    ("DDPStrategy._ddp_kwargs", "callbacks/curriculum.py", _ddp_kwargs),
    ("LightningModule._trainer",
     "provq_lightning/tokenizer.py, provq_lightning/image/tokenizer.py, "
     "provq_lightning/reporting/figures.py", _module_trainer),
    ("lightning.pytorch.plugins.io.wrapper._WrappingCheckpointIO", "provq_lightning/tools/fit.py",
     _wrapping_checkpoint_io),
    ("Strategy._checkpoint_io", "provq_lightning/tools/fit.py", _strategy_checkpoint_io),
    ("ModelCheckpoint._last_checkpoint_saved / _last_global_step_saved",
     "callbacks/nonfinite.py, callbacks/final_checkpoint.py", _model_checkpoint_last_saved),
    ("LightningCLI._add_configure_optimizers_method_to_model / _parse_ckpt_path / _get / "
     "_instantiate_trainer / _parser", "provq_lightning/tools/fit.py", _cli_methods),
    ("torchvision Inception3._forward", "provq_lightning/image/pretrained.py", _inception_forward),
    ("torch LRScheduler._last_lr", "callbacks/resume.py", _scheduler_last_lr),
    ("RichProgressBar._get_train_description", "callbacks/progress.py", _rich_train_description),
]


def test_every_private_attribute_provq_relies_on_still_exists():
    broken = []
    for attribute, users, check in CHECKS:
        try:
            check()
        except Exception as err:  # noqa: BLE001 - every failure is reported, all at once
            broken.append(f"{attribute} (relied on by {users}): {type(err).__name__}: {err}")
    versions = (f"lightning {lightning.__version__}, torch {torch.__version__}, "
                f"torchvision {torchvision.__version__}")
    assert not broken, f"with {versions}, private attributes changed:\n" + "\n".join(broken)
