"""The Triton backend (kernels/ + intl_ops/backend_triton.py) against the float64 oracle.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes stay small. Tolerances come from the reference's own error: the
Triton result's error against float64 (intl_ops.literal, or intl_ops.reference in float64) may be
at most 2x the error of the reference backend at the same input dtype, plus a small floor.
The `gpu` tier repeats this at real shapes and checks opcheck, torch.compile and CUDA graphs on CUDA.
"""
import math

import pytest
import torch

import intl_ops
from intl_ops import literal, reference
from intl_ops import backend_triton as bt
from kernels import _common, covariance, newton_schulz

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
# error floor per input dtype, relative to the oracle's max |value|
FLOOR = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}

pytestmark = pytest.mark.skipif(bt.unavailable_reason(torch.device(DEV)) is not None,
                                reason=str(bt.unavailable_reason(torch.device(DEV))))


def _err(out, oracle) -> float:
    oracle = oracle.double()
    return ((out.double() - oracle).abs().max() / oracle.abs().max().clamp_min(1e-30)).item()


def _check(name, out, ref_out, oracle, dtype, factor=2.0):
    """out's error vs the oracle is at most `factor` x ref_out's error plus the dtype's floor."""
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    e, e_ref = _err(out, oracle), _err(ref_out, oracle)
    assert e <= factor * e_ref + FLOOR[dtype], f"{name}: error {e:.3g} vs reference backend {e_ref:.3g}"


def _literal_views(x, iters, axis):
    """The oracle: literal IterNorm in float64 on each (m, d) view of x (m, d) or (K, m, d)."""
    if x.dim() == 2:
        return literal.iternorm(x, iters, axis)
    return torch.stack([literal.iternorm(v, iters, axis) for v in x])


def _iternorm_case(x, iters, axis):
    """(y, dx) for backend triton and reference at x's dtype, and the float64 oracle's, with one
    random upstream gradient."""
    gy = torch.randn(x.shape, device=x.device, dtype=torch.float64)
    outs = {}
    for backend in ("triton", "reference"):
        xb = x.detach().clone().requires_grad_(True)
        y = torch.ops.intl.iternorm_fwd(xb, iters, axis, backend)[0] if x.dim() == 3 else \
            intl_ops.iternorm(xb, iters, axis, backend=backend)
        y.backward(gy.to(x.dtype))
        outs[backend] = (y.detach(), xb.grad)
    x64 = x.detach().double().requires_grad_(True)
    y64 = _literal_views(x64, iters, axis)
    y64.backward(gy)
    return outs["triton"], outs["reference"], (y64.detach(), x64.grad)


# -------------------------------------------------------------------------------- iternorm, CPU tier
CASES = (
    [((37, 50), axis, it, torch.float32) for axis in (0, 1) for it in (0, 1, 2, 4, 5)]
    + [((130, 96), axis, it, torch.float32) for axis in (0, 1) for it in (2, 4)]
    + [((257, 64), 0, 3, torch.float32), ((257, 64), 1, 4, torch.float32)]
    + [((2, 37, 50), axis, 3, torch.float32) for axis in (0, 1)]
    + [((37, 50), axis, 4, torch.float16) for axis in (0, 1)]
    + [((130, 96), 1, 4, torch.float16), ((257, 64), 1, 4, torch.float16), ((2, 37, 50), 0, 2, torch.float16)]
    # bf16 inputs are upcast to fp32 before every tl.dot, so the interpreter's bf16 dot bug is not hit
    + [((37, 50), axis, 4, torch.bfloat16) for axis in (0, 1)]
)


def _case_id(c):
    shape, axis, iters, dtype = c
    return f"{'x'.join(map(str, shape))}-axis{axis}-T{iters}-{str(dtype).split('.')[-1]}"


@pytest.mark.parametrize("shape,axis,iters,dtype", CASES, ids=[_case_id(c) for c in CASES])
def test_iternorm_matches_fp64(shape, axis, iters, dtype):
    x = torch.randn(*shape, device=DEV).to(dtype)
    (y, dx), (y_ref, dx_ref), (y64, dx64) = _iternorm_case(x, iters, axis)
    assert y.dtype == dtype and dx.dtype == dtype and y.shape == x.shape and dx.shape == x.shape
    _check("y", y, y_ref, y64, dtype)
    _check("dx", dx, dx_ref, dx64, dtype)


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
def test_large_mean(axis):
    """Mean 1e3 x the spread: the covariance must not cancel (A^T A - N mu mu^T would)."""
    x = torch.randn(61, 90, device=DEV) * 0.5 + 500.0
    (y, dx), (y_ref, dx_ref), (y64, dx64) = _iternorm_case(x, 4, axis)
    _check("y", y, y_ref, y64, torch.float32)
    _check("dx", dx, dx_ref, dx64, torch.float32)


def test_non_contiguous_input():
    """x read through its strides: a transposed view, no copy needed."""
    x = torch.randn(50, 37, device=DEV).t()
    (y, dx), (y_ref, dx_ref), (y64, dx64) = _iternorm_case(x, 3, 0)
    assert y.is_contiguous()
    _check("y", y, y_ref, y64, torch.float32)
    _check("dx", dx, dx_ref, dx64, torch.float32)


@pytest.mark.parametrize("ns_path", ["rows", "tiles"])
@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
def test_saved_tensors_and_fused_backward(axis, ns_path, monkeypatch):
    """Every saved tensor (mean, S, tr, Ps, Pp, v) against reference.iternorm_fwd in float64, and
    iternorm_bwd with both grad_y and grad_v (the trace-loss route) against reference.iternorm_bwd.
    Both Newton-Schulz paths: row-block steps (small C) and triangle-tiled products (large C)."""
    monkeypatch.setattr(newton_schulz, "ROWS_MAX_C", 10**9 if ns_path == "rows" else 0)
    iters = 4
    x = torch.randn(2, 45, 70, device=DEV) + 3.0
    saved = bt.iternorm_fwd(x, iters, axis)
    ref32 = reference.iternorm_fwd(x, iters, axis)
    ref64 = reference.iternorm_fwd(x.double(), iters, axis)
    for name, got, r32, r64 in zip(saved._fields, saved, ref32, ref64):
        assert got.shape == r64.shape and got.dtype == r32.dtype, name
        _check(name, got, r32, r64, torch.float32)
    gy, gv = torch.randn_like(saved.y), torch.randn_like(saved.v)
    dx = bt.iternorm_bwd(gy, gv, saved.y, x, *saved[1:6], iters, axis)
    dx32 = reference.iternorm_bwd(gy, gv, ref32.y, x, *ref32[1:6], iters, axis)
    dx64 = reference.iternorm_bwd(gy.double(), gv.double(), ref64.y, x.double(), *ref64[1:6], iters, axis)
    _check("dx", dx, dx32, dx64, torch.float32)


def test_fake_shapes_match():
    """Output shapes/dtypes/strides agree with the op's registered fake implementation."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    x = torch.randn(2, 21, 34, device=DEV, dtype=torch.float16)
    real = torch.ops.intl.iternorm_fwd(x, 3, 0, "triton")
    with FakeTensorMode() as mode:
        fake = torch.ops.intl.iternorm_fwd(mode.from_tensor(x), 3, 0, "triton")
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype and r.stride() == f.stride()


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
def test_constant_input_gives_zeros(axis):
    """trace 0: output 0 and gradient 0, never NaN (reference._guarded_scales)."""
    x = torch.full((20, 30), 2.5, device=DEV, requires_grad=True)
    y = intl_ops.iternorm(x, 4, axis, backend="triton")
    y.backward(torch.randn_like(y))
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(x.grad, torch.zeros_like(x))


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty / empty_like is NaN-filled: a kernel that skips an element leaves a NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
def test_poisoned_outputs(poisoned, axis):
    x = torch.randn(2, 130, 37, device=DEV)
    saved = bt.iternorm_fwd(x, 2, axis)
    for name, t in zip(saved._fields, saved):
        assert torch.isfinite(t).all(), name
    ref = reference.iternorm_fwd(x.double(), 2, axis)
    _check("y", saved.y, saved.y, ref.y, torch.float32)
    dx = bt.iternorm_bwd(torch.randn_like(saved.y), torch.randn_like(saved.v), saved.y, x, *saved[1:6], 2, axis)
    assert torch.isfinite(dx).all()
    assert torch.isfinite(bt.trace_loss_bwd(torch.ones(2), saved.y, axis)).all()
    ga, gb = bt.nmse_bwd(torch.ones(2), saved.y, x)
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()


# -------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
def test_trace_loss(axis, dtype):
    y = (torch.randn(37, 50, device=DEV) * 1.3 + 4.0).to(dtype)
    outs = {}
    for backend in ("triton", "reference"):
        yb = y.clone().requires_grad_(True)
        tl = intl_ops.trace_loss(yb, axis, backend=backend)
        tl.backward()
        outs[backend] = (tl.detach(), yb.grad)
    y64 = y.double().requires_grad_(True)
    tl64 = literal.trace_loss(y64, axis)
    tl64.backward()
    _check("TL", outs["triton"][0], outs["reference"][0], tl64, dtype)
    _check("dTL/dy", outs["triton"][1], outs["reference"][1], y64.grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_nmse_broadcast_and_zero_row(dtype):
    """b broadcast over the batch with stride 0 (as intl_loss passes view 0); in fp32 a zero row hits the
    norm clamp (its gradient, ~1/eps, overflows fp16 in every backend)."""
    a = torch.randn(3, 37, 50, device=DEV).to(dtype)
    if dtype == torch.float32:
        a[1, 5] = 0
    b = torch.randn(1, 37, 50, device=DEV).to(dtype).expand(3, 37, 50)
    g = torch.randn(3, device=DEV)
    got = bt.nmse_fwd(a, b), *bt.nmse_bwd(g, a, b)
    r32 = reference.nmse_fwd(a, b), *reference.nmse_bwd(g, a, b)
    r64 = reference.nmse_fwd(a.double(), b.double()), *reference.nmse_bwd(g.double(), a.double(), b.double())
    for name, o, r, o64 in zip(("nmse", "da", "db"), got, r32, r64):
        _check(name, o, r, o64, dtype)
    assert got[1].dtype == dtype and got[1].is_contiguous()


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
@pytest.mark.parametrize("momentum", [False, True], ids=["intl", "intl_m"])
def test_intl_loss(axis, momentum):
    views = [torch.randn(37, 50, device=DEV) + i for i in range(3)]
    target = torch.randn(37, 50, device=DEV) if momentum else None
    outs = {}
    for backend in ("triton", "reference"):
        vs = [v.clone().requires_grad_(True) for v in views]
        loss = intl_ops.intl_loss(vs, 4, axis, target=target, backend=backend)
        loss.backward()
        outs[backend] = (loss.detach(), torch.stack([v.grad for v in vs]))
    v64 = [v.double().requires_grad_(True) for v in views]
    loss64 = literal.intl_loss(v64, 4, axis, target=None if target is None else target.double())
    loss64.backward()
    _check("loss", outs["triton"][0], outs["reference"][0], loss64, torch.float32)
    _check("dviews", outs["triton"][1], outs["reference"][1], torch.stack([v.grad for v in v64]), torch.float32)


# -------------------------------------------------------------------------------- integration
def test_opcheck():
    x = torch.randn(2, 21, 34, device=DEV, requires_grad=True)
    for axis in (0, 1):
        torch.library.opcheck(torch.ops.intl.iternorm_fwd.default, (x, 2, axis, "triton"))
        y, mean, S, tr, Ps, Pp, v = torch.ops.intl.iternorm_fwd(x.detach(), 2, axis, "triton")
        torch.library.opcheck(torch.ops.intl.iternorm_bwd.default,
                              (torch.randn_like(y), torch.randn_like(v), y, x.detach(), mean, S, tr, Ps, Pp, 2, axis, "triton"))
        torch.library.opcheck(torch.ops.intl.trace_loss.default, (x, axis, "triton"))
    torch.library.opcheck(torch.ops.intl.nmse.default, (x, torch.randn_like(x, requires_grad=True), "triton"))
    torch.library.opcheck(torch.ops.intl.nmse_bwd.default, (torch.randn(2, device=DEV), x.detach(), x.detach() + 1, "triton"))
    torch.library.opcheck(torch.ops.intl.trace_loss_bwd.default, (torch.randn(2, device=DEV), x.detach(), 0, "triton"))


def test_compile_fullgraph():
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: intl_ops.intl_loss([a, b], 3, 0, backend="triton"), fullgraph=True,
                       backend="aot_eager" if DEV == "cpu" else "inductor")
    a = torch.randn(21, 34, device=DEV, requires_grad=True)
    b = torch.randn(21, 34, device=DEV, requires_grad=True)
    loss = fn(a, b)
    loss.backward()
    a64, b64 = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    loss64 = literal.intl_loss([a64, b64], 3, 0)
    loss64.backward()
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-4, atol=1e-5)


def test_float64_runs_reference_math():
    x = torch.randn(2, 12, 17, device=DEV, dtype=torch.float64)
    assert not bt.uses_kernels(torch.float64)
    got, want = bt.iternorm_fwd(x, 3, 1), reference.iternorm_fwd(x, 3, 1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_unavailable_reason():
    assert bt.unavailable_reason(torch.device(DEV)) is None
    assert "cuda" in bt.unavailable_reason(torch.device("meta"))


# -------------------------------------------------------------------------------- precision, covariance, GPU blocks
@pytest.fixture
def dot_mode(monkeypatch):
    """Restores the dot-precision mode and torch's matmul flags after the test."""
    monkeypatch.delenv("INTL_OPS_DOT_PRECISION", raising=False)
    old_mode, old_new = _common.get_dot_precision(), torch.backends.cuda.matmul.fp32_precision
    yield _common.set_dot_precision
    _common.set_dot_precision(old_mode)
    torch.backends.cuda.matmul.fp32_precision = old_new


def test_dot_precision_modes(dot_mode, monkeypatch):
    """Tensor cores at fp32 accuracy by default, whatever torch's default; the user's tf32 opt-in through
    either torch API (the new one makes the legacy getter raise) gives tf32; "ieee" stays exact."""
    assert _common.dot_precision() == "tf32x3"
    torch.set_float32_matmul_precision("high")
    assert _common.dot_precision() == "tf32"
    torch.set_float32_matmul_precision("highest")
    assert _common.dot_precision() == "tf32x3"
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # torch's new API
    assert _common.dot_precision() == "tf32"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert _common.dot_precision() == "tf32x3"
    for mode in ("tf32x3", "tf32", "ieee"):
        intl_ops.set_dot_precision(mode)
        assert _common.dot_precision() == mode
    assert not _common.half_dot(torch.float16, _common.dot_precision())  # ieee: fp16/bf16 tiles upcast too
    intl_ops.set_dot_precision("auto")
    prec = _common.dot_precision()
    assert _common.half_dot(torch.float16, prec) and not _common.half_dot(torch.float32, prec)
    assert _common.half_dot(torch.bfloat16, prec) == (not _common.interpreting())
    monkeypatch.setenv("INTL_OPS_DOT_PRECISION", "ieee")
    assert _common.dot_precision() == "ieee"
    monkeypatch.setenv("INTL_OPS_DOT_PRECISION", "fast")
    with pytest.raises(ValueError, match="INTL_OPS_DOT_PRECISION"):
        _common.dot_precision()
    with pytest.raises(ValueError, match="mode must be one of"):
        intl_ops.set_dot_precision("tf16")


def test_new_tf32_api_does_not_break_calls(dot_mode):
    """torch.backends.cuda.matmul.fp32_precision = "tf32" once crashed every Triton call."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    x = torch.randn(37, 50, device=DEV)
    y = intl_ops.iternorm(x, 3, 0, backend="triton")
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("mode", ["auto", "tf32x3", "ieee"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_each_dot_precision_matches_fp64(dot_mode, mode, dtype):
    """Every exact-accuracy mode against float64, values and gradients. Under the interpreter fp32 dots
    are computed in fp32 whatever the mode, and fp16 tiles really are fp16 products with fp32 sums (the
    half-dot path of "auto"); tf32's rounding is not emulated there (the GPU tier checks it)."""
    dot_mode(mode)
    x = torch.randn(61, 45, device=DEV).to(dtype)
    (y, dx), (y_ref, dx_ref), (y64, dx64) = _iternorm_case(x, 4, 1)
    _check("y", y, y_ref, y64, dtype)
    _check("dx", dx, dx_ref, dx64, dtype)


def _sigma_error(a: torch.Tensor) -> float:
    mean, S, tr = covariance.covariance_fwd(a)
    a64 = a.double()
    ac = a64 - a64.mean(1, keepdim=True)
    sigma64 = ac.mT @ ac / (a.shape[1] - 1)
    torch.testing.assert_close(mean.double(), a64.mean(1), rtol=0, atol=1e-6 * a64.abs().max().item())
    return _err(S * tr[:, None, None], sigma64)


SIGMA_BOUND = 4 * torch.finfo(torch.float32).eps  # relative to max |Sigma|


def _large_mean_observations(N: int) -> torch.Tensor:
    return torch.randn(1, N, 8, device=DEV) * 2 + 10  # mean 5x the spread


@pytest.mark.parametrize("N", [1024, 8192, 65536])
def test_covariance_error_does_not_grow_with_n(N):
    """Sigma within 4 fp32 ulps of float64 at every N, for data whose mean is 5x its spread. Rows are
    split into chunks of at most MAX_SPLIT_ROWS summed in a fixed order and shifted by the mean of the
    first rows (test_covariance_bound_catches_one_long_sum shows the bound fails without both)."""
    if not HAS_CUDA:  # the interpreter's programs run one by one: chunks only for accuracy
        bn, bc = _common.block(N, gpu=32), _common.block(8, gpu=64)  # as covariance_fwd picks them
        assert covariance.split_rows(N, 8, 1, bn, bc, torch.device(DEV))[0] == -(-N // covariance.MAX_SPLIT_ROWS)
    assert _sigma_error(_large_mean_observations(N)) <= SIGMA_BOUND


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the rows are split to fill the SMs whatever MAX_SPLIT_ROWS says")
def test_covariance_bound_catches_one_long_sum(monkeypatch):
    """The former kernel's scheme, one sequential sum over all rows shifted by the first row, breaks the
    bound above at N = 65536 (5.9e-6 measured here): that test can fail."""
    monkeypatch.setattr(covariance, "MAX_SPLIT_ROWS", 10**9)
    monkeypatch.setattr(covariance, "SHIFT_ROWS", 1)
    assert _sigma_error(_large_mean_observations(65536)) > SIGMA_BOUND


def test_covariance_stores_an_exactly_symmetric_sigma(poisoned):
    """Every tile written (poisoned buffers), the diagonal tiles once and exactly symmetric."""
    with _common.gpu_block_sizes():
        a = torch.randn(2, 300, 130, device=DEV) + 3.0
        mean, S, tr = covariance.covariance_fwd(a)
    assert torch.isfinite(S).all() and torch.equal(S, S.mT)
    assert _sigma_error(a) <= 4 * torch.finfo(torch.float32).eps


GPU_BLOCK_CASES = [((150, 130), 1, "rows", torch.float32), ((130, 150), 0, "tiles", torch.float32),
                   ((2, 70, 130), 1, "tiles", torch.float16), ((3000, 20), 1, "rows", torch.float32)]


@pytest.mark.parametrize("shape,axis,ns_path,dtype", GPU_BLOCK_CASES,
                         ids=[f"{'x'.join(map(str, s))}-axis{a}-{p}-{str(d).split('.')[-1]}" for s, a, p, d in GPU_BLOCK_CASES])
def test_gpu_block_sizes_multi_tile(shape, axis, ns_path, dtype, monkeypatch):
    """The GPU's block sizes under the interpreter, on shapes of several tiles: the mirrored off-diagonal
    tiles of the covariance and of the symmetric Newton-Schulz products, ragged edges, several row
    blocks, and (N = 3000) several row chunks of the covariance."""
    monkeypatch.setattr(newton_schulz, "ROWS_MAX_C", 10**9 if ns_path == "rows" else 0)
    x = torch.randn(*shape, device=DEV).to(dtype)
    with _common.gpu_block_sizes():
        (y, dx), (y_ref, dx_ref), (y64, dx64) = _iternorm_case(x, 3, axis)
    _check("y", y, y_ref, y64, dtype)
    _check("dx", dx, dx_ref, dx64, dtype)


# -------------------------------------------------------------------------------- GPU tier
GPU_SHAPES = [((256, 8192), 0), ((512, 2048), 1), ((1024, 8192), 0)]
GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape,axis", GPU_SHAPES, ids=[f"{m}x{d}-axis{a}" for (m, d), a in GPU_SHAPES])
def test_gpu_iternorm_vs_eager(shape, axis, dtype):
    """Error vs float64 at most 2x the eager literal code's at the same precision (values and grads)."""
    x = torch.randn(*shape, device="cuda").to(dtype)
    gy = torch.randn(shape, device="cuda", dtype=torch.float64)
    x64 = x.double().requires_grad_(True)
    y64 = literal.iternorm(x64, 4, axis)
    y64.backward(gy)
    res = {}
    for name, fn in (("triton", lambda t: intl_ops.iternorm(t, 4, axis, backend="triton")),
                     ("eager", lambda t: literal.iternorm(t, 4, axis))):
        xb = x.clone().requires_grad_(True)
        y = fn(xb)
        y.backward(gy.to(dtype))
        res[name] = (y.detach(), xb.grad)
    for i, what in enumerate(("y", "dx")):
        e, e_eager = _err(res["triton"][i], (y64, x64.grad)[i]), _err(res["eager"][i], (y64, x64.grad)[i])
        assert math.isfinite(e) and e <= 2 * e_eager + FLOOR[dtype], f"{what}: {e:.3g} vs eager {e_eager:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_intl_loss_vs_eager(dtype):
    views = [torch.randn(256, 8192, device="cuda").to(dtype) for _ in range(2)]
    v64 = [v.double().requires_grad_(True) for v in views]
    loss64 = literal.intl_loss(v64, 4, 0)
    loss64.backward()
    res = {}
    for name, fn in (("triton", lambda vs: intl_ops.intl_loss(vs, 4, 0, backend="triton")),
                     ("eager", lambda vs: literal.intl_loss(vs, 4, 0))):
        vs = [v.clone().requires_grad_(True) for v in views]
        loss = fn(vs)
        loss.backward()
        res[name] = (loss.detach(), torch.stack([v.grad for v in vs]))
    g64 = torch.stack([v.grad for v in v64])
    for i, oracle in enumerate((loss64, g64)):
        e, e_eager = _err(res["triton"][i], oracle), _err(res["eager"][i], oracle)
        assert math.isfinite(e) and e <= 2 * e_eager + FLOOR[dtype], f"part {i}: {e:.3g} vs eager {e_eager:.3g}"


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    """Capture intl_loss fwd+bwd (Triton backend) in a CUDA graph; replays on new data match eager calls."""
    torch.manual_seed(1)
    x = torch.randn(2, 256, 1024, device="cuda", requires_grad=True)

    def step():
        x.grad = None
        loss = intl_ops.intl_loss(x, 4, 0, backend="triton")
        loss.backward()
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile the kernels and warm the allocator outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        loss_static = intl_ops.intl_loss(x, 4, 0, backend="triton")
        loss_static.backward()
    grad_static = x.grad  # the graph's output; step() below replaces x.grad by an eager tensor
    for _ in range(3):
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        got_loss, got_grad = loss_static.clone(), grad_static.clone()
        want_loss = step()
        assert x.grad is not grad_static
        torch.testing.assert_close(got_loss, want_loss)
        torch.testing.assert_close(got_grad, x.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["auto", "tf32x3", "ieee", "tf32", "torch-tf32"])
def test_gpu_dot_precision_vs_fp64(dot_mode, mode):
    """Each precision mode on the tensor cores against float64, values and gradients: the fp32-accurate
    modes within 2x the fp32 reference backend's error, tf32 (chosen, or allowed through torch's new
    API under "auto") within 1e-2."""
    x = torch.randn(512, 2048, device="cuda")
    gy = torch.randn_like(x, dtype=torch.float64)
    x64 = x.double().requires_grad_(True)
    y64 = literal.iternorm(x64, 4, 1)
    y64.backward(gy)
    res = {}
    for backend in ("reference", "triton"):
        if backend == "triton":
            if mode == "torch-tf32":
                torch.backends.cuda.matmul.fp32_precision = "tf32"
            else:
                dot_mode(mode)
        xb = x.clone().requires_grad_(True)
        y = intl_ops.iternorm(xb, 4, 1, backend=backend)
        y.backward(gy.float())
        res[backend] = (_err(y, y64), _err(xb.grad, x64.grad))
    for i, what in enumerate(("y", "dx")):
        e, e_ref = res["triton"][i], res["reference"][i]
        if mode in ("tf32", "torch-tf32"):
            assert e < 1e-2, f"{what}: {e:.3g}"
        else:
            assert e <= 2 * e_ref + FLOOR[torch.float32], f"{what}: {e:.3g} vs reference {e_ref:.3g}"


@pytest.mark.gpu
def test_gpu_opcheck_and_compile():
    x = torch.randn(2, 256, 1024, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.intl.iternorm_fwd.default, (x, 4, 0, "triton"))
    torch.library.opcheck(torch.ops.intl.nmse.default, (x, torch.randn_like(x, requires_grad=True), "triton"))
    torch._dynamo.reset()
    fn = torch.compile(lambda t: intl_ops.intl_loss(t, 4, 0, backend="triton"), fullgraph=True)
    loss = fn(x)
    loss.backward()
    g = x.grad.clone()
    x.grad = None
    want = intl_ops.intl_loss(x, 4, 0, backend="triton")
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(g, x.grad)
