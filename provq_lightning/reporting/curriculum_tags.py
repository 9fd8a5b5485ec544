"""How the curriculum reads in TensorBoard, where a tag is all a curve shows.

- ``curriculum/phase`` is logged as a number; ``log_phase_legend`` writes once per fit what the
  numbers mean (a text summary, ``curriculum/phase_legend``) and a custom-scalars layout whose
  chart title says it too.
- Validation always quantizes hard, so during warmup (a codebook not yet seeded) its metrics
  spike far above the later ones and flatten the curves: ``route_warmup_validation`` makes a
  logger write the ``val/`` scalars of a validation inside warmup as ``val_warmup/<name>``.
  Only what the loggers write changes: callbacks (checkpoint monitors, ``metrics.json``, the
  progress bar) still see ``val/<name>`` in every phase.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from provq_lightning.schedules import Phase

VAL_WARMUP = "val_warmup"
PHASE_TAG = "curriculum/phase"
PHASE_LEGEND_TAG = "curriculum/phase_legend"
PHASE_NAMES = {Phase.WARMUP: "warmup", Phase.TRANSITION: "transition", Phase.DISCRETE: "hard"}
PHASE_LEGEND = (
    f"{PHASE_TAG}: {int(Phase.WARMUP)} = warmup (continuous autoencoder, quantizer bypassed), "
    f"{int(Phase.TRANSITION)} = soft transition (z mixed with its code), "
    f"{int(Phase.DISCRETE)} = hard VQ"
)
PHASE_CHART = "phase (0 = warmup, 1 = transition, 2 = hard)"


def warmup_validation_tag(name: str) -> str | None:
    """The tag a ``val/`` scalar of a validation inside warmup is logged under; ``None`` for
    a name that is not a validation metric."""
    return f"{VAL_WARMUP}/{name[len('val/'):]}" if name.startswith("val/") else None


def phase_layout() -> dict[str, dict[str, list[Any]]]:
    """TensorBoard's custom-scalars layout: the curriculum's curves under titles that say what
    their values mean."""
    return {"curriculum": {
        PHASE_CHART: ["Multiline", [PHASE_TAG]],
        "alpha (1 = continuous, 0 = hard) and omega (weight of the VQ loss)":
            ["Multiline", ["curriculum/alpha", "curriculum/omega"]],
    }}


def log_phase_legend(loggers: list[Any], step: int) -> None:
    """Write the phase legend to every logger that takes text (TensorBoard's ``add_text``;
    its ``add_custom_scalars`` gets the layout too)."""
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if callable(getattr(experiment, "add_text", None)):
            experiment.add_text(PHASE_LEGEND_TAG, PHASE_LEGEND, step)
        if callable(getattr(experiment, "add_custom_scalars", None)):
            experiment.add_custom_scalars(phase_layout())


def route_warmup_validation(logger: Any, in_warmup: Callable[[], bool]) -> None:
    """Make ``logger`` write ``val/`` scalars as ``val_warmup/`` while ``in_warmup()``; a
    logger reused by a later fit follows that fit's ``in_warmup`` (it is wrapped once)."""
    logger._provq_in_warmup = in_warmup
    if getattr(logger, "_provq_routes_warmup_validation", False):
        return
    write = logger.log_metrics

    def log_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
        if logger._provq_in_warmup():
            metrics = {warmup_validation_tag(name) or name: v for name, v in metrics.items()}
        write(metrics, step)

    logger.log_metrics = log_metrics
    logger._provq_routes_warmup_validation = True
