"""``provq-fit``: the Lightning CLI for every provq tokenizer.

``provq-fit --config X.yaml`` fits (the ``fit`` subcommand is implied);
``provq-fit validate|test --config X.yaml --ckpt_path ...`` evaluate;
``provq-fit predict --config X.yaml --ckpt_path ...`` writes codes as ``provq-tokenize`` does.
Model and data are given by ``class_path``/``init_args`` in the config, so any provq tokenizer
and datamodule work; ``--curriculum.<setting>`` overrides ProVQ's curriculum.
"""

from __future__ import annotations

import importlib.metadata
import sys
from typing import Any

from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from provq_lightning.callbacks.final_checkpoint import FinalCheckpoint
from provq_lightning.callbacks.metrics_json import MetricsJsonCallback
from provq_lightning.callbacks.nonfinite import NonFiniteGuard
from provq_lightning.callbacks.prediction_writer import CodePredictionWriter
from provq_lightning.callbacks.preemption import PreemptionCheckpoint
from provq_lightning.callbacks.progress import ProvqProgressBar
from provq_lightning.callbacks.resume import ResumeCallback
from provq_lightning.errors import ProvqError
from provq_lightning.runs.checkpoint_check import check_checkpoint_file
from provq_lightning.runs.checkpoint_io import AtomicCheckpointIO
from provq_lightning.runs.config_history import ConfigHistoryCallback
from provq_lightning.runs.eval_dir import EVALUATING
from provq_lightning.runs.lock import RunLock, hold_run_lock, release_held_locks
from provq_lightning.runs.resolve import (
    clear_handoff,
    discard_failed_evaluation,
    is_launch_rank_zero,
    redirect_evaluation,
    refuse_fit_into_existing_run,
    resolve_last_checkpoint,
)
from provq_lightning.tools.curriculum_section import (
    PARSER_MODE,
    SECTION,
    add_curriculum_section,
    check_one_curriculum,
    curriculum_callback,
)
from provq_lightning.tools.preflight import run_preflight
from provq_lightning.tools.shipped_configs import resolve_config_args

SUBCOMMANDS = ("fit", "validate", "test", "predict")
EXIT_SIGTERM = 128 + 15  # the shell's code for a process ended by SIGTERM

DESCRIPTION = (
    "provq-fit: train and evaluate vector-quantized tokenizers with Progressive Quantization "
    "(ProVQ) on PyTorch Lightning. 'provq-fit --config X.yaml' fits (the fit subcommand is "
    "implied); validate, test and predict (writes codes like provq-tokenize) take --ckpt_path. "
    "'--ckpt_path last' resumes a fit; '--curriculum.<setting>' overrides the curriculum."
)


def version_text() -> str:
    """provq's version and the torch / Lightning it runs on (``provq-fit --version``)."""
    import lightning
    import torch

    try:
        provq = importlib.metadata.version("provq")
    except importlib.metadata.PackageNotFoundError:  # a source checkout that was not installed
        provq = "unknown (not installed)"
    return f"{provq} (torch {torch.__version__}, lightning {lightning.__version__})"


TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        # No hp_metric placeholder (-1 on every run in TensorBoard's scalars).
        "init_args": {"save_dir": "runs", "name": "provq", "default_hp_metric": False},
    },
}


def provq_callbacks(config: dict[str, Any]) -> list[Callback]:
    """Callbacks provq adds to every run (``config`` is the trainer's init config)."""
    callbacks: list[Callback] = [MetricsJsonCallback(), ResumeCallback()]
    configured = config.get("callbacks") or []
    configured = configured if isinstance(configured, list) else [configured]
    # A NonFiniteGuard in the config (e.g. `enabled: false`) replaces the default one.
    if not any(isinstance(c, NonFiniteGuard) for c in configured):
        callbacks.append(NonFiniteGuard())
    # Last of provq's: on SIGUSR1 it saves last.ckpt after the other callbacks' step-end hooks
    # ran, as ModelCheckpoint does. One in the config (other signal, ...) replaces it.
    if not any(isinstance(c, PreemptionCheckpoint) for c in configured):
        callbacks.append(PreemptionCheckpoint())
    # After it: a fit that ends (max_steps off the checkpoint interval, Ctrl-C) leaves last.ckpt
    # at its last completed step. One in the config (ctrl_c: false) replaces it.
    if not any(isinstance(c, FinalCheckpoint) for c in configured):
        callbacks.append(FinalCheckpoint())
    return callbacks


def provq_plugins(config: dict[str, Any], configured: list[Any]) -> list[Any]:
    """Trainer plugins provq adds to every run; ``configured`` are the config's own plugins,
    and a provq plugin is left out when the config brings one of its kind."""
    plugins: list[Any] = []
    # PreemptionCheckpoint answers SIGUSR1 at a step boundary; Lightning's SLURM auto-requeue
    # would otherwise announce itself and could write a mid-step hpc checkpoint.
    if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in configured):
        plugins.append(SLURMEnvironment(auto_requeue=False))
    # Atomic, space-checked checkpoint writes, unless the config chooses its own CheckpointIO
    # (as a plugin or inside a strategy instance: Lightning refuses two).
    if getattr(config.get("strategy"), "_checkpoint_io", None) is not None:
        return plugins
    for plugin in configured:
        if isinstance(plugin, _WrappingCheckpointIO):
            # e.g. AsyncCheckpointIO without a base: ours becomes its base (no-op if it has one).
            plugin.checkpoint_io = AtomicCheckpointIO()
        if isinstance(plugin, CheckpointIO):
            return plugins
    return [*plugins, AtomicCheckpointIO()]


class ProvqCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self.run_lock: RunLock | None = None
        super().__init__(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=ConfigHistoryCallback,
            # A requeued or resumed run writes into the same directory: not an error.
            save_config_kwargs={"overwrite": True},
            trainer_defaults=TRAINER_DEFAULTS,
            # YAML, with configs of the old curriculum layout migrated (curriculum_section).
            parser_kwargs={"prog": "provq-fit", "description": DESCRIPTION,
                           "version": version_text(), "parser_mode": PARSER_MODE},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_curriculum_section(parser)

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        # Lightning's --optimizer/--lr_scheduler replace the model's configure_optimizers with
        # one optimizer; refuse, in one line, the cases where that cannot work.
        check_optimizer_args(
            self.model,
            self._get(self.config_init, "optimizer"),
            self._get(self.config_init, "lr_scheduler"),
        )
        super()._add_configure_optimizers_method_to_model(subcommand)

    def _parse_ckpt_path(self) -> None:
        # Lightning's CLI loads the whole checkpoint here to overlay its saved hyper-parameters
        # on the config, which silently undid settings changed for a resume. provq applies or
        # refuses changed settings explicitly (ResumeCallback, CurriculumCallback), so the config
        # stays as given; only a file that cannot be a checkpoint is reported, in one line.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path not in (None, "last", "best", "hpc", "registry"):
            check_checkpoint_file(ckpt_path)

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit":
            refuse_fit_into_existing_run(self.config["fit"])
            resolve_last_checkpoint(self.config["fit"])
            # Before anything is built: every missing GPU, data path and weight file in one
            # block (provq_lightning.tools.preflight).
            run_preflight(self.config["fit"].as_dict())
        if self.subcommand in EVALUATING:
            redirect_evaluation(self.config[self.subcommand], self.subcommand)
        predict = self.config.get("predict") if self.subcommand == "predict" else None
        if predict is not None and predict.get("return_predictions") is None:
            # The writer saves the codes; keeping every batch's codes in memory too could
            # exhaust it on a large dataset, and the CLI discards them anyway.
            predict["return_predictions"] = False

    def before_fit(self) -> None:
        if not is_launch_rank_zero():
            return
        log_dir = self.trainer.log_dir
        if log_dir is None:
            return
        self.run_lock = hold_run_lock(log_dir)

    def after_fit(self) -> None:
        if self.run_lock is not None:
            self.run_lock.release()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        extra = [
            self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys
        ]
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        curriculum = curriculum_callback(self._get(self.config_init, SECTION))
        if curriculum is not None:
            check_one_curriculum(configured)
            # First, where configs listed it: its step-end hooks run before provq's (a
            # preemption save must see this step's reservoir).
            configured = [curriculum, *configured]
            config["callbacks"] = configured
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
            extra.append(ProvqProgressBar())
        # predict writes codes (the files provq-tokenize writes) unless the config has a writer.
        if self.subcommand == "predict" and not any(
            isinstance(c, BasePredictionWriter) for c in configured
        ):
            extra.append(CodePredictionWriter())
        return self._instantiate_trainer(config, extra)


def check_optimizer_args(model: LightningModule, optimizer: Any, lr_scheduler: Any) -> None:
    """Refuse ``--optimizer`` / ``--lr_scheduler`` where Lightning's replacement cannot work."""
    if optimizer is None and lr_scheduler is None:
        return
    name = type(model).__name__
    own = [f"--model.init_args.{k}" for k in ("lr", "betas", "weight_decay", "lr_warmup_steps")
           if k in getattr(model, "hparams", {})]
    instead = f"set {', '.join(own)} instead" if own else "configure the model's own optimizer"
    if not model.automatic_optimization:
        raise ProvqError(
            f"--optimizer/--lr_scheduler cannot be used with {name}: it steps its own optimizers "
            f"under manual optimization (built in its configure_optimizers); {instead}"
        )
    if optimizer is None:
        raise ProvqError(
            f"--lr_scheduler needs --optimizer: a scheduler steps an optimizer, and {name} "
            f"builds its own in configure_optimizers (Lightning would drop the scheduler); give "
            f"--optimizer too, or {instead}"
        )


def normalize_argv(argv: list[str]) -> list[str]:
    """Insert the implied ``fit`` subcommand unless one (or a help flag) is given."""
    if argv and (argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help", "--version")):
        return argv
    return ["fit", *argv]


def main(argv: list[str] | None = None) -> None:
    argv = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    try:
        # A --config naming no file here may name a shipped one (provq-fit --config in1k_16x16).
        sys.argv = [sys.argv[0], *resolve_config_args(argv)]
        ProvqCLI()
    except SIGTERMException:
        # Lightning's own SIGTERM stop (before PreemptionCheckpoint took over at train start, or
        # a config without it) is a plain SystemExit: 0 would tell SLURM the run COMPLETED.
        print("provq-fit: error: stopped by SIGTERM (scancel or preemption) before the "
              "preemption handler could save; resume with --ckpt_path last", file=sys.stderr)
        sys.exit(EXIT_SIGTERM)
    except Exception as err:  # noqa: BLE001 - only provq's own, user-fixable errors are caught
        discard_failed_evaluation()  # a failed validate/test/predict leaves no eval/ folder
        found = user_error(err)
        if found is None:
            raise
        # A fault the user can fix: one line, not a traceback (jsonargparse wraps errors raised
        # while instantiating the config's classes in a long union-type report).
        print(f"provq-fit: error: {found}", file=sys.stderr)
        sys.exit(found.exit_code)
    finally:
        release_held_locks()
        clear_handoff()  # in-process callers (tests) start clean next time


def _state_dict_mismatch(err: RuntimeError) -> ProvqError:
    # torch lists every mismatched tensor on its own line; the first names the kind of change.
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    first = lines[1] if len(lines) > 1 else lines[0]
    more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
    return ProvqError(
        f"the checkpoint does not fit the configured model: {first.rstrip('.')}{more}; a run's "
        "model settings are fixed: resume with the run's own config.yaml, or start a new run"
    )


def user_error(err: BaseException) -> ProvqError | None:
    """The ``ProvqError`` behind ``err`` (itself, or in its cause/context chain), if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ProvqError):
            return err
        if isinstance(err, RuntimeError) and str(err).startswith("Error(s) in loading state_dict"):
            return _state_dict_mismatch(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
