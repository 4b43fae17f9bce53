"""Tests for vaelab.flows: log-determinants against autograd Jacobians, exact inverses, the MADE's autoregressive
structure and the planar map's invertibility constraint (float64, seeded; deterministic, so rounding tolerances)."""

from __future__ import annotations

import pytest
import torch

from vaelab.flows import MADE, IAFTransform, PlanarTransform

DTYPE = torch.float64
D, B, K = 3, 4, 2


def planar(seed: int, scale: float = 1.0) -> PlanarTransform:
    gen = torch.Generator().manual_seed(seed)
    u, w = (scale * torch.randn(B, D, generator=gen, dtype=DTYPE) for _ in range(2))
    return PlanarTransform(u, w, torch.randn(B, generator=gen, dtype=DTYPE))


def iaf(seed: int, hidden=(8, 8), reverse=False) -> IAFTransform:
    torch.manual_seed(seed)
    made = MADE(D, hidden, 5, reverse=reverse).to(DTYPE)
    gen = torch.Generator().manual_seed(seed)
    return IAFTransform(made, torch.randn(B, 5, generator=gen, dtype=DTYPE))


def autograd_log_det(transform, x: torch.Tensor) -> torch.Tensor:
    """log |det df/dz| per row of ``x [K, B, d]``, from the full Jacobian that autograd builds, row by row."""
    out = torch.empty(x.shape[:-1], dtype=x.dtype)
    for k in range(x.shape[0]):
        for b in range(x.shape[1]):

            def one(v, k=k, b=b):
                full = x[k].clone()
                full[b] = v
                return transform._call(full)[b]

            jac = torch.autograd.functional.jacobian(one, x[k, b])  # (d, d)
            out[k, b] = torch.linalg.slogdet(jac).logabsdet
    return out


TRANSFORMS = {
    "planar": lambda: planar(1),
    "planar-contracting": lambda: planar(2, scale=3.0),  # w.u' near -1: a nearly singular map
    "iaf": lambda: iaf(3),
    "iaf-reversed": lambda: iaf(4, reverse=True),
    "iaf-linear": lambda: iaf(5, hidden=()),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_log_det_matches_the_autograd_jacobian(name):
    transform = TRANSFORMS[name]()
    x = torch.randn(K, B, D, generator=torch.Generator().manual_seed(9), dtype=DTYPE)
    y = transform(x)
    got = transform.log_abs_det_jacobian(x, y)
    assert got.shape == (K, B)
    torch.testing.assert_close(got, autograd_log_det(transform, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_inverse_is_exact_and_the_cache_returns_the_input(name):
    transform = TRANSFORMS[name]()
    x = torch.randn(K, B, D, generator=torch.Generator().manual_seed(10), dtype=DTYPE)
    y = transform(x)
    assert transform.inv(y) is x  # cache_size=1: the latest pair is remembered
    torch.testing.assert_close(transform.inv(y.clone()), x, rtol=1e-10, atol=1e-10)  # a copy: inverted


def test_planar_inverse_has_the_implicit_function_gradient():
    gen = torch.Generator().manual_seed(11)
    u, w = (torch.randn(B, D, generator=gen, dtype=DTYPE).requires_grad_() for _ in range(2))
    b = torch.randn(B, generator=gen, dtype=DTYPE).requires_grad_()
    y = torch.randn(K, B, D, generator=gen, dtype=DTYPE).requires_grad_()
    assert torch.autograd.gradcheck(lambda u, w, b, y: PlanarTransform(u, w, b, cache_size=0).inv(y), (u, w, b, y))


def test_planar_map_stays_invertible_for_any_u():
    w = torch.tensor([[1.0, 0.0, 0.0]], dtype=DTYPE)
    transform = PlanarTransform(-10 * w, w, torch.zeros(1, dtype=DTYPE))  # u against w: f would fold back
    assert bool((transform.wu > -1).all())
    line = torch.linspace(-5, 5, 201, dtype=DTYPE)[:, None, None] * w  # (201, 1, 3) along w
    moved = transform(line)[..., 0].squeeze(-1)
    assert bool((moved.diff() > 0).all())  # strictly increasing along w: one-to-one
    zero_w = PlanarTransform(torch.ones(1, D, dtype=DTYPE), torch.zeros(1, D, dtype=DTYPE), torch.zeros(1, dtype=DTYPE))
    assert bool(torch.isfinite(zero_w.u).all())  # w = 0: u' = u, no 0 / 0


@pytest.mark.parametrize("hidden", [(), (7,), (6, 5)])
@pytest.mark.parametrize("reverse", [False, True])
def test_made_output_i_sees_only_inputs_before_i(hidden, reverse):
    torch.manual_seed(0)
    made = MADE(4, hidden, 2, reverse=reverse).to(DTYPE)
    with torch.no_grad():  # no masked weight at 0 by chance
        for p in made.parameters():
            p.copy_(torch.randn_like(p))
    h = torch.randn(1, 2, dtype=DTYPE)
    x = torch.randn(1, 4, dtype=DTYPE)
    order = torch.arange(4).flip(0) if reverse else torch.arange(4)
    rank = torch.empty(4, dtype=torch.long)
    rank[order] = torch.arange(4)  # position of each input in the order
    for which in (0, 1):
        jac = torch.autograd.functional.jacobian(lambda v, which=which: made(v, h)[which][0], x[0])  # (4, 4)
        allowed = rank[None, :] < rank[:, None]  # output i may depend on input j iff j comes before i
        assert bool((jac[~allowed] == 0).all())
        assert bool((jac[allowed] != 0).all())  # and does, with random weights
