"""The reference backend and the public API against the literal float64 oracle and docs/math.md §6,
and tests/_oracle.py's tolerance rule itself (the *_detects_wrong_output tests: the checks can fail).

Every numerical comparison is _oracle.assert_matches_oracle: float64 results within FLOOR[float64]
(relative to the oracle's largest value) of the literal code; fp32/fp16/bf16 results within 2x the
error of the literal code run in fp32 (the eager baseline at the reference's compute precision).
"""
import math
import re

import pytest
import torch

import intl_ops
from intl_ops import literal, reference
from _oracle import (FLOOR, REF_CEIL, assert_matches_oracle, iternorm_grad_oracle, iternorm_saved_oracle,
                     literal_iternorm, perturbed, rel_err)

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
    assert_matches_oracle("y", y, y_lit)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_lit,) = torch.autograd.grad(y_lit, x, g)
    assert_matches_oracle("dx", gx, gx_lit)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
@pytest.mark.parametrize("iters", [0, 1, 4], ids=lambda t: f"T{t}")
def test_saved_tensors_match_oracle(iters, axis, dtype):
    """Every saved tensor and the backward with grad_v (the trace-loss route) against _oracle's textbook
    float64 (checked against the literal code's y by test_saved_oracle_is_the_literal_code)."""
    x = torch.randn(2, 19, 27, dtype=dtype) + 2.0
    saved = reference.iternorm_fwd(x, iters, axis)
    oracle = iternorm_saved_oracle(x, iters, axis)
    assert saved.y.dtype == dtype and all(t.dtype == dtype for t in saved[1:])
    for name, got, want in zip(saved._fields, saved, oracle, strict=True):
        assert_matches_oracle(name, got, want)
    gy, gv = torch.randn_like(saved.y), torch.randn_like(saved.v)
    dx = reference.iternorm_bwd(gy, gv, saved.y, x, *saved[1:6], iters, axis)
    assert_matches_oracle("dx", dx, iternorm_grad_oracle(x, iters, axis, gy, gv))


def test_saved_oracle_is_the_literal_code():
    for iters in (0, 1, 3):
        for axis in (0, 1):
            x = torch.randn(3, 11, 16, dtype=torch.float64)
            y = iternorm_saved_oracle(x, iters, axis).y
            assert_matches_oracle(f"T{iters} axis{axis}", y, literal_iternorm(x, iters, axis))


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=SHAPE_IDS[:3])
def test_trace_loss_matches_literal(shape, axis):
    y = _rand(*shape).requires_grad_()
    tl = intl_ops.trace_loss(y, axis)
    tl_lit = literal.trace_loss(y, axis)
    assert_matches_oracle("TL", tl, tl_lit)
    assert_matches_oracle("dTL/dy", torch.autograd.grad(tl, y)[0], torch.autograd.grad(tl_lit, y)[0])


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
@pytest.mark.parametrize("k,with_target", [(2, False), (4, False), (1, True), (3, True)],
                         ids=["K2", "K4", "M-K1", "M-K3"])
def test_intl_loss_matches_literal(k, with_target, axis):
    views = [_rand(24, 40).requires_grad_() for _ in range(k)]
    target = _rand(24, 40) if with_target else None
    loss = intl_ops.intl_loss(views, 3, axis, target=target, backend="reference")
    loss_lit = literal.intl_loss(views, 3, axis, target=target)
    assert_matches_oracle("loss", loss, loss_lit)
    grads, grads_lit = torch.autograd.grad(loss, views), torch.autograd.grad(loss_lit, views)
    for i, (g, g_lit) in enumerate(zip(grads, grads_lit, strict=True)):
        assert_matches_oracle(f"dview{i}", g, g_lit)


def test_intl_loss_accepts_stacked_tensor_and_beta():
    views = torch.randn(3, 16, 30, dtype=torch.float64)
    loss = intl_ops.intl_loss(views, beta=0.3)
    assert_matches_oracle("loss", loss, literal.intl_loss(list(views), beta=0.3))
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
    """Computed in fp32 inside: within 2x the error of the literal code run in fp32 on the same input
    (then rounded to dtype), values, loss and gradients."""
    x = _rand(33, 70).to(dtype)
    x32, x64 = x.float(), x.double()
    y = intl_ops.iternorm(x, 4, axis, backend="reference")
    assert y.dtype == dtype
    assert_matches_oracle("y", y, literal.iternorm(x64, 4, axis), ref=literal.iternorm(x32, 4, axis).to(dtype))
    views = torch.stack([x.detach(), (x.detach() * 2 + 1).flip(0)]).requires_grad_()
    loss = intl_ops.intl_loss(views, axis=axis, backend="reference")
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, views)
    assert grad.dtype == dtype

    def literal_loss(vs):
        vs = vs.requires_grad_()
        val = literal.intl_loss(list(vs), axis=axis)
        return val.detach(), torch.autograd.grad(val, vs)[0]

    (loss64, g64), (loss32, g32) = literal_loss(views.detach().double()), literal_loss(views.detach().float())
    assert_matches_oracle("loss", loss, loss64, ref=loss32, dtype=dtype)
    assert_matches_oracle("dviews", grad, g64, ref=g32.to(dtype))


# ---------------------------------------------------------------- docs/math.md §6 oracles
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
    assert_matches_oracle("spectrum", out, lam * _p_T(lam, iters) ** 2)


def test_h_composition_matches_polynomial_and_floor():
    h = lambda q: q * (1.5 - 0.5 * q) ** 2  # noqa: E731
    lam = torch.linspace(0, 1, 101, dtype=torch.float64)
    q = lam.clone()
    for _ in range(4):
        q = h(q)
    assert_matches_oracle("h^4", q, lam * _p_T(lam, 4) ** 2)
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
    assert_matches_oracle("scaled", intl_ops.iternorm(3.7 * x, 4, axis), y)
    shift = torch.randn(19, 1, dtype=torch.float64) if axis == 0 else torch.randn(1, 31, dtype=torch.float64)
    assert_matches_oracle("shifted", intl_ops.iternorm(x + 100 * shift, 4, axis), y)


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
    # y = 0: nmse(0, 0) = 2 (a clamped norm gives cos 0) and each trace loss is C (every variance 0)
    n_vars = 9 if axis == 0 else 12
    assert_matches_oracle("loss", loss, torch.tensor(2 + intl_ops.default_beta(n_vars) * 2 * n_vars))
    assert all(torch.equal(v.grad, torch.zeros_like(v)) for v in views)


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
    """Every backend unavailable for a device raises naming itself, the device and why; triton on meta
    tensors is always one (so the check runs wherever the suite runs)."""
    reasons = intl_ops.available_backends("cpu")
    assert reasons["reference"] == "available"
    unavailable = [(name, "cpu") for name, why in reasons.items() if why != "available"] + [("triton", "meta")]
    for name, device in unavailable:
        why = intl_ops.available_backends(device)[name]
        assert why != "available", (name, device)
        with pytest.raises(RuntimeError, match=re.escape(f"backend={name!r} cannot run on {device}: {why}")):
            intl_ops.iternorm(torch.randn(4, 4, device=device), backend=name)


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
    assert_matches_oracle("IterNorm", intl_ops.IterNorm(3, 1)(x), literal.iternorm(x, 3, 1))
    views = [_rand(10, 14) for _ in range(2)]
    assert_matches_oracle("INTLLoss", intl_ops.INTLLoss(3, 0, beta=0.2)(views), literal.intl_loss(views, 3, 0, 0.2))
    assert "iters=3" in repr(intl_ops.IterNorm(3, 1))


def test_return_parts_add_up():
    """The parts are the literal code's: align = mean_i nmse(y_i, y_0), trace = mean_i TL(y_i) + TL(y_0)."""
    views = [_rand(16, 20) for _ in range(3)]
    loss, parts = intl_ops.intl_loss(views, return_parts=True, beta=0.1)
    assert_matches_oracle("loss", loss, parts["align"] + parts["beta"] * parts["trace"])
    ys = [literal.iternorm(v, 4, 0) for v in views]
    tl = [literal.trace_loss(y, 0) for y in ys]
    assert_matches_oracle("align", parts["align"], sum(literal.nmse(y, ys[0]) for y in ys[1:]) / 2)
    assert_matches_oracle("trace", parts["trace"], sum(t + tl[0] for t in tl[1:]) / 2)
    assert not parts["align"].requires_grad
    assert math.isclose(parts["beta"], 0.1)


def test_autocast_does_not_lower_internal_precision():
    x = _rand(24, 40).float().requires_grad_()
    y_plain = intl_ops.iternorm(x, 4, 0, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_amp = intl_ops.iternorm(x, 4, 0, backend="reference")
        loss = intl_ops.intl_loss([x, x.flip(0)], 4, 0, backend="reference")
    assert y_amp.dtype == torch.float32 and loss.dtype == torch.float32
    assert torch.equal(y_amp, y_plain)
    loss.backward()
    oracle = literal.intl_loss([x.detach().double(), x.detach().double().flip(0)], 4, 0)
    assert_matches_oracle("loss", loss, oracle, ref=literal.intl_loss([x.detach(), x.detach().flip(0)], 4, 0))


# ---------------------------------------------------------------- the tolerance rule can fail
def test_oracle_rule():
    """_oracle.assert_matches_oracle: the bound, and each way a comparison can be broken."""
    oracle = torch.linspace(-2.0, 4.0, 60, dtype=torch.float64)
    out = oracle.float()
    assert rel_err(out, oracle) == (out.double() - oracle).abs().max().item() / 4.0
    assert assert_matches_oracle("exact", oracle.clone(), oracle) == 0.0
    assert_matches_oracle("fp32 rounding", out, oracle)
    off = oracle.clone()
    off[-1] += 4.0 * 0.9 * FLOOR[torch.float64]
    assert_matches_oracle("within the fp64 floor", off, oracle)
    off[-1] += 4.0 * 0.2 * FLOOR[torch.float64]
    with pytest.raises(AssertionError, match="^off: error"):
        assert_matches_oracle("off", off, oracle)
    # with a ref: at most factor x its error plus the floor
    ref = oracle + 4.0 * 1e-4 * torch.sign(oracle)  # rel error 1e-4
    within = oracle.clone()
    within[0] += 4.0 * (2 * 1e-4 + 0.5 * FLOOR[torch.float32])
    assert_matches_oracle("within", within.float(), oracle, ref=ref.float())
    beyond = oracle.clone()
    beyond[0] += 4.0 * (2 * 1e-4 + 2 * FLOOR[torch.float32])
    with pytest.raises(AssertionError, match="^beyond: error .* vs reference "):
        assert_matches_oracle("beyond", beyond.float(), oracle, ref=ref.float())
    assert_matches_oracle("factor 3", beyond.float(), oracle, ref=ref.float(), factor=3.0)
    # dtype: the input's floor, given explicitly for an fp32 result of fp16 input
    assert_matches_oracle("fp16 input", beyond.float(), oracle, dtype=torch.float16)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_matches_oracle("fp32 input", beyond.float(), oracle)
    assert_matches_oracle("floor_scale", beyond.float(), oracle, floor_scale=1e3)
    # broken comparisons
    bad_ref = oracle * (1 + 2 * REF_CEIL[torch.float32])
    with pytest.raises(AssertionError, match="reference's own error"):
        assert_matches_oracle("bad ref", out, oracle, ref=bad_ref.float())
    for bad in (float("nan"), float("inf")):
        broken = out.clone()
        broken[3] = bad
        with pytest.raises(AssertionError, match="^nonfinite: 1 of 60 values of the output"):
            assert_matches_oracle("nonfinite", broken, oracle)
        with pytest.raises(AssertionError, match="^nonfinite: 1 of 60 values of the oracle"):
            assert_matches_oracle("nonfinite", out, broken.double())
        with pytest.raises(AssertionError, match="^nonfinite: 1 of 60 values of the reference"):
            assert_matches_oracle("nonfinite", out, oracle, ref=broken)
    with pytest.raises(AssertionError, match="shape"):
        assert_matches_oracle("broadcast", out[:1], oracle)
    with pytest.raises(AssertionError, match="shape"):
        assert_matches_oracle("broadcast ref", out, oracle, ref=out[:1])
    zeros = torch.zeros(5, dtype=torch.float64)
    assert_matches_oracle("zeros", zeros.float(), zeros)
    with pytest.raises(AssertionError):
        assert_matches_oracle("zeros", perturbed(zeros.float()), zeros)
    for t in (out, out.half(), out.bfloat16(), oracle):
        with pytest.raises(AssertionError, match="^perturbed: error"):
            assert_matches_oracle("perturbed", perturbed(t), oracle)


@pytest.mark.parametrize("fn", ["iternorm_fwd", "iternorm_bwd"])
def test_literal_check_detects_wrong_output(fn, monkeypatch):
    """test_iternorm_matches_literal_fp64 fails when the reference backend's y (or dx) is off in one element."""
    test_iternorm_matches_literal_fp64((13, 21), 3, 1)
    original = getattr(reference, fn)

    def wrong(*args):
        out = original(*args)
        return out._replace(y=perturbed(out.y)) if fn == "iternorm_fwd" else perturbed(out)

    monkeypatch.setattr(reference, fn, wrong)
    with pytest.raises(AssertionError, match="^y: " if fn == "iternorm_fwd" else "^dx: "):
        test_iternorm_matches_literal_fp64((13, 21), 3, 1)


def test_saved_tensors_check_detects_wrong_output(monkeypatch):
    """test_saved_tensors_match_oracle fails when any one saved tensor is off in one element."""
    original = reference.iternorm_fwd
    for i, name in enumerate(reference.IterNormSaved._fields):
        monkeypatch.setattr(reference, "iternorm_fwd",
                            lambda *args, i=i: original(*args)._replace(**{name: perturbed(original(*args)[i])}))
        with pytest.raises(AssertionError, match=f"^{name}: "):
            test_saved_tensors_match_oracle(4, 0, torch.float32)
