"""Curriculum schedules: pure functions of the global step.

ProVQ's curriculum has three phases: a continuous warmup, a transition in which the decoder sees
``alpha * z + (1 - alpha) * z_q`` with ``alpha`` ramping from 1 to 0, and plain hard VQ. Every value
here is a function of the step alone, so a resumed run reproduces the exact trajectory.
"""

from __future__ import annotations

import math
from enum import IntEnum

SCHEDULES = ("cosine", "linear", "exponential", "hard")


class Phase(IntEnum):
    WARMUP = 0
    TRANSITION = 1
    DISCRETE = 2


def phase_at(step: int, warmup_steps: int, transition_steps: int) -> Phase:
    """The curriculum phase at ``step`` (0-based count of optimisation steps)."""
    if step < warmup_steps:
        return Phase.WARMUP
    if step < warmup_steps + transition_steps:
        return Phase.TRANSITION
    return Phase.DISCRETE


def cosine_alpha(t: int, transition_steps: int) -> float:
    """The paper's eq. 3: ``0.5 * (1 + cos(pi * t / T))`` for ``t < T``, else 0."""
    if t >= transition_steps:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * t / transition_steps))


def linear_alpha(t: int, transition_steps: int) -> float:
    if t >= transition_steps:
        return 0.0
    return 1.0 - t / transition_steps


def exponential_alpha(t: int, transition_steps: int) -> float:
    # exp(-5) ~ 0.0067, so the ramp ends close to hard VQ before the switch.
    if t >= transition_steps:
        return 0.0
    return math.exp(-5.0 * t / transition_steps)


def hard_alpha(t: int, transition_steps: int) -> float:
    """Continuous decoder input through the transition, then an abrupt switch to hard VQ."""
    return 1.0 if t < transition_steps else 0.0


_ALPHA_FNS = {
    "cosine": cosine_alpha,
    "linear": linear_alpha,
    "exponential": exponential_alpha,
    "hard": hard_alpha,
}


def check_schedule(schedule: str) -> str:
    if schedule not in _ALPHA_FNS:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    return schedule


def alpha_at(
    step: int, warmup_steps: int, transition_steps: int, schedule: str = "cosine"
) -> float:
    """Mixing weight of the continuous latent at ``step``.

    1 during warmup (the quantizer is bypassed then), the chosen ramp during the transition,
    0 in the discrete phase.
    """
    fn = _ALPHA_FNS[check_schedule(schedule)]
    phase = phase_at(step, warmup_steps, transition_steps)
    if phase is Phase.WARMUP:
        return 1.0
    if phase is Phase.DISCRETE:
        return 0.0
    return fn(step - warmup_steps, transition_steps)


def omega(alpha: float, lam: float) -> float:
    """Weight of the VQ losses: ``lam + (1 - lam) * (1 - alpha)``; reaches 1 once alpha is 0."""
    return lam + (1.0 - lam) * (1.0 - alpha)
