"""The reference backend and the public API against the literal float64 oracle and SPEC section 6."""
import math

import pytest
import torch

import intl_ops
from intl_ops import literal, reference

SHAPES = [(13, 21), (37, 50), (64, 17), (130, 96)]
SHAPE_IDS = [f"{m}x{d}" for m, d in SHAPES]


def _rand(m, d, dtype=torch.float64, scale=1.0, shift=0.0):
    """Fresh random data with an uneven spectrum and nonzero means."""
    x = torch.randn(m, d, dtype=torch.float64) @ torch.diag(torch.linspace(0.3, 2.0, d, dtype=torch.float64))
    return (scale * x + shift + torch.randn(1, d, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
@pytest.mark.parametrize("iters", range(7), ids=lambda t: f"T{t}")
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_iternorm_matches_literal_fp64(shape, iters, axis):
    x = _rand(*shape).requires_grad_()
    y = intl_ops.iternorm(x, iters, axis, backend="reference")
    y_lit = literal.iternorm(x, iters, axis)
    torch.testing.assert_close(y, y_lit, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_lit,) = torch.autograd.grad(y_lit, x, g)
    torch.testing.assert_close(gx, gx_lit, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=SHAPE_IDS[:3])
def test_trace_loss_matches_literal(shape, axis):
    y = _rand(*shape).requires_grad_()
    tl = intl_ops.trace_loss(y, axis)
    tl_lit = literal.trace_loss(y, axis)
    torch.testing.assert_close(tl, tl_lit)
    torch.testing.assert_close(torch.autograd.grad(tl, y)[0], torch.autograd.grad(tl_lit, y)[0])


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
@pytest.mark.parametrize("k,with_target", [(2, False), (4, False), (1, True), (3, True)],
                         ids=["K2", "K4", "M-K1", "M-K3"])
def test_intl_loss_matches_literal(k, with_target, axis):
    views = [_rand(24, 40).requires_grad_() for _ in range(k)]
    target = _rand(24, 40) if with_target else None
    loss = intl_ops.intl_loss(views, 3, axis, target=target, backend="reference")
    loss_lit = literal.intl_loss(views, 3, axis, target=target)
    torch.testing.assert_close(loss, loss_lit)
    for g, g_lit in zip(torch.autograd.grad(loss, views), torch.autograd.grad(loss_lit, views)):
        torch.testing.assert_close(g, g_lit, rtol=1e-8, atol=1e-10)


def test_intl_loss_accepts_stacked_tensor_and_beta():
    views = torch.randn(3, 16, 30, dtype=torch.float64)
    loss = intl_ops.intl_loss(views, beta=0.3)
    torch.testing.assert_close(loss, literal.intl_loss(list(views), beta=0.3))
    assert intl_ops.default_beta(256) == pytest.approx(0.05)


def test_gradcheck_iternorm():
    for axis in (0, 1):
        x = _rand(7, 9).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: intl_ops.iternorm(t, 4, axis), (x,))


def test_gradcheck_trace_loss():
    for axis in (0, 1):
        y = _rand(6, 11).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: intl_ops.trace_loss(t, axis), (y,))


@pytest.mark.parametrize("k,with_target", [(2, False), (4, False), (2, True)], ids=["K2", "K4", "target"])
def test_gradcheck_intl_loss(k, with_target):
    views = [_rand(6, 9).requires_grad_() for _ in range(k)]
    target = _rand(6, 9) if with_target else None
    for axis in (0, 1):
        assert torch.autograd.gradcheck(
            lambda *vs: intl_ops.intl_loss(list(vs), 3, axis, beta=0.7, target=target), tuple(views))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
def test_low_precision_close_to_fp64(dtype, axis):
    """Computed in fp32 inside: the error is the input/output rounding, not the loop's."""
    x64 = _rand(33, 70)
    x = x64.to(dtype).requires_grad_()
    y = intl_ops.iternorm(x, 4, axis)
    assert y.dtype == dtype
    y_ref = literal.iternorm(x.detach().double(), 4, axis)
    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    err = (y.double() - y_ref).abs().max() / y_ref.abs().max()
    assert err < tol
    loss = intl_ops.intl_loss([x, x * 2 + 1], axis=axis)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- SPEC section 6 oracles
def _p_T(lam, iters):
    p = torch.ones_like(lam)
    for _ in range(iters):
        p = 1.5 * p - 0.5 * lam * p**3
    return p


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
@pytest.mark.parametrize("iters", [1, 4, 6])
def test_output_spectrum_formula(iters, axis):
    x = _rand(20, 45) if axis == 0 else _rand(45, 20)
    a = reference.as_observations(x, axis)
    ac = a - a.mean(0)
    sigma = ac.T @ ac / (a.shape[0] - 1)
    lam = torch.linalg.eigvalsh(sigma / sigma.trace())
    y = intl_ops.iternorm(x, iters, axis)
    yo = reference.as_observations(y, axis)
    out = torch.linalg.eigvalsh(yo.T @ yo / (yo.shape[0] - 1))
    torch.testing.assert_close(out, lam * _p_T(lam, iters) ** 2, rtol=1e-8, atol=1e-12)


def test_h_composition_matches_polynomial_and_floor():
    h = lambda q: q * (1.5 - 0.5 * q) ** 2  # noqa: E731
    lam = torch.linspace(0, 1, 101, dtype=torch.float64)
    q = lam.clone()
    for _ in range(4):
        q = h(q)
    torch.testing.assert_close(q, lam * _p_T(lam, 4) ** 2)
    h4 = 1 / 256
    for _ in range(4):
        h4 = h(h4)
    assert h4 == pytest.approx(0.095, abs=0.002)
    # Trace-loss floor: TL >= C (1 - h^T(1/C))^2 for any input with C = 256 variables.
    x = torch.randn(256, 300, dtype=torch.float64)
    y = intl_ops.iternorm(x, 4, 0)
    assert intl_ops.trace_loss(y, 0) >= 256 * (1 - h4) ** 2 - 1e-6
    assert 256 * (1 - h4) ** 2 == pytest.approx(210, abs=2)


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
def test_scale_and_shift_invariance(axis):
    x = _rand(19, 31)
    y = intl_ops.iternorm(x, 4, axis)
    torch.testing.assert_close(intl_ops.iternorm(3.7 * x, 4, axis), y)
    shift = torch.randn(19, 1, dtype=torch.float64) if axis == 0 else torch.randn(1, 31, dtype=torch.float64)
    torch.testing.assert_close(intl_ops.iternorm(x + 100 * shift, 4, axis), y, rtol=1e-7, atol=1e-9)


def test_converges_to_zca_at_moderate_T():
    x = torch.randn(500, 8, dtype=torch.float64) @ torch.diag(torch.linspace(0.8, 1.2, 8, dtype=torch.float64))
    y = intl_ops.iternorm(x, 8, axis=1)
    lam = torch.linalg.eigvalsh(y.T @ y / (y.shape[0] - 1))
    # h^T(lam_i) -> 1 for every eigenvalue: the output covariance approaches the identity (ZCA).
    torch.testing.assert_close(lam, torch.ones_like(lam), rtol=0, atol=1e-3)


# ---------------------------------------------------------------- degenerate and bad input
@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
def test_constant_input_is_zero_with_zero_grad(axis):
    x = torch.full((9, 12), 3.0, requires_grad=True)
    y = intl_ops.iternorm(x, 4, axis)
    assert torch.equal(y, torch.zeros_like(y))
    (y * torch.randn_like(y)).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    views = [torch.full((9, 12), 2.0, requires_grad=True) for _ in range(2)]
    loss = intl_ops.intl_loss(views, axis=axis)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v.grad).all() for v in views)


BAD_CALLS = [
    (lambda: intl_ops.iternorm(torch.randn(3, 4, 5)), ValueError, "x must be 2-D"),
    (lambda: intl_ops.iternorm(torch.randn(8)), ValueError, "x must be 2-D"),
    (lambda: intl_ops.iternorm(torch.randn(5, 1), axis=0), ValueError, "at least 2"),
    (lambda: intl_ops.iternorm(torch.randn(1, 5), axis=1), ValueError, "at least 2"),
    (lambda: intl_ops.iternorm(torch.randn(4, 4), iters=-1), ValueError, "iters"),
    (lambda: intl_ops.iternorm(torch.randn(4, 4), iters=2.5), TypeError, "iters"),
    (lambda: intl_ops.iternorm(torch.randn(4, 4), iters=True), TypeError, "iters"),
    (lambda: intl_ops.iternorm(torch.randn(4, 4), axis=2), ValueError, "axis"),
    (lambda: intl_ops.iternorm(torch.ones(4, 4, dtype=torch.int64)), TypeError, "floating-point"),
    (lambda: intl_ops.iternorm(torch.ones(4, 4, dtype=torch.complex64)), TypeError, "floating-point"),
    (lambda: intl_ops.iternorm([[1.0, 2.0]]), TypeError, "torch.Tensor"),
    (lambda: intl_ops.iternorm(torch.randn(4, 4), backend="fast"), ValueError, "backend"),
    (lambda: intl_ops.trace_loss(torch.randn(4, 1), axis=0), ValueError, "at least 2"),
    (lambda: intl_ops.intl_loss([torch.randn(4, 6)]), ValueError, "at least 2 crops"),
    (lambda: intl_ops.intl_loss([]), ValueError, "must not be empty"),
    (lambda: intl_ops.intl_loss([torch.randn(4, 6), torch.randn(4, 7)]), ValueError, "one shape"),
    (lambda: intl_ops.intl_loss([torch.randn(4, 6), torch.randn(4, 6, dtype=torch.float64)]), TypeError, "one dtype"),
    (lambda: intl_ops.intl_loss([torch.randn(4, 6), torch.randn(4, 6, device="meta")]), ValueError, "one device"),
    (lambda: intl_ops.intl_loss(torch.randn(4, 6)), ValueError, "3-D"),
    (lambda: intl_ops.intl_loss([torch.randn(4, 6)] * 2, target=torch.randn(4, 5)), ValueError, "target has shape"),
    (lambda: intl_ops.intl_loss([torch.randn(4, 6)] * 2, target=torch.ones(4, 6, dtype=torch.int32)), TypeError, "target"),
    (lambda: intl_ops.intl_loss([torch.ones(4, 6, dtype=torch.int32)] * 2), TypeError, "floating-point"),
    (lambda: intl_ops.intl_loss([torch.randn(4, 6)] * 2, beta="big"), TypeError, "beta"),
    (lambda: intl_ops.iternorm(torch.randn(4, 4), process_group=object()), RuntimeError, "not initialized"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS, ids=[f"bad{i}" for i in range(len(BAD_CALLS))])
def test_bad_input_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_unavailable_backend_says_why():
    reasons = intl_ops.available_backends("cpu")
    assert reasons["reference"] == "available"
    if reasons["cuda"] != "available":
        with pytest.raises(RuntimeError, match="cuda"):
            intl_ops.iternorm(torch.randn(4, 4), backend="cuda")


def test_non_finite_check_is_opt_in(monkeypatch):
    x = torch.randn(6, 8)
    x[2, 3] = float("nan")
    assert torch.isnan(intl_ops.iternorm(x)).any()  # off by default: no device sync
    monkeypatch.setenv("INTL_OPS_CHECK", "1")
    with pytest.raises(ValueError, match="x contains non-finite"):
        intl_ops.iternorm(x)
    intl_ops.set_check_finite(False)
    try:
        intl_ops.iternorm(x)
    finally:
        intl_ops.set_check_finite(None)
    with pytest.raises(ValueError, match="views contains non-finite"):
        intl_ops.intl_loss([x, x])


def test_modules():
    x = _rand(10, 14)
    torch.testing.assert_close(intl_ops.IterNorm(3, 1)(x), intl_ops.iternorm(x, 3, 1))
    views = [_rand(10, 14) for _ in range(2)]
    torch.testing.assert_close(intl_ops.INTLLoss(3, 0, beta=0.2)(views), literal.intl_loss(views, 3, 0, 0.2))
    assert "iters=3" in repr(intl_ops.IterNorm(3, 1))


def test_return_parts_add_up():
    views = [_rand(16, 20) for _ in range(3)]
    loss, parts = intl_ops.intl_loss(views, return_parts=True, beta=0.1)
    torch.testing.assert_close(loss, parts["align"] + parts["beta"] * parts["trace"])
    assert not parts["align"].requires_grad
    assert math.isclose(parts["beta"], 0.1)


def test_autocast_does_not_lower_internal_precision():
    x = _rand(24, 40).float().requires_grad_()
    y_plain = intl_ops.iternorm(x, 4, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_amp = intl_ops.iternorm(x, 4, 0)
        loss = intl_ops.intl_loss([x, x.flip(0)], 4, 0)
    assert y_amp.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(y_amp, y_plain)
    loss.backward()
    ref = literal.intl_loss([x.detach().double(), x.detach().double().flip(0)], 4, 0)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
