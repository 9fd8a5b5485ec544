"""Which run directory a ``provq-fit`` command reads and writes: ``--ckpt_path last`` resolved
to the newest resumable run, and evaluations redirected into ``<run>/eval/<name>``.

Functions of the parsed config, with no CLI state; rank 0 decides and hands its choice to the
ranks it launches through environment variables, so every rank uses the same directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from provq_lightning.errors import ProvqError
from provq_lightning.runs.eval_dir import (
    EVAL_SUBDIR,
    fit_run_written_by,
    last_checkpoint,
    new_eval_version,
)
from provq_lightning.runs.run_dir import (
    LAST_CHECKPOINT,
    newest_resumable_run,
    saved_checkpoints,
    version_dir,
    version_from_dir_name,
)

# Set by rank 0's process so the ranks it launches resume the same run without looking again.
_RESUME_ENV = "PROVQ_RESUME_VERSION"
# Likewise the evaluation directory rank 0 chose (its name holds a time stamp).
_EVAL_ENV = "PROVQ_EVAL_VERSION"


# The evaluation directory this process chose and that did not exist before: removed again if
# the evaluation fails, so a failed validate/test/predict leaves no eval/<name> behind.
_new_eval_dir: list[Path] = []


def clear_handoff() -> None:
    """Forget rank 0's choices, so an in-process caller (tests) starts clean next time."""
    os.environ.pop(_RESUME_ENV, None)
    os.environ.pop(_EVAL_ENV, None)
    _new_eval_dir.clear()


def discard_failed_evaluation() -> None:
    """Remove the evaluation directory this process created, after the evaluation failed."""
    if _new_eval_dir and is_launch_rank_zero():
        folder = _new_eval_dir.pop()
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # eval/ itself, when this was its only evaluation


def is_launch_rank_zero() -> bool:
    """Global rank 0 before any process group exists (from the launchers' variables)."""
    names = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
    return all(int(os.environ.get(name, "0") or 0) == 0 for name in names)


def _logger_args(trainer_config: Any) -> Any | None:
    """The init_args of a single TensorBoard/CSV-style logger config, else None."""
    logger = trainer_config.get("logger") if trainer_config is not None else None
    if isinstance(logger, list) and len(logger) == 1:
        logger = logger[0]
    init_args = getattr(logger, "init_args", None) if logger is not None else None
    if init_args is None or not hasattr(init_args, "save_dir") or not hasattr(init_args, "name"):
        return None
    return init_args


def refuse_fit_into_existing_run(config: Any) -> None:
    """A fit without ``--ckpt_path`` into a pinned version directory that holds a run's
    checkpoints is refused: it would write ``last-v1.ckpt`` beside them and mix its
    ``metrics.json`` with the old run's. A directory without checkpoints (a run that died
    before its first, a sweep task's folder made before its first start) is written as usual."""
    if config.get("ckpt_path") is not None:
        return
    logger_args = _logger_args(config.get("trainer"))
    if logger_args is None or logger_args.version is None:
        return  # an unpinned version is always a new directory
    run = Path(logger_args.save_dir or "runs") / (logger_args.name or "")
    run = run / version_dir(logger_args.version)
    found = saved_checkpoints(run)
    if found:
        shown = run / LAST_CHECKPOINT if run / LAST_CHECKPOINT in found else found[0]
        raise ProvqError(
            f"{run} already holds a run ({shown.relative_to(run)}); resume it with "
            "--ckpt_path last, or start a new run under another version "
            "(--trainer.logger.init_args.version) or after moving that folder away"
        )


def resolve_last_checkpoint(config: Any) -> None:
    """``--ckpt_path last``: continue the newest run of the logger's name (or the pinned
    version), in its own directory and TensorBoard run; with none, start fresh."""
    if config.get("ckpt_path") != "last":
        return
    logger_args = _logger_args(config.get("trainer"))
    if logger_args is None:
        return  # no file-based logger: Lightning's own "last" lookup
    save_dir, name = logger_args.save_dir or "runs", logger_args.name or ""
    pinned = os.environ.get(_RESUME_ENV) or logger_args.version
    if pinned is not None:
        version = version_dir(pinned)
        ckpt = Path(save_dir) / name / version / LAST_CHECKPOINT
        target = ckpt if ckpt.is_file() else None
    else:
        found = newest_resumable_run(save_dir, name)
        version = found.version if found else None
        target = found.checkpoint if found else None
    if target is None:
        where = Path(save_dir) / name / (version or "")
        print(f"[provq] --ckpt_path last: no last.ckpt under {where}; starting a fresh run")
        config["ckpt_path"] = None
        return
    logger_args.version = version_from_dir_name(version)
    config["ckpt_path"] = str(target)
    os.environ[_RESUME_ENV] = version
    if is_launch_rank_zero():
        print(f"[provq] --ckpt_path last: resuming {target}")


def redirect_evaluation(config: Any, subcommand: str) -> None:
    """validate/test/predict never write into a fit's run directory: its metrics.json,
    config.yaml and events stay the fit's; the evaluation gets ``<run>/eval/<name>``
    (see ``provq_lightning.runs.eval_dir``)."""
    logger_args = _logger_args(config.get("trainer"))
    if logger_args is None:
        return  # no file-based logger: nothing is written into a run directory
    save_dir, name = logger_args.save_dir or "runs", logger_args.name or ""
    if config.get("ckpt_path") == "last":
        # Lightning would look for last.ckpt in the evaluation's own (new) directory.
        found = last_checkpoint(save_dir, name, logger_args.version)
        if found is None:
            raise ProvqError(
                f"--ckpt_path last: no run with a last.ckpt under {Path(save_dir) / name}; "
                "give the checkpoint's path (--ckpt_path <run>/checkpoints/last.ckpt)"
            )
        config["ckpt_path"] = str(found)
    run = fit_run_written_by(save_dir, name, logger_args.version, config.get("ckpt_path"))
    if run is None:
        return
    version = os.environ.get(_EVAL_ENV) or new_eval_version(run, subcommand)
    os.environ[_EVAL_ENV] = version
    if not (run / EVAL_SUBDIR / version).exists():
        _new_eval_dir[:] = [run / EVAL_SUBDIR / version]
    logger_args.save_dir, logger_args.name, logger_args.version = str(run), EVAL_SUBDIR, version
    if is_launch_rank_zero():
        print(f"[provq] {subcommand} writes into {run / EVAL_SUBDIR / version}, never into "
              f"the fit's run directory {run}")
