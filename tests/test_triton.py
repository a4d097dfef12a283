"""The Triton backend (intl_ops/kernels + intl_ops/backend_triton.py) against the float64 oracle.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes stay small. Every numerical check is tests/_oracle.py's rule: the
Triton result's error against float64 (the literal code, or _oracle's textbook saved tensors) may be
at most 2x the error of the reference backend at the same input dtype, plus a small floor.
Each check that goes through backend="triton" also asserts that the Triton functions ran (_runs_triton),
so a backend that declines a call (and leaves it to the reference) cannot pass by comparing the
reference with itself; the *_detects_wrong_output tests feed the checks wrong outputs.
The `gpu` tier repeats this at real shapes and checks opcheck, torch.compile and CUDA graphs on CUDA.
"""
import contextlib
import os
from unittest import mock

import pytest
import torch

import intl_ops
from intl_ops import literal, reference
from intl_ops import backend_triton as bt
from intl_ops.kernels import _common, apply, covariance, newton_schulz
from _oracle import (assert_matches_oracle, iternorm_grad_oracle, iternorm_saved_oracle, literal_iternorm,
                     nmse_oracle, perturbed, rel_err, runs_backend, trace_loss_oracle)

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
SAVED_FIELDS = reference.IterNormSaved._fields

pytestmark = pytest.mark.skipif(bt.unavailable_reason(torch.device(DEV)) is not None,
                                reason=str(bt.unavailable_reason(torch.device(DEV))))


def _runs_triton(*fns):
    """Asserts that each of backend_triton's functions `fns` ran inside the block (not the reference in its place)."""
    return runs_backend(bt, *fns)


def _iternorm_case(x, iters, axis):
    """(y, dx) for backend triton and reference at x's dtype, and the float64 oracle's (the literal
    code), with one random upstream gradient."""
    gy = torch.randn(x.shape, device=x.device, dtype=torch.float64)
    outs = {}
    for backend in ("triton", "reference"):
        xb = x.detach().clone().requires_grad_(True)
        with _runs_triton("iternorm_fwd", "iternorm_bwd") if backend == "triton" else contextlib.nullcontext():
            y = torch.ops.intl.iternorm_fwd(xb, iters, axis, backend)[0] if x.dim() == 3 else \
                intl_ops.iternorm(xb, iters, axis, backend=backend)
            y.backward(gy.to(x.dtype))
        outs[backend] = (y.detach(), xb.grad)
    x64 = x.detach().double().requires_grad_(True)
    y64 = literal_iternorm(x64, iters, axis)
    y64.backward(gy)
    return outs["triton"], outs["reference"], (y64.detach(), x64.grad)


def _check_iternorm_case(x, iters, axis):
    (y, dx), (y_ref, dx_ref), (y64, dx64) = _iternorm_case(x, iters, axis)
    assert y.dtype == x.dtype and dx.dtype == x.dtype and y.shape == x.shape and dx.shape == x.shape
    assert_matches_oracle("y", y, y64, ref=y_ref)
    assert_matches_oracle("dx", dx, dx64, ref=dx_ref)
    return y


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
    _check_iternorm_case(x, iters, axis)


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
def test_large_mean(axis):
    """Mean 1e3 x the spread: the covariance must not cancel (A^T A - N mu mu^T would)."""
    x = torch.randn(61, 90, device=DEV) * 0.5 + 500.0
    _check_iternorm_case(x, 4, axis)


def test_non_contiguous_input():
    """x read through its strides: a transposed view, no copy needed."""
    x = torch.randn(50, 37, device=DEV).t()
    assert _check_iternorm_case(x, 3, 0).is_contiguous()


def _check_iternorm_outputs(x, iters, axis):
    """backend_triton's iternorm_fwd (every saved tensor) and iternorm_bwd with both grad_y and grad_v
    (the trace-loss route) on x against the reference backend at x's dtype and the float64 oracle
    (independent of intl_ops.reference). Returns the saved tensors."""
    saved = bt.iternorm_fwd(x, iters, axis)
    ref = reference.iternorm_fwd(x, iters, axis)
    oracle = iternorm_saved_oracle(x, iters, axis)
    assert len(saved) == len(SAVED_FIELDS)
    for name, got, r, o in zip(SAVED_FIELDS, saved, ref, oracle, strict=True):
        assert got.dtype == r.dtype, f"{name}: dtype {got.dtype}, reference {r.dtype}"
        # v is fp32, but the half-dot path (fp16/bf16 input) rounds its operand tiles (Ac and P_T) to the
        # input dtype before the products: v carries two such roundings (~1e-3 for fp16 measured), the
        # reference none
        floor_scale = 2.0 if name == "v" and x.dtype in (torch.float16, torch.bfloat16) else 1.0
        assert_matches_oracle(name, got, o, ref=r, dtype=x.dtype, floor_scale=floor_scale)
    gy, gv = torch.randn_like(saved.y), torch.randn_like(saved.v)
    dx = bt.iternorm_bwd(gy, gv, saved.y, x, *saved[1:6], iters, axis)
    dx_ref = reference.iternorm_bwd(gy, gv, ref.y, x, *ref[1:6], iters, axis)
    assert_matches_oracle("dx", dx, iternorm_grad_oracle(x, iters, axis, gy, gv), ref=dx_ref)
    return saved


def _check_all_outputs(x, iters, axis):
    """Every output of backend_triton's functions on x against the reference backend at x's dtype and
    the float64 oracle: iternorm (_check_iternorm_outputs), trace_loss_fwd/bwd and nmse_fwd/bwd
    (a = y, b = x)."""
    saved = _check_iternorm_outputs(x, iters, axis)
    g = torch.randn(x.shape[:-2], device=x.device)
    tl64, dy64 = trace_loss_oracle(saved.y, axis, g)
    assert_matches_oracle("trace_loss", bt.trace_loss_fwd(saved.y, axis), tl64,
                          ref=reference.trace_loss_fwd(saved.y, axis), dtype=x.dtype)
    assert_matches_oracle("trace_loss_bwd", bt.trace_loss_bwd(g, saved.y, axis), dy64,
                          ref=reference.trace_loss_bwd(g, saved.y, axis))
    nmse64, da64, db64 = nmse_oracle(saved.y, x, g)
    assert_matches_oracle("nmse", bt.nmse_fwd(saved.y, x), nmse64, ref=reference.nmse_fwd(saved.y, x), dtype=x.dtype)
    for name, got, r, o in zip(("nmse_bwd da", "nmse_bwd db"), bt.nmse_bwd(g, saved.y, x),
                               reference.nmse_bwd(g, saved.y, x), (da64, db64), strict=True):
        assert_matches_oracle(name, got, o, ref=r)


@pytest.mark.parametrize("ns_path", ["rows", "tiles"])
@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
def test_saved_tensors_and_fused_backward(axis, ns_path, monkeypatch):
    """Every saved tensor (mean, S, tr, Ps, powers, v), the fused backward and the loss functions
    (_check_all_outputs). Both Newton-Schulz paths: row-block steps (small C) and triangle-tiled
    products (large C)."""
    monkeypatch.setattr(newton_schulz, "ROWS_MAX_C", 10**9 if ns_path == "rows" else 0)
    _check_all_outputs(torch.randn(2, 45, 70, device=DEV) + 3.0, 4, axis)


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
    with _runs_triton("iternorm_fwd", "iternorm_bwd"):
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
    """NaN-filled buffers: every output of every function, element by element, against the oracle."""
    _check_all_outputs(torch.randn(2, 130, 37, device=DEV), 2, axis)


def _with_wrong(fn, index=None):
    """fn's result with one element off (perturbed): output `index` of a tuple result, else the result."""
    def wrong(*args, **kwargs):
        out = fn(*args, **kwargs)
        if index is None:
            return perturbed(out)
        parts = list(out)
        parts[index] = perturbed(parts[index])
        return type(out)(*parts) if hasattr(out, "_fields") else tuple(parts)
    return wrong


# Each output _check_all_outputs compares: (the check's name, the backend_triton function, tuple index)
WRONG_OUTPUTS = ([(name, "iternorm_fwd", i) for i, name in enumerate(SAVED_FIELDS)]
                 + [("dx", "iternorm_bwd", None), ("trace_loss", "trace_loss_fwd", None),
                    ("trace_loss_bwd", "trace_loss_bwd", None), ("nmse", "nmse_fwd", None),
                    ("nmse_bwd da", "nmse_bwd", 0), ("nmse_bwd db", "nmse_bwd", 1)])


@pytest.mark.parametrize("name,fn,index", WRONG_OUTPUTS, ids=[w[0].replace(" ", "-") for w in WRONG_OUTPUTS])
def test_all_outputs_check_detects_wrong_output(name, fn, index, monkeypatch):
    """_check_all_outputs fails, at the right output, when one element of one output is off by 1e-3 of
    its range. backend_triton's functions are stood in for by the reference's (no interpreter cost),
    which pass the same check unperturbed."""
    x = torch.randn(2, 21, 13, device=DEV)
    for op in {w[1] for w in WRONG_OUTPUTS}:
        monkeypatch.setattr(bt, op, getattr(reference, op))
    _check_all_outputs(x, 2, 0)
    monkeypatch.setattr(bt, fn, _with_wrong(getattr(reference, fn), index))
    with pytest.raises(AssertionError, match=f"^{name}: "):
        _check_all_outputs(x, 2, 0)


@pytest.mark.parametrize("fn", ["iternorm_fwd", "iternorm_bwd"])
def test_iternorm_case_detects_wrong_output(fn, monkeypatch):
    """The check of test_iternorm_matches_fp64 and the other _iternorm_case tests fails for a wrong y
    (or dx) from backend="triton", and when the Triton functions never run."""
    x = torch.randn(21, 13, device=DEV)
    for op in ("iternorm_fwd", "iternorm_bwd"):
        monkeypatch.setattr(bt, op, getattr(reference, op))
    _check_iternorm_case(x, 3, 1)
    monkeypatch.setattr(bt, fn, _with_wrong(getattr(reference, fn), 0 if fn == "iternorm_fwd" else None))
    with pytest.raises(AssertionError, match="^y: " if fn == "iternorm_fwd" else "^dx: "):
        _check_iternorm_case(x, 3, 1)
    monkeypatch.setattr(bt, "supports", lambda *args: "declined for this test")
    with pytest.raises(AssertionError, match="never ran"):
        _check_iternorm_case(x, 3, 1)


# -------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
def test_trace_loss(axis, dtype):
    y = (torch.randn(37, 50, device=DEV) * 1.3 + 4.0).to(dtype)
    outs = {}
    for backend in ("triton", "reference"):
        yb = y.clone().requires_grad_(True)
        with _runs_triton("trace_loss_fwd", "trace_loss_bwd") if backend == "triton" else contextlib.nullcontext():
            tl = intl_ops.trace_loss(yb, axis, backend=backend)
            tl.backward()
        outs[backend] = (tl.detach(), yb.grad)
    tl64, dy64 = trace_loss_oracle(y, axis, torch.tensor(1.0))
    assert_matches_oracle("TL", outs["triton"][0], tl64, ref=outs["reference"][0], dtype=dtype)
    assert_matches_oracle("dTL/dy", outs["triton"][1], dy64, ref=outs["reference"][1])


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
    for name, o, r, o64 in zip(("nmse", "da", "db"), got, r32, nmse_oracle(a, b, g), strict=True):
        assert_matches_oracle(name, o, o64, ref=r, dtype=dtype)
    assert got[1].dtype == dtype and got[1].is_contiguous()


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
@pytest.mark.parametrize("momentum", [False, True], ids=["intl", "intl_m"])
def test_intl_loss(axis, momentum):
    views = [torch.randn(37, 50, device=DEV) + i for i in range(3)]
    target = torch.randn(37, 50, device=DEV) if momentum else None
    outs = {}
    for backend in ("triton", "reference"):
        vs = [v.clone().requires_grad_(True) for v in views]
        with _runs_triton("iternorm_fwd", "iternorm_bwd", "intl_head_fwd", "intl_head_bwd") if backend == "triton" \
                else contextlib.nullcontext():
            loss = intl_ops.intl_loss(vs, 4, axis, target=target, backend=backend)
            loss.backward()
        outs[backend] = (loss.detach(), torch.stack([v.grad for v in vs]))
    v64 = [v.double().requires_grad_(True) for v in views]
    loss64 = literal.intl_loss(v64, 4, axis, target=None if target is None else target.double())
    loss64.backward()
    assert_matches_oracle("loss", outs["triton"][0], loss64, ref=outs["reference"][0])
    assert_matches_oracle("dviews", outs["triton"][1], torch.stack([v.grad for v in v64]), ref=outs["reference"][1])


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
    """The compiled Triton loss and gradients against float64, with the eager reference backend's error."""
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: intl_ops.intl_loss([a, b], 3, 0, backend="triton"), fullgraph=True,
                       backend="aot_eager" if DEV == "cpu" else "inductor")
    a = torch.randn(21, 34, device=DEV, requires_grad=True)
    b = torch.randn(21, 34, device=DEV, requires_grad=True)
    with _runs_triton("iternorm_fwd", "iternorm_bwd", "intl_head_fwd", "intl_head_bwd"):
        loss = fn(a, b)
        ga, gb = torch.autograd.grad(loss, (a, b))
    ar, br = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
    loss_ref = intl_ops.intl_loss([ar, br], 3, 0, backend="reference")
    ga_ref, gb_ref = torch.autograd.grad(loss_ref, (ar, br))
    a64, b64 = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    loss64 = literal.intl_loss([a64, b64], 3, 0)
    ga64, gb64 = torch.autograd.grad(loss64, (a64, b64))
    assert_matches_oracle("loss", loss, loss64, ref=loss_ref)
    assert_matches_oracle("da", ga, ga64, ref=ga_ref)
    assert_matches_oracle("db", gb, gb64, ref=gb_ref)


def test_float64_runs_reference_math():
    """fp64 is not compiled into the kernels: backend="triton" gives the reference's bits, forward and backward."""
    x = torch.randn(2, 12, 17, device=DEV, dtype=torch.float64)
    got, want = torch.ops.intl.iternorm_fwd(x, 3, 1, "triton"), reference.iternorm_fwd(x, 3, 1)
    for name, g, w in zip(SAVED_FIELDS, got, want, strict=True):
        assert torch.equal(g, w), name
    xs = [x[0].clone().requires_grad_(True) for _ in range(2)]
    for xb, backend in zip(xs, ("triton", "reference")):
        intl_ops.trace_loss(intl_ops.iternorm(xb, 3, 1, backend=backend), 1, backend=backend).backward()
    assert torch.equal(xs[0].grad, xs[1].grad)


def test_unavailable_reason():
    assert bt.unavailable_reason(torch.device(DEV)) is None
    assert "cuda" in bt.unavailable_reason(torch.device("meta"))


# -------------------------------------------------------------------------------- precision, covariance, GPU blocks
@pytest.fixture
def dot_mode(monkeypatch):
    """Restores the dot-precision mode (unset included) and torch's matmul flags after the test."""
    monkeypatch.delenv("INTL_OPS_DOT_PRECISION", raising=False)
    monkeypatch.setattr(_common, "_dot_mode", _common._dot_mode)
    old_new = torch.backends.cuda.matmul.fp32_precision
    yield _common.set_dot_precision
    torch.backends.cuda.matmul.fp32_precision = old_new


def test_dot_precision_modes(dot_mode, monkeypatch):
    """Tensor cores at fp32 accuracy by default, whatever torch's default; the user's tf32 opt-in through
    either torch API (the new one makes the legacy getter raise) gives tf32; "ieee" stays exact;
    INTL_OPS_DOT_PRECISION decides while no mode is set, read once."""
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
    monkeypatch.setattr(_common, "_dot_mode", None)  # no mode set yet: the environment decides, read once
    monkeypatch.setenv("INTL_OPS_DOT_PRECISION", "ieee")
    assert _common.dot_precision() == "ieee"
    monkeypatch.setenv("INTL_OPS_DOT_PRECISION", "tf32")
    assert _common.dot_precision() == "ieee"
    monkeypatch.setattr(_common, "_dot_mode", None)
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
    if HAS_CUDA:  # tf32 products: about 1e-3 (test_gpu_dot_precision_vs_fp64)
        assert rel_err(y, literal_iternorm(x, 3, 0)) < 1e-2
    else:  # the interpreter computes fp32 dots in fp32 whatever the mode
        assert_matches_oracle("y", y, literal_iternorm(x, 3, 0), ref=intl_ops.iternorm(x, 3, 0, backend="reference"))


@pytest.mark.parametrize("mode", ["auto", "tf32x3", "ieee"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_each_dot_precision_matches_fp64(dot_mode, mode, dtype):
    """Every exact-accuracy mode against float64, values and gradients. Under the interpreter fp32 dots
    are computed in fp32 whatever the mode, and fp16 tiles really are fp16 products with fp32 sums (the
    half-dot path of "auto"); tf32's rounding is not emulated there (the GPU tier checks it)."""
    dot_mode(mode)
    _check_iternorm_case(torch.randn(61, 45, device=DEV).to(dtype), 4, 1)


def _sigma_error(a: torch.Tensor) -> float:
    mean, S, tr = covariance.covariance_fwd(a)
    a64 = a.double()
    ac = a64 - a64.mean(1, keepdim=True)
    sigma64 = ac.mT @ ac / (a.shape[1] - 1)
    assert_matches_oracle("mean", mean, a64.mean(1))
    return rel_err(S * tr[:, None, None], sigma64)


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
        _check_iternorm_case(x, 3, axis)


# -------------------------------------------------------------------------------- split-N apply backward, fused chain rule
@contextlib.contextmanager
def _split_launches():
    """The grids of the H200 (132 SMs) under the interpreter, recording the backward's row split: yields a
    list of (n_split, C tiles) per apply backward."""
    splits = []

    def spy(N, C, B, bn, bc, device, triangle=True):
        out = covariance.split_rows(N, C, B, bn, bc, device, triangle)
        if not triangle:
            splits.append((out[0], -(-C // bc)))
        return out

    with _common.gpu_block_sizes(), _common.assume_gpu(132), mock.patch.object(apply, "split_rows", spy):
        yield splits


# C = 80 (2 x 2 tiles of 64), N = 70 (5 chunks of 16 rows: sizes not multiples of 16); T = 2 is enough
# (the Newton-Schulz kernels are tested above), T = 0 and 1 are the special cases of P_T and of the
# Newton-Schulz backward
SPLIT_CASES = [((2, 80, 70), 0, 2, torch.float32), ((2, 70, 80), 1, 2, torch.float32),
               ((2, 80, 70), 0, 2, torch.float16), ((2, 70, 80), 1, 2, torch.float16),
               ((2, 80, 70), 0, 0, torch.float32), ((2, 70, 80), 1, 1, torch.float32)]


@pytest.mark.parametrize("shape,axis,iters,dtype", SPLIT_CASES, ids=[_case_id(c) for c in SPLIT_CASES])
def test_split_backward_matches_fp64(shape, axis, iters, dtype, poisoned):
    """The apply backward with its rows split over several chunks and several C x C tiles (the H200's grids),
    sizes not multiples of 16, so the partial and reduce kernels and the chain rule fused into the dA
    kernel run with ragged edges: every saved tensor and dL/dx (grad_y and grad_v) against float64.
    Poisoned buffers: every partial element is written."""
    x = (torch.randn(*shape, device=DEV) + 3.0).to(dtype)
    with _split_launches() as splits:
        _check_iternorm_outputs(x, iters, axis)
    assert splits and all(n_split == 5 and tiles == 2 for n_split, tiles in splits), splits


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
def test_split_backward_constant_input_gives_zeros(axis, poisoned):
    """tr = 0 through the split path: y, v and dL/dx exactly 0 (the guarded scales of the chain rule)."""
    x = torch.full((70, 80) if axis == 1 else (80, 70), 2.5, device=DEV)
    with _split_launches() as splits:
        saved = bt.iternorm_fwd(x, 2, axis)
        dx = bt.iternorm_bwd(torch.randn_like(saved.y), torch.randn_like(saved.v), saved.y, x, *saved[1:6], 2, axis)
    assert splits[0][0] > 1
    for name, t in (("y", saved.y), ("v", saved.v), ("dx", dx)):
        assert torch.equal(t, torch.zeros_like(t)), name


def test_split_backward_is_deterministic():
    """Two backward runs on the same inputs give the same bits (partials summed in a fixed order, no atomics)."""
    x = torch.randn(2, 80, 70, device=DEV)
    with _split_launches() as splits:
        saved = bt.iternorm_fwd(x, 2, 0)
        gy, gv = torch.randn_like(saved.y), torch.randn_like(saved.v)
        dx1, dx2 = (bt.iternorm_bwd(gy, gv, saved.y, x, *saved[1:6], 2, 0) for _ in range(2))
    assert splits[0][0] > 1 and torch.equal(dx1, dx2)


@pytest.mark.parametrize("split", [False, True], ids=["one-chunk", "split"])
def test_apply_bwd_chain_rule_matches_covariance_grad(split):
    """The chain rule fused into the dA kernel, alone: given any Sbar (not symmetric) and <Sbar, S> in
    uneven partials (read through strides), dL/dA = Acbar + Ac M with M from reference.covariance_grad,
    computed here in float64 from the same inputs (G = Ac^T Ybar' / sqrt(tr) included)."""
    B, N, C = 2, 45, 70
    a = torch.randn(B, N, C, device=DEV) + 2.0
    gy, y = torch.randn(B, N, C, device=DEV), torch.randn(B, N, C, device=DEV)
    gv = torch.randn(B, C, device=DEV)
    a64 = a.double()
    mean = a64.mean(1)
    ac = a64 - mean[:, None]
    sigma = ac.mT @ ac / (N - 1)
    tr = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)
    S = sigma / tr[:, None, None]
    P_T = torch.linalg.matrix_power(torch.eye(C, device=DEV, dtype=torch.float64) - 0.3 * S, 2)  # symmetric
    Sbar = torch.randn(B, C, C, device=DEV)
    ss = (Sbar.double() * S).sum((-2, -1))
    parts = torch.stack([0.25 * ss, 0.5 * ss, 0.25 * ss], 0).float().mT  # (B, 3), column stride B
    got = {}

    def ns_bwd(G):
        got["G"] = G.clone()
        return Sbar, parts

    gx = torch.empty(B, N, C, device=DEV)
    with _split_launches() if split else contextlib.nullcontext([(1, 1)]) as splits:
        apply.apply_bwd(a, mean.float(), P_T.float(), tr.float(), gy, y, gv, ns_bwd, gx)
    assert (splits[0][0] > 1) == split, splits  # partials + reduce, or the partial kernel's FINISH
    ybar = gy.double() + 2.0 / (N - 1) * gv.double()[:, None] * y.double()
    G64 = ac.mT @ ybar / tr.sqrt()[:, None, None]
    M = reference.covariance_grad(G64.clone(), S, tr, P_T, N, lambda G: Sbar.double())
    acbar = (ybar - ybar.mean(1, keepdim=True)) @ P_T / tr.sqrt()[:, None, None]
    # the reference's fp32 stages on the same inputs (its Ybar' subtracts y's column means: same G and dA
    # in exact arithmetic, as Ac^T 1 = 0)
    ac32, f = a - mean.float()[:, None], lambda t: t.float()
    acbar32, G32 = reference.apply_bwd(reference.output_grad(gy, gv, y, 1), ac32, f(P_T), f(tr))
    assert_matches_oracle("G", got["G"], G64, ref=G32)
    M32 = reference.covariance_grad(G32, f(S), f(tr), f(P_T), N, lambda G: Sbar.clone())
    assert_matches_oracle("dA", gx, acbar + ac @ M, ref=reference.covariance_bwd(acbar32, ac32, M32))


def _torch_ops(fn):
    """The aten ops fn runs outside Triton's own code (the interpreter's bookkeeping is not counted)."""
    import traceback

    import triton
    from torch.utils._python_dispatch import TorchDispatchMode

    triton_dir = os.path.dirname(triton.__file__)

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not any(f.filename.startswith(triton_dir) for f in traceback.extract_stack()):
                self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        fn()
    return rec.ops


# what iternorm may run besides kernels: allocation and views (no kernel launch, no arithmetic)
NO_COMPUTE_OPS = {"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.view", "aten._unsafe_view",
                  "aten.transpose", "aten.t", "aten.select", "aten.slice", "aten.as_strided", "aten.expand",
                  "aten.alias", "aten.detach"}


@pytest.mark.parametrize("ns_path", ["rows", "tiles"])
def test_iternorm_runs_only_kernels(ns_path, monkeypatch):
    """iternorm_fwd and iternorm_bwd at T = 4 launch only kernels: the variances and the backward's C x C
    chain rule (trace, covariance) no longer run as torch ops between them."""
    monkeypatch.setattr(newton_schulz, "ROWS_MAX_C", 10**9 if ns_path == "rows" else 0)
    x = torch.randn(2, 40, 70, device=DEV)
    saved = bt.iternorm_fwd(x, 4, 0)
    gy, gv = torch.randn_like(saved.y), torch.randn_like(saved.v)
    assert _torch_ops(lambda: bt.iternorm_fwd(x, 4, 0)) <= NO_COMPUTE_OPS
    assert _torch_ops(lambda: bt.iternorm_bwd(gy, gv, saved.y, x, *saved[1:6], 4, 0)) <= NO_COMPUTE_OPS


@contextlib.contextmanager
def _recorded_launches():
    """Kernel launches recorded, not run (the interpreter's run patched): yields a list of (kernel name,
    bound arguments by parameter name, grid), autotuned kernels included (their single config)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = []

    def run(fn, *args, grid, warmup, **kwargs):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        launches.append((fn.__name__, {**dict(zip(fn.arg_names, args)), **kwargs}, grid))

    with mock.patch.object(InterpretedFunction, "run", run):
        yield launches


@pytest.mark.skipif(HAS_CUDA, reason="records the interpreter's launches")
def test_headline_launches_and_costs():
    """The headline case, intl_loss's 2 views of 256 x 8192, axis=0, T = 4, on the H200's grids (launches
    recorded, not run): the launch sequence (no torch op between kernels: test_iternorm_runs_only_kernels),
    the split apply backward filling one wave of the 132 SMs (2 programs each), and COSTS for every apply
    and covariance kernel, whose FLOPs match the products' counts."""
    B, C, N = 2, 256, 8192
    x = torch.randn(B, C, N, device=DEV)
    costs = {**apply.COSTS, **covariance.COSTS}
    with _common.gpu_block_sizes(), _common.assume_gpu(132), _recorded_launches() as launches:
        saved = bt.iternorm_fwd(x, 4, 0)
        n_fwd = len(launches)
        bt.iternorm_bwd(torch.randn_like(saved.y), torch.randn_like(saved.v), saved.y, x, *saved[1:6], 4, 0)
    names = [name for name, _, _ in launches]
    mine = [n for n in names if n in costs]
    assert mine[:4] == ["_cov_partial_kernel", "_cov_reduce_kernel", "_apply_fwd_kernel",
                        "_apply_fwd_var_kernel"] and len([n for n in names[:n_fwd] if n in costs]) == 4, names
    assert mine[4:] == ["_apply_bwd_w_partial_kernel", "_apply_bwd_w_reduce_kernel", "_apply_bwd_x_kernel"], names
    assert names[n_fwd:n_fwd + 2] == mine[4:6] and names[-1] == "_apply_bwd_x_kernel", names
    work = {}
    for name, args, grid in launches:
        if name in costs:
            w = costs[name](args, grid)
            assert w.flops > 0 and w.bytes > 0, (name, w)
            work[name] = (w, grid)
    (w_part, grid), (w_x, _) = work["_apply_bwd_w_partial_kernel"], work["_apply_bwd_x_kernel"]
    assert 0.9 * 2 * 132 <= grid[0] * grid[1] * grid[2] <= 2 * 132, grid  # one wave (was 4 x 4 x 2 = 32 programs)
    product = 2.0 * B * N * C * C
    assert product <= w_part.flops < 1.1 * product and 2 * product <= w_x.flops < 2.2 * product
    assert 0.5 * product <= work["_cov_partial_kernel"][0].flops < 0.7 * product  # the triangle
    assert product <= work["_apply_fwd_kernel"][0].flops < 1.1 * product
    x_bytes = 4.0 * B * N * C
    assert x_bytes <= work["_apply_fwd_kernel"][0].bytes < 3 * x_bytes  # A read once (L2), y written


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
        with _runs_triton("iternorm_fwd", "iternorm_bwd") if name == "triton" else contextlib.nullcontext():
            y = fn(xb)
            y.backward(gy.to(dtype))
        res[name] = (y.detach(), xb.grad)
    for i, what in enumerate(("y", "dx")):
        assert_matches_oracle(what, res["triton"][i], (y64, x64.grad)[i], ref=res["eager"][i])


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
        with _runs_triton("iternorm_fwd", "iternorm_bwd", "intl_head_fwd", "intl_head_bwd") if name == "triton" \
                else contextlib.nullcontext():
            loss = fn(vs)
            loss.backward()
        res[name] = (loss.detach().float(), torch.stack([v.grad for v in vs]))
    g64 = torch.stack([v.grad for v in v64])
    assert_matches_oracle("loss", res["triton"][0], loss64, ref=res["eager"][0], dtype=dtype)
    assert_matches_oracle("dviews", res["triton"][1], g64, ref=res["eager"][1])


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
        with _runs_triton("iternorm_fwd", "iternorm_bwd") if backend == "triton" else contextlib.nullcontext():
            y = intl_ops.iternorm(xb, 4, 1, backend=backend)
            y.backward(gy.float())
        res[backend] = (y.detach(), xb.grad)
    for i, (what, oracle) in enumerate((("y", y64), ("dx", x64.grad))):
        if mode in ("tf32", "torch-tf32"):  # tf32 products (10-bit mantissa): no torch dtype, so no FLOOR entry
            assert rel_err(res["triton"][i], oracle) < 1e-2, what
        else:
            assert_matches_oracle(what, res["triton"][i], oracle, ref=res["reference"][i])


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
