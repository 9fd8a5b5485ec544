"""``provq-fit``: the Lightning CLI for every provq tokenizer.

``provq-fit --config X.yaml`` fits (the ``fit`` subcommand is implied);
``provq-fit validate|test --config X.yaml --ckpt_path ...`` evaluate. Model and data are given
by ``class_path``/``init_args`` in the config, so any provq tokenizer and datamodule work.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from callbacks.metrics_json import MetricsJsonCallback
from provq_lightning.errors import ProvqError

SUBCOMMANDS = ("fit", "validate", "test", "predict")

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "provq"},
    },
}


def provq_callbacks(config: dict[str, Any]) -> list[Callback]:
    """Callbacks provq adds to every run (``config`` is the trainer's init config)."""
    return [MetricsJsonCallback()]


def provq_plugins(config: dict[str, Any], configured: list[Any]) -> list[Any]:
    """Trainer plugins provq adds to every run; ``configured`` are the config's own plugins,
    and a provq plugin is left out when the config brings one of its kind."""
    return []


class ProvqCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            # A requeued or resumed run writes into the same directory: not an error.
            save_config_kwargs={"overwrite": True},
            trainer_defaults=TRAINER_DEFAULTS,
            args=args,
            run=run,
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        extra = [
            self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys
        ]
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        # provq's own callbacks (metrics.json, ...); a rich progress bar unless the config brings
        # its own bar or turns bars off (Lightning would add a tqdm one otherwise).
        extra.extend(provq_callbacks(config))
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        plugins.extend(provq_plugins(config, list(plugins)))
        if plugins:
            config["plugins"] = plugins
        wants_bar = config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in configured):
            extra.append(RichProgressBar())
        return self._instantiate_trainer(config, extra)


def normalize_argv(argv: list[str]) -> list[str]:
    """Insert the implied ``fit`` subcommand unless one (or a help flag) is given."""
    if argv and (argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help", "--version")):
        return argv
    return ["fit", *argv]


def main(argv: list[str] | None = None) -> None:
    argv = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    sys.argv = [sys.argv[0], *argv]
    try:
        ProvqCLI()
    except ProvqError as err:
        # A fault the user can fix: one line, not a traceback.
        print(f"provq-fit: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
