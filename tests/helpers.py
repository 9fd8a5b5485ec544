"""What test files in several packages share: ``provq-fit`` in this process, and a run
directory's hashes. Package-specific helpers live in ``tests/<package>/helpers.py``; fixtures in
``conftest.py``. No test file imports another test file or a conftest."""

from __future__ import annotations

import contextlib
import hashlib
import io
import sys
from pathlib import Path
from typing import Any

import yaml


def provq_fit(*args: str) -> None:
    """``provq-fit ARGS`` in this process (``sys.argv`` restored afterwards)."""
    from provq_lightning.tools.fit import main

    argv = sys.argv
    try:
        main(list(args))
    finally:
        sys.argv = argv


def short_topodisc_run(save_dir: Path, version: str = "v", steps: int = 6) -> Path:
    """A finished TopoDisc ProVQ run of ``steps`` steps (warmup, k-means, transition and hard
    VQ all inside), fitted in this process; returns its run directory."""
    repo = Path(__file__).resolve().parents[1]
    warmup = max(1, steps // 3)
    provq_fit("--config", str(repo / "experiments" / "topodisc_provq.yaml"),
              "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.logger.init_args.save_dir", str(save_dir),
              "--trainer.logger.init_args.version", version,
              "--curriculum.warmup_steps", str(warmup), "--curriculum.transition_steps",
              str(warmup), "--curriculum.kmeans_collect_batches", "1")
    return Path(save_dir) / "topodisc_provq" / version


def cli_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """``provq-fit ARGS`` in this process as (exit code, stdout, stderr); argument errors exit
    before any training starts."""
    from provq_lightning.tools.fit import main

    argv = sys.argv
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


def effective_config(*configs: Path | str) -> dict[str, Any]:
    """The whole config ``provq-fit --config C1 --config C2 ...`` runs (its ``--print_config``):
    a shipped variant comes back with its base merged in and its curriculum under
    ``curriculum``, ready to edit and write to a file of its own."""
    from provq_lightning.tools.fit import main

    args = [arg for config in configs for arg in ("--config", str(config))]
    argv, out = sys.argv, io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            main([*args, "--print_config"])
    except SystemExit as exit_:
        if exit_.code:  # the parser's message went to stderr
            raise
    finally:
        sys.argv = argv
    return yaml.safe_load(out.getvalue())


def run_files(run: Path) -> dict[str, str]:
    """sha256 of every file of the run directory except the evaluations' ``eval/``."""
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.relative_to(run).parts[0] != "eval"
    }
