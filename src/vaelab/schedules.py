"""KL-weight schedules: pure functions of the integer training step, owned by the training loop.

A schedule is a small frozen dataclass holding its parameters; calling it on a step returns a float. The model
and the estimators never see the step: the loop asks the schedule for its objective's keyword arguments,

    out = objective(model, x, k=k, **schedule.objective_kwargs(step))

which are ``{"beta": beta(step)}`` for the beta schedules and ``{"capacity": C(step), "gamma": gamma}`` for
the capacity schedule (see :mod:`vaelab.objectives`). Whatever the weight, the ELBO reported is the beta = 1
value.

Schedules are built by name from :data:`SCHEDULES` with :func:`make_schedule`. Parameters are validated when a
schedule is built (a bad one raises ``ValueError`` naming it), steps when it is called (integers >= 0).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields


# --- validation -------------------------------------------------------------------------------------------------------
def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_step(step: object) -> int:
    if not _is_integer(step) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    return int(step)


def _check_steps(value: object, name: str, *, minimum: int = 0) -> None:
    if not _is_integer(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_nonnegative(value: object, name: str) -> None:
    if not _is_real(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _ramp(step: int, steps: int) -> float:
    """t = min(step / steps, 1): how far a ramp of ``steps`` steps has gone (1 at once if steps = 0)."""
    return min(step, steps) / steps if steps > 0 else 1.0


# --- beta schedules ---------------------------------------------------------------------------------------------------
class BetaSchedule:
    """Base of the schedules whose value is the KL weight beta (they drive the objectives' ``beta=``)."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def objective_kwargs(self, step: int) -> dict[str, float]:
        """The objective's keyword arguments at ``step``: ``{"beta": beta(step)}``."""
        return {"beta": self(step)}


@dataclass(frozen=True, kw_only=True)
class Constant(BetaSchedule):
    """beta(step) = ``value`` at every step (1: the plain ELBO; > 1: a beta-VAE, Higgins et al., 2017)."""

    value: float = 1.0

    def __post_init__(self):
        _check_nonnegative(self.value, "value")

    def __call__(self, step: int) -> float:
        _check_step(step)
        return float(self.value)


@dataclass(frozen=True, kw_only=True)
class Linear(BetaSchedule):
    """KL warm-up: beta rises linearly from ``start`` to ``end`` over ``steps`` steps, then stays at ``end``.

        beta(step) = start + (end - start) * min(step / steps, 1).

    Starting near 0 lets the decoder learn to use z before the KL term pulls q onto the prior, a remedy for
    posterior collapse (Bowman et al., 2016, "Generating sentences from a continuous space"; Sønderby et al.,
    2016, "Ladder variational autoencoders").
    """

    steps: int
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        _check_steps(self.steps, "steps")
        _check_nonnegative(self.start, "start")
        _check_nonnegative(self.end, "end")

    def __call__(self, step: int) -> float:
        t = _ramp(_check_step(step), self.steps)
        return float(self.start + (self.end - self.start) * t)


# t in [0, 1] -> fraction of the way from start to end: 0 at t = 0, exactly 1 at t = 1, non-decreasing.
ANNEAL_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda t: t,
    "cosine": lambda t: 0.5 * (1.0 - math.cos(math.pi * t)),
}


@dataclass(frozen=True, kw_only=True)
class Anneal(BetaSchedule):
    """beta falls from a high ``start`` to ``end`` (default 1) over ``steps`` steps, then stays at ``end``.

        beta(step) = start + (end - start) * f(t),   t = min(step / steps, 1),
        f(t) = t                       (shape = "linear"),
        f(t) = (1 - cos(pi t)) / 2     (shape = "cosine": flat at both ends).

    A large beta early (beta-VAE: Higgins et al., 2017, "beta-VAE: learning basic visual concepts with a
    constrained variational framework") presses q towards the factorised prior; lowering it to 1 ends training
    on the ELBO itself. ``start >= end`` is required: for an increasing weight use ``linear``.
    """

    steps: int
    start: float = 4.0
    end: float = 1.0
    shape: str = "linear"

    def __post_init__(self):
        _check_steps(self.steps, "steps")
        _check_nonnegative(self.start, "start")
        _check_nonnegative(self.end, "end")
        if self.start < self.end:
            raise ValueError(
                f"anneal decreases beta, so start must be >= end; got start={self.start}, end={self.end} "
                "(use the 'linear' schedule to increase it)"
            )
        if self.shape not in ANNEAL_SHAPES:
            valid = ", ".join(map(repr, ANNEAL_SHAPES))
            raise ValueError(f"shape must be one of {valid}; got {self.shape!r}")

    def __call__(self, step: int) -> float:
        t = _ramp(_check_step(step), self.steps)
        return float(self.start + (self.end - self.start) * ANNEAL_SHAPES[self.shape](t))


@dataclass(frozen=True, kw_only=True)
class Cyclical(BetaSchedule):
    """Cyclical annealing: ``total_steps`` split into ``cycles`` equal cycles; in each, beta rises linearly
    from ``start`` to ``end`` over the first ``ratio`` of the cycle, then holds ``end``.

        tau(step) = (step mod (T / M)) / (T / M)    in [0, 1), the position within the current cycle,
        beta(step) = start + (end - start) * min(tau / R, 1),

    with T = ``total_steps``, M = ``cycles``, R = ``ratio``; steps count from 0 (the paper counts from 1).
    tau is computed in integers, (step * M mod T) / T, so cycle boundaries fall exactly on their steps. From
    step T on, beta stays at ``end``.

    Fu et al., 2019, "Cyclical annealing schedule: a simple approach to mitigating KL vanishing".
    """

    total_steps: int
    cycles: int = 4
    ratio: float = 0.5
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        _check_steps(self.total_steps, "total_steps", minimum=1)
        _check_steps(self.cycles, "cycles", minimum=1)
        if self.cycles > self.total_steps:
            raise ValueError(f"cycles must be <= total_steps = {self.total_steps}, got {self.cycles}")
        if not _is_real(self.ratio) or not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be a number in (0, 1], got {self.ratio!r}")
        _check_nonnegative(self.start, "start")
        _check_nonnegative(self.end, "end")

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        if step >= self.total_steps:
            return float(self.end)
        tau = (step * self.cycles % self.total_steps) / self.total_steps
        return float(self.start + (self.end - self.start) * min(tau / self.ratio, 1.0))


# --- capacity ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Capacity:
    """Controlled capacity increase: a target KL C(step) rather than a beta.

    The objective (the ``capacity`` objective in :mod:`vaelab.objectives`) is

        E_q[log p(x|z)] - gamma * |KL(q(z|x) || p(z)) - C(step)|,   C(step) = c_max * min(step / steps, 1),

    C in nats rising linearly from 0 so that the KL may grow gradually, held near C by a large constant
    ``gamma`` (1000 in the paper). Calling the schedule returns C(step); the training loop should pass
    :meth:`objective_kwargs` to the objective.

    Burgess et al., 2018, "Understanding disentangling in beta-VAE".
    """

    c_max: float
    steps: int
    gamma: float = 1000.0

    def __post_init__(self):
        _check_nonnegative(self.c_max, "c_max")
        _check_steps(self.steps, "steps")
        _check_nonnegative(self.gamma, "gamma")

    def capacity(self, step: int) -> float:
        """The target KL C(step), nats per example."""
        return float(self.c_max * _ramp(_check_step(step), self.steps))

    def __call__(self, step: int) -> float:
        return self.capacity(step)

    def objective_kwargs(self, step: int) -> dict[str, float]:
        """The ``capacity`` objective's keyword arguments: ``{"capacity": C(step), "gamma": gamma}``."""
        return {"capacity": self.capacity(step), "gamma": float(self.gamma)}


Schedule = Constant | Linear | Anneal | Cyclical | Capacity

SCHEDULES: dict[str, type[Schedule]] = {
    "constant": Constant,
    "linear": Linear,
    "anneal": Anneal,
    "cyclical": Cyclical,
    "capacity": Capacity,
}


def make_schedule(name: str, **params) -> Schedule:
    """Build the schedule registered as ``name`` in :data:`SCHEDULES` from its parameters.

    Raises:
        ValueError: ``name`` is not registered (the message lists the valid names); a parameter is unknown or
            missing (the message names it and lists the valid ones); or a value is out of range.
    """
    cls = SCHEDULES.get(name)
    if cls is None:
        raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(map(repr, SCHEDULES))}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for schedule {name!r}; "
            f"valid parameters: {', '.join(map(repr, known))}"
        )
    missing = [n for n, f in known.items() if f.default is MISSING and n not in params]
    if missing:
        raise ValueError(f"schedule {name!r} needs parameter(s) {', '.join(map(repr, missing))}")
    return cls(**params)
