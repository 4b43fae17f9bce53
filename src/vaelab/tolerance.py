"""The one rule for comparing a Monte Carlo estimate with an exact value, used by `vaelab check` and the tests.

An estimate agrees with the truth when ``|estimate - exact| <= Z_TOLERANCE * stderr + abs_tol``, where ``stderr`` is
the estimate's own standard error (computed from the same samples) and ``abs_tol`` absorbs floating-point rounding
(default: ``FLOAT_SLACK`` times machine epsilon of the dtype, scaled by the magnitude of the values).

Z_TOLERANCE = 4.5: for a normally distributed estimate the two-sided chance of a false alarm is 7e-6 per comparison,
so a suite of a few hundred seeded comparisons fails spuriously with probability ~1e-3 when seeds change, while
a bias of 5 standard errors is still caught more than half of the time.

Two computations of the same deterministic quantity (compiled against eager, one kernel against another) differ only
by rounding, and how much depends on the CPU's kernels (blocking, FMA, vector width: Intel and AMD differ). Their
tolerance is a bound on that rounding, not a number one machine printed: :func:`reduction_error_bound` gives
Higham's gamma_n = n u / (1 - n u) (u = eps / 2, the unit roundoff) for a sum or dot product of n terms, which holds
for any order of summation, blocked and vectorised ones included (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., sections 3.1 and 4.2): |fl(sum_i a_i b_i) - sum_i a_i b_i| <= gamma_n sum_i |a_i b_i|.
"""

from __future__ import annotations

import torch

Z_TOLERANCE = 4.5
FLOAT_SLACK = 1e3


def tolerance(stderr: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """The allowed |estimate - exact| per element: Z * stderr plus rounding slack for the dtype."""
    eps = torch.finfo(exact.dtype).eps if exact.is_floating_point() else torch.finfo(torch.float32).eps
    return Z_TOLERANCE * stderr + FLOAT_SLACK * eps * exact.abs().clamp_min(1.0)


def rounding_gamma(n: int, dtype: torch.dtype) -> float:
    """Higham's gamma_n = n u / (1 - n u) for ``dtype`` (u = eps / 2): the relative error bound of n rounded steps."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    unit = torch.finfo(dtype).eps / 2
    if n * unit >= 1:
        raise ValueError(f"gamma_n is unbounded for n = {n} steps in {dtype} (n u >= 1)")
    return n * unit / (1 - n * unit)


def reduction_error_bound(abs_terms_sum: torch.Tensor, n: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The most two float computations of the same sum of ``n`` products can differ by, elementwise.

    Each is within gamma_n * sum |a_i b_i| of the exact sum (any summation order), so they differ by at most twice
    that. Args: ``abs_terms_sum``, the sum of the terms' absolute values (e.g. ``|A|.T @ |B|`` for ``A.T @ B``),
    computed in float64 so its own rounding does not matter; ``n``, the number of terms plus the rounded operations
    that produced each term; ``dtype``, the dtype the two computations ran in (default: ``abs_terms_sum``'s).
    """
    return 2 * rounding_gamma(n, dtype or abs_terms_sum.dtype) * abs_terms_sum


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
