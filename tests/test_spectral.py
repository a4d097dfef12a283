"""Spectral transforms (power family, ZCA, Cholesky), whiten(), spectrum diagnostics and plot_spectra.

Oracles: float64 eager math on Sigma itself (eigh with torch's own autograd, Cholesky + inverse), the
IterNorm spectrum formula of docs/math.md §6, and numerical gradients (gradcheck), which stay valid
where eigh's own autograd breaks down (repeated eigenvalues). Comparisons use tests/_oracle.py's rule;
fp32/fp16/bf16 results are held to 2x the error of the same math run eagerly in fp32 (_eager_fp32).
"""
import numpy as np
import pytest
import torch

import intl_ops
from intl_ops import literal, reference
from _oracle import assert_matches_oracle, perturbed

SIZES = [(7, 31), (13, 29), (9, 40)]  # (C variables, N observations), odd sizes, full rank
AXES = [0, 1]


def _obs(x, axis):
    """The (N observations x C variables) view of docs/math.md §2."""
    return x.t() if axis == 0 else x


def _cov(y, axis):
    """Covariance of `axis`'s variables of y (m, d), in float64."""
    a = _obs(y, axis).double()
    ac = a - a.mean(0)
    return ac.t() @ ac / (a.shape[0] - 1)


def _shape(sizes, axis):
    """(m, d) of an input with sizes = (C variables, N observations) along `axis`."""
    c, n = sizes
    return (c, n) if axis == 0 else (n, c)


def _input(shape, axis, dtype=torch.float64, spread=(0.5, 2.0)):
    """Fresh random input with a spread but well-conditioned spectrum and non-zero means."""
    m, d = shape
    n_vars = m if axis == 0 else d
    scales = torch.linspace(*spread, n_vars, dtype=torch.float64)
    a = torch.randn(*_obs(torch.empty(m, d), axis).shape, dtype=torch.float64) * scales + 3.0
    return _obs(a, axis).contiguous().to(dtype)


def st_oracle(x, power, axis, eps=0.0):
    """Sigma^(-p) (with eps tr I added) applied to the centred data, autograd through torch's eigh."""
    a = _obs(x, axis).double()
    ac = a - a.mean(0)
    sigma = ac.t() @ ac / (a.shape[0] - 1)
    lam, u = torch.linalg.eigh(sigma)
    w = u @ torch.diag((lam + eps * sigma.trace()) ** -power) @ u.t()
    return _obs(ac @ w, axis)


def cholesky_oracle(x, axis):
    a = _obs(x, axis).double()
    ac = a - a.mean(0)
    chol = torch.linalg.cholesky(ac.t() @ ac / (a.shape[0] - 1))
    return _obs(ac @ torch.linalg.inv(chol).t(), axis)


# ---------------------------------------------------------------- forward values
@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"C{s[0]}xN{s[1]}")
@pytest.mark.parametrize("method", ["zca", "cholesky"])
def test_whitening_output_covariance_is_identity(method, sizes, axis):
    x = _input(_shape(sizes, axis), axis)
    y = intl_ops.whiten(x, method, axis)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_matches_oracle("cov", _cov(y, axis), torch.eye(_cov(y, axis).shape[0], dtype=torch.float64))
    oracle = st_oracle(x, 0.5, axis) if method == "zca" else cholesky_oracle(x, axis)
    assert_matches_oracle("y", y, oracle)


@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
@pytest.mark.parametrize("power", [0.0, 0.25, 0.5, 0.75, 1.0, -0.5])
def test_power_output_spectrum(power, axis):
    """Output covariance eigenvalues are exactly Lam^(1-2p) (Lam those of Sigma), same eigenvectors."""
    shape = (9, 37) if axis == 0 else (41, 10)
    x = _input(shape, axis)
    y = intl_ops.spectral_transform(x, power, axis)
    lam, u = torch.linalg.eigh(_cov(x, axis))
    out = _cov(y, axis)
    assert_matches_oracle("U^T cov U", u.t() @ out @ u, torch.diag(lam ** (1 - 2 * power)))
    assert_matches_oracle("y", y, st_oracle(x, power, axis))
    # normalised, via the diagnostic: spectrum(y) is proportional to lam^(1-2p)
    want = (lam ** (1 - 2 * power)).sort(descending=True).values
    assert_matches_oracle("spectrum", intl_ops.spectrum(y, axis), want / want.sum())


@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
def test_power_zero_is_centring_and_scaling_laws(axis):
    x = _input(_shape((11, 23), axis), axis)
    a = _obs(x, axis)
    assert_matches_oracle("p=0", intl_ops.spectral_transform(x, 0.0, axis), _obs(a - a.mean(0), axis))
    for power in (0.25, 0.5, 0.8):  # W = Sigma^-p: y(c x) = c^(1-2p) y(x)
        assert_matches_oracle(f"p={power} scaled", intl_ops.spectral_transform(2.5 * x, power, axis),
                              2.5 ** (1 - 2 * power) * intl_ops.spectral_transform(x, power, axis))
    # eps is relative to the trace: eps-regularised ZCA and Cholesky are scale-invariant
    for method in ("zca", "cholesky"):
        assert_matches_oracle(f"{method} scaled", intl_ops.whiten(7.0 * x, method, axis, eps=1e-2),
                              intl_ops.whiten(x, method, axis, eps=1e-2))
    assert_matches_oracle("eps", intl_ops.spectral_transform(x, 0.3, axis, eps=0.05), st_oracle(x, 0.3, axis, eps=0.05))


@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["zca", "cholesky"])
def test_low_precision_against_fp64(method, dtype, axis):
    """Error against fp64 at most ~2x that of the same math run eagerly in fp32, plus the output rounding."""
    shape = (12, 61) if axis == 0 else (67, 15)
    x = _input(shape, axis, dtype)
    y = intl_ops.whiten(x, method, axis)
    assert y.dtype == dtype and y.shape == x.shape
    oracle = st_oracle(x, 0.5, axis) if method == "zca" else cholesky_oracle(x, axis)
    assert_matches_oracle("y", y, oracle, ref=_eager_fp32(method, x, axis).to(dtype))


def _eager_fp32(method, x, axis, power=0.5):
    """The transform as plain fp32 torch code on Sigma: "zca" (Sigma^-power by eigh) or "cholesky"."""
    a = _obs(x, axis).float()
    ac = a - a.mean(0)
    sigma = ac.t() @ ac / (a.shape[0] - 1)
    if method == "zca":
        lam, u = torch.linalg.eigh(sigma)
        return _obs(ac @ (u @ torch.diag(lam ** -power) @ u.t()), axis)
    return _obs(ac @ torch.linalg.inv(torch.linalg.cholesky(sigma)).t(), axis)


def test_fp32_power_against_fp64():
    x = _input((15, 53), 0, torch.float32)
    for power in (0.25, 0.75):
        y = intl_ops.spectral_transform(x, power, 0)
        assert_matches_oracle(f"p={power}", y, st_oracle(x, power, 0), ref=_eager_fp32("zca", x, 0, power))


def test_autocast_does_not_downcast():
    x = _input((9, 33), 0, torch.float32)
    want = intl_ops.spectral_transform(x, 0.5, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = intl_ops.spectral_transform(x, 0.5, 0)
        got_chol = intl_ops.whiten(x, "cholesky", 0)
    assert got.dtype == torch.float32 and got_chol.dtype == torch.float32
    assert torch.equal(got, want)
    assert_matches_oracle("cholesky", got_chol, cholesky_oracle(x, 0), ref=_eager_fp32("cholesky", x, 0))


# ---------------------------------------------------------------- IterNorm relations (docs/math.md §6)
@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
def test_iternorm_T8_close_to_zca(axis):
    """Well-conditioned input (eigenvalues of S within ~1.5x of 1/C): 8 Newton steps reach ZCA."""
    x = _input(_shape((8, 400), axis), axis, spread=(0.8, 1.25))
    zca = intl_ops.whiten(x, "zca", axis)
    y8 = intl_ops.whiten(x, "iternorm", axis, iters=8)
    torch.testing.assert_close(y8, zca, rtol=0, atol=1e-6)  # how close 8 steps get: the math's, not rounding
    y2 = intl_ops.whiten(x, "iternorm", axis, iters=2)
    assert (y2 - zca).abs().max() > 1e-2  # few steps are visibly not white
    assert_matches_oracle("T8", y8, literal.iternorm(x, 8, axis))


@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
@pytest.mark.parametrize("iters", [1, 4, 6])
def test_iternorm_spectrum_formula(iters, axis):
    """spectrum(iternorm(x, T)) = sorted lam p_T(lam)^2 = h^T(lam), normalised (lam: spectrum(x))."""
    shape = (17, 45) if axis == 0 else (50, 19)
    x = torch.randn(*shape, dtype=torch.float64) @ torch.randn(shape[1], shape[1], dtype=torch.float64) \
        if axis == 1 else torch.randn(shape[0], shape[0], dtype=torch.float64) @ torch.randn(*shape, dtype=torch.float64)
    lam = intl_ops.spectrum(x, axis)
    assert_matches_oracle("spectrum(x)", lam, torch.linalg.eigvalsh(_cov(x, axis) / _cov(x, axis).trace()).flip(0))
    assert_matches_oracle("sum", lam.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (lam[:-1] >= lam[1:]).all()
    p = torch.ones_like(lam)
    h = lam.clone()
    for _ in range(iters):
        p = 1.5 * p - 0.5 * lam * p ** 3
        h = h * (1.5 - 0.5 * h) ** 2
    assert_matches_oracle("h^T", lam * p ** 2, h)
    y = intl_ops.whiten(x, "iternorm", axis, iters=iters)
    assert_matches_oracle("spectrum(y)", intl_ops.spectrum(y, axis), h / h.sum())
    # unnormalised: the output covariance P S P has trace sum_i h^T(lam_i)
    assert_matches_oracle("trace", _cov(y, axis).trace(), h.sum())


# ---------------------------------------------------------------- diagnostics
@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
def test_effective_rank(axis):
    n, c, k = 3000, 21, 5
    iso = torch.randn(n, c, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(c, k, dtype=torch.float64))
    low = torch.randn(n, k, dtype=torch.float64) @ q.t()  # rank k, nearly equal variances
    iso, low = (iso.t(), low.t()) if axis == 0 else (iso, low)
    er_iso = intl_ops.effective_rank(iso, axis)
    er_low = intl_ops.effective_rank(low, axis)
    assert er_iso.dim() == 0 and er_iso.dtype == torch.float64
    assert c - 0.5 < er_iso <= c, er_iso
    assert k - 0.2 < er_low <= k + 1e-9, er_low
    one_dir = torch.randn(n, 1, dtype=torch.float64) @ torch.randn(1, c, dtype=torch.float64)
    assert abs(intl_ops.effective_rank(one_dir.t() if axis == 0 else one_dir, axis) - 1) < 1e-6
    # the definition, exp(entropy) of the normalised eigenvalues of the covariance
    lam = torch.linalg.eigvalsh(_cov(iso, axis)).clamp_min(0)
    p = lam / lam.sum()
    assert_matches_oracle("effective rank", er_iso, torch.exp(-(p * p.log()).sum()))
    # fp32 input -> fp32 result, same value
    er32 = intl_ops.effective_rank(iso.float(), axis)
    assert er32.dtype == torch.float32
    assert_matches_oracle("fp32", er32, er_iso)


def test_spectrum_dtype_layout_and_detached():
    x = torch.randn(10, 27, requires_grad=True)
    s0, s1 = intl_ops.spectrum(x, 0), intl_ops.spectrum(x, 1)
    assert s0.shape == (10,) and s1.shape == (27,) and s0.dtype == torch.float32
    assert not s0.requires_grad
    assert (s1 >= 0).all()  # rank 9 < 27: tiny negative round-off is clamped
    assert_matches_oracle("rank 9", s1[:9].sum(), torch.tensor(1.0, dtype=torch.float64))
    for name, xin in (("fp32", x.detach()), ("fp16", x.detach().half())):  # computed in fp32 either way
        sigma = _cov(xin.double(), 0)
        got = intl_ops.spectrum(xin, 0)
        assert got.dtype == torch.float32
        assert_matches_oracle(name, got, torch.linalg.eigvalsh(sigma / sigma.trace()).flip(0), dtype=torch.float32)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
@pytest.mark.parametrize("power,eps", [(0.5, 0.0), (0.25, 0.0), (0.9, 0.0), (-0.5, 0.0), (0.0, 0.0), (0.5, 0.1)])
def test_gradcheck_spectral_transform(power, eps, axis):
    shape = (6, 11) if axis == 0 else (12, 5)
    x = _input(shape, axis).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: intl_ops.spectral_transform(t, power, axis, eps=eps), (x,))
    # and equal to autograd through torch's eigh (distinct eigenvalues here)
    g = torch.randn(shape, dtype=torch.float64)
    got, = torch.autograd.grad(intl_ops.spectral_transform(x, power, axis, eps=eps), x, g)
    want, = torch.autograd.grad(st_oracle(x, power, axis, eps), x, g)
    assert_matches_oracle("dx", got, want)


@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
@pytest.mark.parametrize("method", ["zca", "cholesky"])
def test_gradcheck_whiten(method, axis):
    shape = (5, 13) if axis == 0 else (14, 6)
    x = _input(shape, axis).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: intl_ops.whiten(t, method, axis), (x,))
    assert torch.autograd.gradcheck(lambda t: intl_ops.whiten(t, method, axis, eps=0.05), (x,))


def _with_spectrum(n_obs, sv, axis):
    """An input whose centred (n_obs x C) view has singular values sv exactly (repeats allowed), rotated."""
    c = len(sv)
    basis, _ = torch.linalg.qr(torch.cat([torch.ones(n_obs, 1, dtype=torch.float64),
                                          torch.randn(n_obs, c, dtype=torch.float64)], 1))
    left = basis[:, 1:]  # orthonormal and orthogonal to ones: columns already centred
    right, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
    a = left @ torch.diag(torch.tensor(sv, dtype=torch.float64)) @ right.t() + torch.randn(c, dtype=torch.float64)
    return _obs(a, axis).contiguous()


@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
@pytest.mark.parametrize("sv", [[2.0, 2.0, 2.0, 1.0, 1.0, 3.0], [1.5] * 5], ids=["repeated", "isotropic"])
def test_gradients_with_repeated_eigenvalues(sv, axis):
    """The transform is smooth there, so numerical gradients are the oracle (eigh's own autograd is wrong here)."""
    x = _with_spectrum(17, sv, axis).requires_grad_()
    lam = torch.linalg.eigvalsh(_cov(x.detach(), axis))
    assert (lam[1:] - lam[:-1]).abs().min() < 1e-12  # truly repeated
    for power in (0.5, 0.3):
        assert torch.autograd.gradcheck(lambda t: intl_ops.spectral_transform(t, power, axis), (x,))
    g = torch.randn(x.shape, dtype=torch.float64)
    got, = torch.autograd.grad(intl_ops.whiten(x, "zca", axis), x, g)
    assert torch.isfinite(got).all()
    # fp32 too: without the divided-difference guard this is off by ~0.2
    xf = x.detach().float().requires_grad_()
    gf, = torch.autograd.grad(intl_ops.spectral_transform(xf, 0.5, axis), xf, g.float())
    # against the fp64 gradient, which gradcheck verified above (for power 0.5 at this x)
    assert_matches_oracle("fp32 dx", gf, got, dtype=torch.float32)


@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
def test_rank_deficient(axis):
    """C variables but rank r < C: eps > 0 gives a smooth transform; eps = 0 a pseudo-inverse one, finite."""
    r, c = 3, 7
    x = _with_spectrum(12, [3.0, 2.0, 1.0] + [0.0] * (c - r), axis).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: intl_ops.spectral_transform(t, 0.5, axis, eps=1e-2), (x,))
    assert_matches_oracle("eps", intl_ops.spectral_transform(x, 0.5, axis, eps=1e-2), st_oracle(x, 0.5, axis, eps=1e-2))
    y = intl_ops.spectral_transform(x, 0.5, axis)  # eps = 0: output covariance is the projector on the range
    assert_matches_oracle("projector", intl_ops.spectrum(y, axis) * r,
                          torch.tensor([1.0] * r + [0.0] * (c - r), dtype=torch.float64))
    # eps = 0 is not differentiable across rank changes (no numerical oracle): finite is the claim
    g, = torch.autograd.grad((y * torch.randn_like(y)).sum(), x)
    assert torch.isfinite(g).all()
    assert torch.autograd.gradcheck(lambda t: intl_ops.whiten(t, "cholesky", axis, eps=1e-2) ** 3, (x,))
    with pytest.raises(ValueError, match="eps > 0"):
        intl_ops.whiten(x, "cholesky", axis)


@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
def test_constant_input(axis):
    x = torch.full((6, 9), 2.5, dtype=torch.float64, requires_grad=True)
    for fn in (lambda t: intl_ops.whiten(t, "zca", axis), lambda t: intl_ops.whiten(t, "cholesky", axis),
               lambda t: intl_ops.spectral_transform(t, 0.8, axis, eps=0.1),
               lambda t: intl_ops.spectral_transform(t, 0.0, axis)):
        y = fn(x)
        assert torch.equal(y, torch.zeros_like(y))
        g, = torch.autograd.grad(y.sum(), x)
        assert torch.isfinite(g).all()
    assert torch.equal(intl_ops.spectrum(x, axis), torch.zeros(6 if axis == 0 else 9, dtype=torch.float64))
    assert intl_ops.effective_rank(x, axis) == 0


def test_batched_op_matches_per_view():
    """The custom op takes leading batch dims (one call for a stack of views)."""
    x = torch.randn(3, 7, 19, dtype=torch.float64)
    y = torch.ops.intl.spectral_transform_fwd(x, 0.5, 0, 0.0, "reference")[0]
    for i in range(3):
        assert_matches_oracle(f"view {i}", y[i], st_oracle(x[i], 0.5, 0))


@pytest.mark.parametrize("method", ["zca", "cholesky"])
def test_every_backend_name_whitens(method):
    """backend= names any backend available here; zca goes through the spectral op's dispatch (today
    only the reference implements it), cholesky is torch ops: the same result within the rule."""
    x = _input((9, 33), 0, torch.float32)
    oracle = st_oracle(x, 0.5, 0) if method == "zca" else cholesky_oracle(x, 0)
    want = intl_ops.whiten(x, method, 0, backend="reference")
    names = [n for n, why in intl_ops.available_backends("cpu").items() if why == "available"] + ["auto"]
    assert "reference" in names
    for name in names:
        assert_matches_oracle(f"{method} backend={name}", intl_ops.whiten(x, method, 0, backend=name), oracle, ref=want)


@pytest.mark.parametrize("check", ["test_whitening_output_covariance_is_identity", "test_low_precision_against_fp64"])
def test_spectral_checks_detect_wrong_output(check, monkeypatch):
    """Both checks fail when the spectral op's y is off in one element (test_low_precision_against_fp64
    even at 3e-2 of its range in bf16)."""
    run = {"test_whitening_output_covariance_is_identity": lambda: test_whitening_output_covariance_is_identity(
               "zca", SIZES[0], 1),
           "test_low_precision_against_fp64": lambda: test_low_precision_against_fp64("zca", torch.bfloat16, 0)}[check]
    run()
    original = reference.spectral_transform_fwd
    monkeypatch.setattr(reference, "spectral_transform_fwd", lambda *args: original(*args)._replace(
        y=perturbed(original(*args).y)))
    with pytest.raises(AssertionError, match="^(cov|y): "):
        run()


# ---------------------------------------------------------------- torch.library / torch.compile
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
@pytest.mark.parametrize("shape", [(7, 15), (2, 9, 13)], ids=["2d", "batched"])
def test_opcheck(shape, axis, dtype):
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.intl.spectral_transform_fwd.default, (x, 0.5, axis, 0.01, "reference"))
    y, mean, tr, evals, evecs = torch.ops.intl.spectral_transform_fwd(x.detach(), 0.3, axis, 0.0, "reference")
    torch.library.opcheck(torch.ops.intl.spectral_transform_bwd.default,
                          (torch.randn_like(y), x.detach(), mean, tr, evals, evecs, 0.3, axis, 0.0, "reference"))


@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
def test_compile_fullgraph_forward_backward(axis):
    torch._dynamo.reset()

    def step(a):
        zca = intl_ops.whiten(a, "zca", axis)
        return (zca * zca.roll(1, 0)).sum() + intl_ops.spectral_transform(a, 0.25, axis, eps=1e-3).square().sum() \
            + intl_ops.whiten(a, "cholesky", axis).sum(0).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    shape = (7, 23) if axis == 0 else (25, 8)
    a = _input(shape, axis).requires_grad_()
    got = compiled(a)
    g, = torch.autograd.grad(got, a)

    def step_oracle(a):  # step() with the float64 oracles
        zca = st_oracle(a, 0.5, axis)
        return (zca * zca.roll(1, 0)).sum() + st_oracle(a, 0.25, axis, eps=1e-3).square().sum() \
            + cholesky_oracle(a, axis).sum(0).square().sum()

    want = step_oracle(a)
    gw, = torch.autograd.grad(want, a)
    assert_matches_oracle("loss", got, want)
    assert_matches_oracle("da", g, gw)


def test_compile_inductor_cpu():
    """Within 2x the eager call's error. (A loss of ZCA's y.square().mean() is a constant, (N-1)/N: its
    zero gradient would compare rounding noise with noise, so the loss weights y.)"""
    torch._dynamo.reset()
    w = torch.randn(9, 30)
    fn = torch.compile(lambda t: (intl_ops.spectral_transform(t, 0.5, 0) * w).sum(), fullgraph=True)
    x = torch.randn(9, 30, requires_grad=True)
    out = fn(x)
    out.backward()
    xe = x.detach().requires_grad_()
    eager = (intl_ops.spectral_transform(xe, 0.5, 0) * w).sum()
    eager.backward()
    xr = x.detach().double().requires_grad_()
    oracle = (st_oracle(xr, 0.5, 0) * w.double()).sum()
    oracle.backward()
    assert_matches_oracle("loss", out, oracle, ref=eager)
    assert_matches_oracle("dx", x.grad, xr.grad, ref=xe.grad)


# ---------------------------------------------------------------- errors
def test_errors_name_the_argument():
    x = torch.randn(6, 9)
    cases = [
        (lambda: intl_ops.spectral_transform(x, power="0.5"), TypeError, "power"),
        (lambda: intl_ops.spectral_transform(x, power=True), TypeError, "power"),
        (lambda: intl_ops.spectral_transform(x, power=float("nan")), TypeError, "power"),
        (lambda: intl_ops.spectral_transform(x, eps=-1e-3), ValueError, "eps"),
        (lambda: intl_ops.spectral_transform(x, eps=None), TypeError, "eps"),
        (lambda: intl_ops.spectral_transform(x, axis=2), ValueError, "axis"),
        (lambda: intl_ops.spectral_transform(x[0]), ValueError, "x must be 2-D"),
        (lambda: intl_ops.spectral_transform(x.numpy()), TypeError, "x must be a torch.Tensor"),
        (lambda: intl_ops.spectral_transform(torch.ones(6, 9, dtype=torch.int64)), TypeError, "floating"),
        (lambda: intl_ops.spectral_transform(x[:, :1], axis=0), ValueError, "at least 2"),
        (lambda: intl_ops.whiten(x, "pca"), ValueError, "method"),
        (lambda: intl_ops.whiten(x, None), ValueError, "method"),
        (lambda: intl_ops.whiten(x, "iternorm", eps=0.1), ValueError, "eps"),
        (lambda: intl_ops.whiten(x, "zca", backend="fast"), ValueError, "backend"),
        (lambda: intl_ops.whiten(x, "cholesky", backend="fast"), ValueError, "backend"),
        (lambda: intl_ops.spectral_transform(x, backend="fast"), ValueError, "backend"),
        (lambda: intl_ops.whiten(x, "zca", iters=-1), ValueError, "iters"),
        (lambda: intl_ops.whiten(x, "cholesky", 1), ValueError, "eps > 0"),  # 6 samples, 9 features
        (lambda: intl_ops.spectrum(x, axis=-1), ValueError, "axis"),
        (lambda: intl_ops.effective_rank(x.unsqueeze(0)), ValueError, "x must be 2-D"),
        (lambda: intl_ops.plot_spectra({}, "a.png"), ValueError, "spectra"),
        (lambda: intl_ops.plot_spectra([torch.ones(3)], "a.png"), ValueError, "spectra"),
        (lambda: intl_ops.plot_spectra({1: torch.ones(2, 2)}, "a.png"), ValueError, r"spectra\[1\]"),
        (lambda: intl_ops.plot_spectra({1: torch.ones(3)}, 5), TypeError, "path"),
    ]
    for fn, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            fn()


def test_check_finite_opt_in():
    x = torch.randn(5, 11)
    x[2, 3] = float("nan")
    intl_ops.set_check_finite(True)
    try:
        for fn in (intl_ops.spectral_transform, lambda t: intl_ops.whiten(t, "cholesky"), intl_ops.spectrum):
            with pytest.raises(ValueError, match="non-finite"):
                fn(x)
    finally:
        intl_ops.set_check_finite(None)


# ---------------------------------------------------------------- plotting
def test_plot_spectra_writes_png(tmp_path):
    spectra = {epoch: intl_ops.spectrum(torch.randn(64, 16) @ torch.diag(torch.linspace(0.1, 1, 16) ** epoch), 1)
               for epoch in range(4)}
    spectra["with zeros"] = np.array([0.5, 0.3, 0.2, 0.0, -1e-9])  # non-positive values are left out
    path = tmp_path / "sub" / "spectra.png"
    assert intl_ops.plot_spectra(spectra, path, title="spectrum per epoch") == path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert intl_ops.plot_spectra({"a": [0.6, 0.4]}, str(tmp_path / "b.png")) == str(tmp_path / "b.png")


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
def test_spectrum_from_the_smaller_gram_equals_the_full_covariance(axis):
    """Fewer observations than variables: spectrum() decomposes the small Gram; same eigenvalues, zeros padded."""
    x = torch.randn(23, 61, dtype=torch.float64) @ torch.randn(61, 61, dtype=torch.float64)
    x = x if axis == 1 else x.T.contiguous()  # 23 observations of 61 variables either way
    a = x if axis == 1 else x.T
    ac = a - a.mean(0)
    sigma = ac.T @ ac
    full = torch.linalg.eigvalsh(sigma / sigma.trace()).flip(0).clamp_min(0)
    lam = intl_ops.spectrum(x, axis)
    assert lam.shape == (61,)
    assert_matches_oracle("spectrum", lam, full)
    assert float(intl_ops.effective_rank(x, axis)) <= 22 + 1e-6  # rank of 23 centred observations
