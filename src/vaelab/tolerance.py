"""The one rule for comparing a Monte Carlo estimate with an exact value, used by `vaelab check` and the tests.

An estimate agrees with the truth when ``|estimate - exact| <= Z_TOLERANCE * stderr + abs_tol``, where ``stderr`` is
the estimate's own standard error (computed from the same samples) and ``abs_tol`` absorbs floating-point rounding
(default: ``FLOAT_SLACK`` times machine epsilon of the dtype, scaled by the magnitude of the values).

Z_TOLERANCE = 4.5: for a normally distributed estimate the two-sided chance of a false alarm is 7e-6 per comparison,
so a suite of a few hundred seeded comparisons fails spuriously with probability ~1e-3 when seeds change, while
a bias of 5 standard errors is still caught more than half of the time.
"""

from __future__ import annotations

import torch

Z_TOLERANCE = 4.5
FLOAT_SLACK = 1e3


def tolerance(stderr: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """The allowed |estimate - exact| per element: Z * stderr plus rounding slack for the dtype."""
    eps = torch.finfo(exact.dtype).eps if exact.is_floating_point() else torch.finfo(torch.float32).eps
    return Z_TOLERANCE * stderr + FLOAT_SLACK * eps * exact.abs().clamp_min(1.0)


def within_stderr(estimate: torch.Tensor, exact: torch.Tensor, stderr: torch.Tensor) -> torch.Tensor:
    """Boolean tensor: does each estimate agree with its exact value under the rule above?"""
    estimate, exact, stderr = torch.broadcast_tensors(
        torch.as_tensor(estimate), torch.as_tensor(exact), torch.as_tensor(stderr)
    )
    return (estimate - exact).abs() <= tolerance(stderr, exact)


def assert_within_stderr(estimate, exact, stderr, what: str = "estimate") -> None:
    """Raise AssertionError with the worst z-score if any estimate disagrees with its exact value."""
    estimate, exact, stderr = (torch.as_tensor(t, dtype=torch.float64) for t in (estimate, exact, stderr))
    ok = within_stderr(estimate, exact, stderr)
    if not bool(ok.all()):
        z = ((estimate - exact).abs() / stderr.clamp_min(1e-300)).max().item()
        raise AssertionError(
            f"{what} disagrees with the exact value beyond {Z_TOLERANCE} standard errors "
            f"(worst |z| = {z:.2f}):\n estimate={estimate}\n exact={exact}\n stderr={stderr}"
        )
