"""``python -m provq_lightning.tools.scaled_steps CONFIG STEPS``: the ``provq-sweep --set``
overrides that shorten CONFIG's run to STEPS optimizer steps, every step count in proportion
(``make protein-sample PROTEIN_STEPS=N``).

Scaled by STEPS / ``trainer.max_steps``: the curriculum's ``warmup_steps`` and
``transition_steps`` (a config without a curriculum, or with zeros, keeps them),
``model.init_args.lr_warmup_steps``, and ``trainer.val_check_interval``, rounded down to a
divisor of STEPS so that the last step is validated (a STEPS with no divisor near the scaled
interval is refused, naming one that works). ``curriculum.kmeans_collect_batches`` is capped at
the scaled warmup. Checkpoint intervals stay: ``FinalCheckpoint`` saves ``last.ckpt`` at the
last step whatever they are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from provq_lightning.errors import ProvqError
from provq_lightning.runs.loading import read_config


def _scaled(value: int, steps: int, max_steps: int) -> int:
    """``value`` x steps / max_steps, rounded, at least 1 unless ``value`` is 0."""
    return 0 if value == 0 else max(1, round(value * steps / max_steps))


def scaled_overrides(cfg: dict[str, Any], steps: int, name: str = "the config") -> dict[str, int]:
    """Dotted provq-fit keys -> values that run ``cfg`` for ``steps`` steps in proportion."""
    trainer = cfg.get("trainer") or {}
    max_steps = trainer.get("max_steps")
    if not isinstance(max_steps, int) or max_steps <= 0:
        raise ProvqError(f"{name} sets no trainer.max_steps to scale from; give one")
    if steps <= 0:
        raise ProvqError(f"steps must be a positive number, got {steps}")
    out = {"trainer.max_steps": steps}
    curriculum = cfg.get("curriculum") or {}
    for key in ("warmup_steps", "transition_steps"):
        if isinstance(curriculum.get(key), int):
            out[f"curriculum.{key}"] = _scaled(curriculum[key], steps, max_steps)
    collect = curriculum.get("kmeans_collect_batches")
    warmup = out.get("curriculum.warmup_steps", 0)
    if isinstance(collect, int) and warmup and collect > warmup:
        out["curriculum.kmeans_collect_batches"] = warmup
    lr_warmup = ((cfg.get("model") or {}).get("init_args") or {}).get("lr_warmup_steps")
    if isinstance(lr_warmup, int):
        out["model.init_args.lr_warmup_steps"] = _scaled(lr_warmup, steps, max_steps)
    interval = trainer.get("val_check_interval")
    if isinstance(interval, int) and interval > 0:
        wanted = min(steps, interval * steps / max_steps)
        every = max(d for d in range(1, int(wanted) + 1) if steps % d == 0) if wanted >= 1 else 1
        if every < wanted / 2:
            points = max(1, max_steps // interval)
            raise ProvqError(
                f"{steps} steps have no divisor near the scaled validation interval "
                f"{wanted:.0f}, so the last step would not be validated; use a multiple of "
                f"{points}, e.g. {max(points, steps // points * points)}")
        out["trainer.val_check_interval"] = every
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scaled_steps", description=__doc__.split("\n")[0])
    parser.add_argument("config", type=Path, help="a provq-fit config (a variant is composed "
                        "over its base)")
    parser.add_argument("steps", type=int, help="optimizer steps of the shortened run")
    args = parser.parse_args(argv)
    try:
        overrides = scaled_overrides(read_config(args.config), args.steps, str(args.config))
    except (ProvqError, OSError) as err:
        print(f"scaled_steps: error: {err}", file=sys.stderr)
        sys.exit(1)
    print(" ".join(f"--set {key}={value}" for key, value in overrides.items()))


if __name__ == "__main__":
    main()
