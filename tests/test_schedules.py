"""KL-weight schedules: values at their breakpoints, shapes, the registry and parameter validation.

Schedules are plain float arithmetic, so values are compared exactly where the formula is exact (breakpoints,
cycle boundaries) and with ``pytest.approx`` (relative 1e-12) elsewhere.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vaelab.schedules import (
    ANNEAL_SHAPES,
    SCHEDULES,
    Anneal,
    Capacity,
    Constant,
    Cyclical,
    Linear,
    make_schedule,
)


def approx(value):
    return pytest.approx(value, rel=1e-12, abs=1e-12)


# --- constant and linear warm-up --------------------------------------------------------------------------------------
def test_constant_is_constant():
    s = Constant(value=2.5)
    assert [s(step) for step in (0, 1, 10**9)] == [2.5, 2.5, 2.5]
    assert Constant()(7) == 1.0
    assert s.objective_kwargs(3) == {"beta": 2.5}


def test_linear_warm_up_breakpoints():
    s = Linear(steps=100)
    assert s(0) == 0.0
    assert s(25) == approx(0.25)
    assert s(50) == approx(0.5)
    assert s(100) == 1.0
    assert s(101) == 1.0
    assert s(10**6) == 1.0


def test_linear_warm_up_between_custom_endpoints():
    s = Linear(steps=10, start=0.2, end=0.7)
    assert s(0) == approx(0.2)
    assert s(5) == approx(0.45)
    assert s(10) == approx(0.7)
    assert s(11) == approx(0.7)


def test_linear_with_zero_steps_starts_at_end():
    assert Linear(steps=0, start=0.0, end=1.0)(0) == 1.0


# --- anneal -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", sorted(ANNEAL_SHAPES))
def test_anneal_endpoints(shape):
    s = Anneal(steps=40, start=4.0, end=1.0, shape=shape)
    assert s(0) == 4.0
    assert s(40) == 1.0
    assert s(41) == 1.0
    assert s(10**6) == 1.0


@pytest.mark.parametrize("shape", sorted(ANNEAL_SHAPES))
def test_anneal_is_monotone_non_increasing(shape):
    s = Anneal(steps=37, start=6.0, end=1.0, shape=shape)
    values = np.array([s(step) for step in range(60)])
    assert (np.diff(values) <= 0).all()
    assert (np.diff(values[:38]) < 0).all()  # strictly decreasing during the ramp


def test_anneal_midpoints():
    assert Anneal(steps=10, start=4.0, end=1.0, shape="linear")(5) == approx(2.5)
    # cosine: (1 - cos(pi / 2)) / 2 = 1/2 at the midpoint, flat at both ends
    cosine = Anneal(steps=10, start=4.0, end=1.0, shape="cosine")
    assert cosine(5) == approx(2.5)
    assert cosine(0) - cosine(1) < Anneal(steps=10, shape="linear")(0) - Anneal(steps=10, shape="linear")(1)
    assert cosine(9) - cosine(10) < 0.3 * (cosine(4) - cosine(5))


def test_anneal_defaults_are_the_beta_vae_recipe():
    s = make_schedule("anneal", steps=10)
    assert (s.start, s.end, s.shape) == (4.0, 1.0, "linear")


# --- cyclical ---------------------------------------------------------------------------------------------------------
def test_cyclical_cycle_boundaries():
    s = Cyclical(total_steps=100, cycles=4, ratio=0.5)  # cycles of 25 steps, ramps of 12.5 steps
    for start in (0, 25, 50, 75):
        assert s(start) == 0.0  # each cycle starts from 0
        assert s(start + 5) == approx(5 / 12.5)  # mid-ramp
        assert s(start + 13) == 1.0  # ramp over
        assert s(start + 24) == 1.0  # holds to the end of the cycle
    assert s(100) == 1.0  # after total_steps it stays at the top
    assert s(10**6) == 1.0


def test_cyclical_non_divisible_period_and_ratio_one():
    s = Cyclical(total_steps=10, cycles=3, ratio=1.0, end=2.0)  # period 10/3 steps
    # tau = (3 * step mod 10) / 10
    expected = [0.0, 0.6, 1.2, 1.8, 0.4, 1.0, 1.6, 0.2, 0.8, 1.4]
    assert [s(step) for step in range(10)] == [approx(v) for v in expected]


def test_cyclical_with_one_cycle_is_a_warm_up():
    cyc = Cyclical(total_steps=100, cycles=1, ratio=0.4)
    warm = Linear(steps=40)
    assert [cyc(step) for step in range(150)] == [approx(warm(step)) for step in range(150)]


# --- capacity ---------------------------------------------------------------------------------------------------------
def test_capacity_rises_linearly_then_holds():
    s = Capacity(c_max=25.0, steps=100, gamma=1000.0)
    assert s.capacity(0) == 0.0
    assert s.capacity(40) == approx(10.0)
    assert s.capacity(100) == 25.0
    assert s.capacity(200) == 25.0
    assert s(40) == s.capacity(40)
    assert s.gamma == 1000.0
    assert s.objective_kwargs(40) == {"capacity": approx(10.0), "gamma": 1000.0}


def test_beta_schedules_drive_beta():
    for s in (Constant(), Linear(steps=5), Anneal(steps=5), Cyclical(total_steps=5)):
        assert s.objective_kwargs(3) == {"beta": s(3)}


# --- registry and validation ------------------------------------------------------------------------------------------
EXAMPLE_PARAMS = {
    "constant": dict(value=2.0),
    "linear": dict(steps=10, start=0.1, end=0.9),
    "anneal": dict(steps=10, start=3.0, end=1.0, shape="cosine"),
    "cyclical": dict(total_steps=20, cycles=2, ratio=0.25),
    "capacity": dict(c_max=5.0, steps=10, gamma=30.0),
}


def test_registry_lists_every_schedule():
    assert set(SCHEDULES) == set(EXAMPLE_PARAMS)


@pytest.mark.parametrize("name", sorted(EXAMPLE_PARAMS))
def test_registry_round_trip(name):
    s = make_schedule(name, **EXAMPLE_PARAMS[name])
    assert type(s) is SCHEDULES[name]
    assert make_schedule(name, **dataclasses.asdict(s)) == s
    assert isinstance(s(3), float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 1  # schedules are immutable


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown schedule 'warmup'.*'constant'.*'cyclical'"):
        make_schedule("warmup", steps=10)


def test_unknown_and_missing_parameters_are_named():
    with pytest.raises(ValueError, match=r"unknown parameter.*'step'.*valid parameters: 'steps'"):
        make_schedule("linear", step=10)
    with pytest.raises(ValueError, match=r"needs parameter.*'total_steps'"):
        make_schedule("cyclical", cycles=2)


@pytest.mark.parametrize(
    ("name", "params", "bad"),
    [
        ("linear", dict(steps=-1), "steps"),
        ("linear", dict(steps=2.5), "steps"),
        ("linear", dict(steps=10, end=-1.0), "end"),
        ("constant", dict(value=float("nan")), "value"),
        ("anneal", dict(steps=-5), "steps"),
        ("anneal", dict(steps=10, start=0.5, end=1.0), "start must be >= end"),
        ("anneal", dict(steps=10, shape="exponential"), "shape"),
        ("cyclical", dict(total_steps=0), "total_steps"),
        ("cyclical", dict(total_steps=100, cycles=0), "cycles"),
        ("cyclical", dict(total_steps=3, cycles=4), "cycles"),
        ("cyclical", dict(total_steps=100, ratio=0.0), "ratio"),
        ("cyclical", dict(total_steps=100, ratio=1.5), "ratio"),
        ("capacity", dict(c_max=-1.0, steps=10), "c_max"),
        ("capacity", dict(c_max=5.0, steps=-10), "steps"),
        ("capacity", dict(c_max=5.0, steps=10, gamma=float("inf")), "gamma"),
    ],
)
def test_bad_parameters_raise_naming_them(name, params, bad):
    with pytest.raises(ValueError, match=bad):
        make_schedule(name, **params)


@pytest.mark.parametrize("step", [-1, 1.0, True, "3"])
def test_bad_steps_raise(step):
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        Linear(steps=10)(step)


def test_numpy_integer_steps_are_accepted():
    assert Linear(steps=10)(np.int64(5)) == approx(0.5)
