"""Spectral transforms (power family, ZCA, Cholesky), whiten(), spectrum diagnostics and plot_spectra.

Oracles: float64 eager math on Sigma itself (eigh with torch's own autograd, Cholesky + inverse), the
IterNorm spectrum formula of SPEC section 6, and numerical gradients (gradcheck), which stay valid
where eigh's own autograd breaks down (repeated eigenvalues).
"""
import math

import numpy as np
import pytest
import torch

import intl_ops
from intl_ops import literal

SIZES = [(7, 31), (13, 29), (9, 40)]  # (C variables, N observations), odd sizes, full rank
AXES = [0, 1]


def _obs(x, axis):
    """The (N observations x C variables) view of SPEC section 2."""
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
    torch.testing.assert_close(_cov(y, axis), torch.eye(_cov(y, axis).shape[0], dtype=torch.float64),
                               rtol=0, atol=1e-10)
    oracle = st_oracle(x, 0.5, axis) if method == "zca" else cholesky_oracle(x, axis)
    torch.testing.assert_close(y, oracle, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
@pytest.mark.parametrize("power", [0.0, 0.25, 0.5, 0.75, 1.0, -0.5])
def test_power_output_spectrum(power, axis):
    """Output covariance eigenvalues are exactly Lam^(1-2p) (Lam those of Sigma), same eigenvectors."""
    shape = (9, 37) if axis == 0 else (41, 10)
    x = _input(shape, axis)
    y = intl_ops.spectral_transform(x, power, axis)
    lam, u = torch.linalg.eigh(_cov(x, axis))
    out = _cov(y, axis)
    torch.testing.assert_close(u.t() @ out @ u, torch.diag(lam ** (1 - 2 * power)), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(y, st_oracle(x, power, axis), rtol=1e-9, atol=1e-10)
    # normalised, via the diagnostic: spectrum(y) is proportional to lam^(1-2p)
    want = (lam ** (1 - 2 * power)).sort(descending=True).values
    torch.testing.assert_close(intl_ops.spectrum(y, axis), want / want.sum(), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
def test_power_zero_is_centring_and_scaling_laws(axis):
    x = _input(_shape((11, 23), axis), axis)
    a = _obs(x, axis)
    torch.testing.assert_close(intl_ops.spectral_transform(x, 0.0, axis), _obs(a - a.mean(0), axis))
    for power in (0.25, 0.5, 0.8):  # W = Sigma^-p: y(c x) = c^(1-2p) y(x)
        torch.testing.assert_close(intl_ops.spectral_transform(2.5 * x, power, axis),
                                   2.5 ** (1 - 2 * power) * intl_ops.spectral_transform(x, power, axis))
    # eps is relative to the trace: eps-regularised ZCA and Cholesky are scale-invariant
    torch.testing.assert_close(intl_ops.whiten(7.0 * x, "zca", axis, eps=1e-2), intl_ops.whiten(x, "zca", axis, eps=1e-2))
    torch.testing.assert_close(intl_ops.whiten(7.0 * x, "cholesky", axis, eps=1e-2),
                               intl_ops.whiten(x, "cholesky", axis, eps=1e-2))
    torch.testing.assert_close(intl_ops.spectral_transform(x, 0.3, axis, eps=0.05), st_oracle(x, 0.3, axis, eps=0.05))


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
    err = (y.double() - oracle).abs().max()
    err_eager = (_eager_fp32(method, x, axis).to(dtype).double() - oracle).abs().max()
    assert err <= 2 * err_eager + 1e-5, (err, err_eager)


def _eager_fp32(method, x, axis):
    a = _obs(x, axis).float()
    ac = a - a.mean(0)
    sigma = ac.t() @ ac / (a.shape[0] - 1)
    if method == "zca":
        lam, u = torch.linalg.eigh(sigma)
        return _obs(ac @ (u @ torch.diag(lam.rsqrt()) @ u.t()), axis)
    return _obs(ac @ torch.linalg.inv(torch.linalg.cholesky(sigma)).t(), axis)


def test_fp32_power_against_fp64():
    x = _input((15, 53), 0, torch.float32)
    for power in (0.25, 0.75):
        y = intl_ops.spectral_transform(x, power, 0)
        torch.testing.assert_close(y.double(), st_oracle(x, power, 0), rtol=1e-4, atol=1e-4)


def test_autocast_does_not_downcast():
    x = _input((9, 33), 0, torch.float32)
    want = intl_ops.spectral_transform(x, 0.5, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = intl_ops.spectral_transform(x, 0.5, 0)
        got_chol = intl_ops.whiten(x, "cholesky", 0)
    assert got.dtype == torch.float32 and got_chol.dtype == torch.float32
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_chol.double(), cholesky_oracle(x, 0), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- IterNorm relations (SPEC section 6)
@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
def test_iternorm_T8_close_to_zca(axis):
    """Well-conditioned input (eigenvalues of S within ~1.5x of 1/C): 8 Newton steps reach ZCA."""
    x = _input(_shape((8, 400), axis), axis, spread=(0.8, 1.25))
    zca = intl_ops.whiten(x, "zca", axis)
    y8 = intl_ops.whiten(x, "iternorm", axis, iters=8)
    torch.testing.assert_close(y8, zca, rtol=0, atol=1e-6)
    y2 = intl_ops.whiten(x, "iternorm", axis, iters=2)
    assert (y2 - zca).abs().max() > 1e-2  # few steps are visibly not white
    torch.testing.assert_close(y8, literal.iternorm(x, 8, axis))


@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
@pytest.mark.parametrize("iters", [1, 4, 6])
def test_iternorm_spectrum_formula(iters, axis):
    """spectrum(iternorm(x, T)) = sorted lam p_T(lam)^2 = h^T(lam), normalised (lam: spectrum(x))."""
    shape = (17, 45) if axis == 0 else (50, 19)
    x = torch.randn(*shape, dtype=torch.float64) @ torch.randn(shape[1], shape[1], dtype=torch.float64) \
        if axis == 1 else torch.randn(shape[0], shape[0], dtype=torch.float64) @ torch.randn(*shape, dtype=torch.float64)
    lam = intl_ops.spectrum(x, axis)
    torch.testing.assert_close(lam.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (lam[:-1] >= lam[1:]).all()
    p = torch.ones_like(lam)
    h = lam.clone()
    for _ in range(iters):
        p = 1.5 * p - 0.5 * lam * p ** 3
        h = h * (1.5 - 0.5 * h) ** 2
    torch.testing.assert_close(lam * p ** 2, h)
    y = intl_ops.whiten(x, "iternorm", axis, iters=iters)
    torch.testing.assert_close(intl_ops.spectrum(y, axis), h / h.sum(), rtol=1e-8, atol=1e-12)
    # unnormalised: the output covariance P S P has trace sum_i h^T(lam_i)
    torch.testing.assert_close(_cov(y, axis).trace(), h.sum())


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
    # fp32 input -> fp32 result, same value
    assert intl_ops.effective_rank(iso.float(), axis).dtype == torch.float32
    torch.testing.assert_close(intl_ops.effective_rank(iso.float(), axis).double(), er_iso, rtol=1e-4, atol=0)


def test_spectrum_dtype_layout_and_detached():
    x = torch.randn(10, 27, requires_grad=True)
    s0, s1 = intl_ops.spectrum(x, 0), intl_ops.spectrum(x, 1)
    assert s0.shape == (10,) and s1.shape == (27,) and s0.dtype == torch.float32
    assert not s0.requires_grad
    assert (s1 >= 0).all()  # rank 9 < 27: tiny negative round-off is clamped
    torch.testing.assert_close(s1[:9].sum(), torch.tensor(1.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(intl_ops.spectrum(x.half(), 0), s0, rtol=2e-2, atol=2e-3)


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
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


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
    assert torch.isfinite(gf).all()
    torch.testing.assert_close(gf.double(), got, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
def test_rank_deficient(axis):
    """C variables but rank r < C: eps > 0 gives a smooth transform; eps = 0 a pseudo-inverse one, finite."""
    r, c = 3, 7
    x = _with_spectrum(12, [3.0, 2.0, 1.0] + [0.0] * (c - r), axis).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: intl_ops.spectral_transform(t, 0.5, axis, eps=1e-2), (x,))
    torch.testing.assert_close(intl_ops.spectral_transform(x, 0.5, axis, eps=1e-2),
                               st_oracle(x, 0.5, axis, eps=1e-2))
    y = intl_ops.spectral_transform(x, 0.5, axis)  # eps = 0: output covariance is the projector on the range
    torch.testing.assert_close(intl_ops.spectrum(y, axis) * r,
                               torch.tensor([1.0] * r + [0.0] * (c - r), dtype=torch.float64), rtol=0, atol=1e-8)
    g, = torch.autograd.grad((y * torch.randn_like(y)).sum(), x)
    assert torch.isfinite(g).all()
    g, = torch.autograd.grad((intl_ops.whiten(x, "cholesky", axis, eps=1e-2) ** 3).sum(), x)
    assert torch.isfinite(g).all()
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
    y = torch.ops.intl.spectral_transform_fwd(x, 0.5, 0, 0.0)[0]
    for i in range(3):
        torch.testing.assert_close(y[i], intl_ops.spectral_transform(x[i], 0.5, 0))


# ---------------------------------------------------------------- torch.library / torch.compile
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("axis", AXES, ids=["axis0", "axis1"])
@pytest.mark.parametrize("shape", [(7, 15), (2, 9, 13)], ids=["2d", "batched"])
def test_opcheck(shape, axis, dtype):
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.intl.spectral_transform_fwd.default, (x, 0.5, axis, 0.01))
    y, mean, tr, evals, evecs = torch.ops.intl.spectral_transform_fwd(x.detach(), 0.3, axis, 0.0)
    torch.library.opcheck(torch.ops.intl.spectral_transform_bwd.default,
                          (torch.randn_like(y), x.detach(), mean, tr, evals, evecs, 0.3, axis, 0.0))


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
    want = step(a)
    gw, = torch.autograd.grad(want, a)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, gw)


def test_compile_inductor_cpu():
    torch._dynamo.reset()
    fn = torch.compile(lambda t: intl_ops.spectral_transform(t, 0.5, 0).square().mean(), fullgraph=True)
    x = torch.randn(9, 30, requires_grad=True)
    out = fn(x)
    out.backward()
    xr = x.detach().double().requires_grad_()
    ref = st_oracle(xr, 0.5, 0).square().mean()
    ref.backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-3, atol=1e-4)


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
        (lambda: intl_ops.whiten(x, "zca", backend="triton"), ValueError, "backend"),
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
    torch.testing.assert_close(lam, full, rtol=1e-8, atol=1e-12)
    assert float(intl_ops.effective_rank(x, axis)) <= 22 + 1e-6  # rank of 23 centred observations
