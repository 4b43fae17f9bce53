"""The tolerance rules: Monte Carlo agreement (tested through every estimator test) and the rounding bound here."""

from __future__ import annotations

import pytest
import torch

from vaelab.tolerance import reduction_error_bound, rounding_gamma


def test_gamma_is_highams_for_the_unit_roundoff():
    u = 2.0**-24  # float32's unit roundoff, eps / 2
    assert rounding_gamma(1, torch.float32) == pytest.approx(u / (1 - u), rel=1e-15)
    assert rounding_gamma(1000, torch.float64) == pytest.approx(1000 * 2.0**-53, rel=1e-12)
    with pytest.raises(ValueError, match="unbounded"):
        rounding_gamma(2**24, torch.float32)


@pytest.mark.parametrize("n", [7, 1000, 100_000])
def test_float32_sums_in_any_order_stay_within_the_bound(n):
    # the bound must hold for the CPU's vectorised sum, a sequential sum and a matrix product alike
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, generator=g) * torch.exp(3 * torch.randn(n, generator=g))  # terms over many magnitudes
    exact = a.double().sum()
    bound = reduction_error_bound(a.double().abs().sum(), n, torch.float32) / 2
    sequential = torch.zeros((), dtype=torch.float32)
    for chunk in a.split(max(n // 50, 1)):  # a different order of summation
        sequential = sequential + chunk.sum()
    for got in (a.sum(), sequential, (a[None] @ torch.ones(n, 1)).squeeze()):
        assert (got.double() - exact).abs() <= bound
