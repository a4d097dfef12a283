"""The fused INTL loss head, torch.ops.intl.intl_head (kernels/loss_head.py, docs/math.md §4.2), against
float64 oracles with tests/_oracle.py's rule (error <= 2x the reference backend's + the dtype's floor).

The op's oracle is plain float64 torch on the same inputs, differentiated by autograd: intl_ops.literal's
nmse and the loss's structure as literal.intl_loss writes it, with TL_i = sum_j (v_ij - 1)^2 on the
variances v taken as an input (so dL/dv is checked on its own). End to end, intl_ops.intl_loss is checked
against literal.intl_loss on float64 views. Every triton check asserts that backend_triton's head functions
ran (not the reference in their place); the *_detects_wrong_output tests feed the checks wrong outputs.
Without a GPU the kernels run under the Triton interpreter (tests/conftest.py).
"""
import contextlib
from unittest import mock

import pytest
import torch

import intl_ops
from intl_ops import backends, literal, reference
from intl_ops import backend_triton as bt
from intl_ops.kernels import _common
from _oracle import assert_matches_oracle, perturbed, runs_backend

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(bt.unavailable_reason(torch.device(DEV)) is not None,
                                reason=str(bt.unavailable_reason(torch.device(DEV))))
HEAD = ("intl_head_fwd", "intl_head_bwd")


def _runs_triton(*fns):
    """Asserts that each of backend_triton's functions `fns` ran inside the block (not the reference in its place)."""
    return runs_backend(bt, *fns)


def head_oracle(y, v, target, beta, grad=1.0):
    """float64 (loss, align, trace, dL/dy, dL/dv) of the head, by autograd through literal.nmse."""
    y64 = y.detach().double().requires_grad_(True)
    v64 = v.detach().double().requires_grad_(True)
    tl = [((vi - 1.0) ** 2).sum() for vi in v64]
    if target is not None:
        t64 = target.detach().double()
        nm = [literal.nmse(yi, t64) for yi in y64]
        tr = tl
    else:
        nm = [literal.nmse(yi, y64[0]) for yi in y64[1:]]
        tr = [t + tl[0] for t in tl[1:]]
    align, trace = sum(nm) / len(nm), sum(tr) / len(tr)
    loss = sum(n + beta * t for n, t in zip(nm, tr)) / len(nm)
    dy, dv = torch.autograd.grad(grad * loss, (y64, v64))
    return loss.detach(), align.detach(), trace.detach(), dy, dv


def _head_run(backend, y, v, target, beta, grad=1.0):
    """(loss, align, trace, dy, dv) of the op on `backend`, through autograd."""
    yb, vb = y.detach().clone().requires_grad_(True), v.detach().clone().requires_grad_(True)
    with _runs_triton(*HEAD) if backend == "triton" else contextlib.nullcontext():
        loss, align, trace = torch.ops.intl.intl_head(yb, vb, target, beta, backend)
        (grad * loss).backward()
    assert not align.requires_grad and not trace.requires_grad
    return loss.detach(), align, trace, yb.grad, vb.grad


def _check_head(y, v, target, beta=0.3, grad=1.0):
    got = _head_run("triton", y, v, target, beta, grad)
    ref = _head_run("reference", y, v, target, beta, grad)
    oracle = head_oracle(y, v, target, beta, grad)
    ct = torch.float32
    assert got[0].dtype == ct and got[0].dim() == 0 and got[3].dtype == y.dtype and got[4].dtype == v.dtype
    for name, g, r, o in zip(("loss", "align", "trace", "dy", "dv"), got, ref, oracle, strict=True):
        assert_matches_oracle(name, g, o, ref=r, dtype=y.dtype)
    return got


def _inputs(K, m, d, C, dtype, target_dtype=None):
    y = torch.randn(K, m, d, device=DEV).to(dtype)
    y[1:] += 0.5 * y[:1]  # correlated views: cos away from 0
    v = torch.rand(K, C, device=DEV) * 1.5 + 0.2
    target = None if target_dtype is None else (y[0].float() + torch.randn(m, d, device=DEV)).to(target_dtype)
    return y, v, target


CASES = [(K, dt, None) for K in (2, 3) for dt in (torch.float32, torch.float16, torch.bfloat16)] + \
        [(K, dt, dt) for K in (1, 3) for dt in (torch.float32, torch.float16)] + \
        [(2, torch.float16, torch.float32), (3, torch.bfloat16, torch.float32), (2, torch.float32, torch.float16)]


@pytest.mark.parametrize("K,dtype,target_dtype", CASES,
                         ids=[f"K{k}-{str(d)[6:]}-target_{str(t)[6:] if t else 'none'}" for k, d, t in CASES])
def test_head_matches_fp64(K, dtype, target_dtype):
    """37 x 90 views (not multiples of 16), C = 37; K = 3 without a target has view 0 in two pairs."""
    _check_head(*_inputs(K, 37, 90, 37, dtype, target_dtype), grad=1.7)


@pytest.mark.parametrize("sms", [None, 132], ids=["gpu_blocks", "gpu_blocks-132sms"])
@pytest.mark.parametrize("target", [False, True], ids=["no_target", "target"])
def test_head_gpu_block_sizes(sms, target):
    """The GPU's grid under the interpreter: several row blocks (1 row per program when sized for 132 SMs,
    so 37 partial sums per pair), d = 1100 over two 1024-column steps, C = 1100 over two."""
    with _common.gpu_block_sizes(), _common.assume_gpu(sms) if sms else contextlib.nullcontext():
        _check_head(*_inputs(3, 37, 1100, 1100, torch.float32, torch.float32 if target else None))


def test_zero_rows_clamp_the_norm():
    """A zero row of a pair view and of view 0 (the reference of both pairs): the norm is clamped at 1e-12
    and counts as a constant (fp32: the gradient of such a row is ~1e12, beyond fp16's range)."""
    y, v, _ = _inputs(3, 37, 90, 37, torch.float32)
    y[1, 5] = 0
    y[0, 7] = 0
    got = _check_head(y, v, None)
    assert got[3][1, 5].abs().max() > 1e6 and got[3][0, 7].abs().max() > 1e6  # the clamp, not a zero gradient


def test_strided_views_and_target():
    """y through strides (a transposed copy) and a non-contiguous target."""
    y, v, target = _inputs(3, 37, 90, 37, torch.float32, torch.float32)
    y_t = y.mT.contiguous().mT
    t_t = target.mT.contiguous().mT
    assert not y_t.is_contiguous() and not t_t.is_contiguous()
    _check_head(y_t, v, t_t)
    _check_head(y_t, v, None)


@pytest.mark.parametrize("gpu_blocks", [False, True], ids=["interp_blocks", "gpu_blocks"])
def test_backward_is_deterministic(gpu_blocks):
    """Two backward runs give the same bits (view 0's gradient sums its pairs in a fixed order)."""
    y, v, _ = _inputs(3, 37, 90, 37, torch.float32)
    with _common.gpu_block_sizes() if gpu_blocks else contextlib.nullcontext():
        runs = [_head_run("triton", y, v, None, 0.3) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
@pytest.mark.parametrize("K,momentum", [(2, False), (3, False), (2, True)], ids=["K2", "K3", "K2-intl_m"])
def test_intl_loss_matches_literal(axis, K, momentum):
    """intl_ops.intl_loss end to end (iternorm + the head) against literal.intl_loss in float64: the loss,
    the views' gradients and return_parts, on the triton and reference backends."""
    views = [torch.randn(37, 50, device=DEV) + i for i in range(K)]
    target = torch.randn(37, 50, device=DEV) if momentum else None
    outs = {}
    for backend in ("triton", "reference"):
        vs = [t.clone().requires_grad_(True) for t in views]
        with _runs_triton("iternorm_fwd", "iternorm_bwd", *HEAD) if backend == "triton" else contextlib.nullcontext():
            loss, parts = intl_ops.intl_loss(vs, 4, axis, target=target, backend=backend, return_parts=True)
            loss.backward()
        assert loss.dim() == 0 and loss.dtype == torch.float32
        outs[backend] = (loss.detach(), torch.stack([t.grad for t in vs]), parts["align"], parts["trace"])
    v64 = [t.double().requires_grad_(True) for t in views]
    t64 = None if target is None else target.double()
    loss64 = literal.intl_loss(v64, 4, axis, target=t64)
    loss64.backward()
    ys = [literal.iternorm(t.detach(), 4, axis) for t in v64]
    tls = [literal.trace_loss(t, axis) for t in ys]
    if t64 is None:
        align64 = sum(literal.nmse(t, ys[0]) for t in ys[1:]) / (K - 1)
        trace64 = sum(t + tls[0] for t in tls[1:]) / (K - 1)
    else:
        tk = literal.iternorm(t64, 4, axis)
        align64, trace64 = sum(literal.nmse(t, tk) for t in ys) / K, sum(tls) / K
    oracle = (loss64.detach(), torch.stack([t.grad for t in v64]), align64, trace64)
    for name, g, r, o in zip(("loss", "dviews", "align", "trace"), outs["triton"], outs["reference"], oracle,
                             strict=True):
        assert_matches_oracle(name, g, o, ref=r, dtype=torch.float32)


def test_intl_loss_fp16_views_fp32_target():
    """INTL-M with fp16 views and an fp32 EMA target: the head reads both dtypes (no reference fallback)."""
    views = [torch.randn(37, 50, device=DEV).half() for _ in range(2)]
    target = torch.randn(37, 50, device=DEV)
    outs = {}
    for backend in ("triton", "reference"):
        vs = [t.clone().requires_grad_(True) for t in views]
        with _runs_triton(*HEAD) if backend == "triton" else contextlib.nullcontext():
            loss = intl_ops.intl_loss(vs, 4, 0, target=target, backend=backend)
            loss.backward()
        outs[backend] = (loss.detach(), torch.stack([t.grad for t in vs]))
    v64 = [t.double().requires_grad_(True) for t in views]
    loss64 = literal.intl_loss(v64, 4, 0, target=target.double())
    loss64.backward()
    for name, g, r, o in zip(("loss", "dviews"), outs["triton"], outs["reference"],
                             (loss64, torch.stack([t.grad for t in v64])), strict=True):
        assert_matches_oracle(name, g, o, ref=r, dtype=torch.float16)


def test_float64_runs_the_reference():
    """fp64 is declined by the triton backend (as for every op) and runs the reference's bits."""
    y, v, target = _inputs(3, 12, 17, 12, torch.float64, torch.float64)
    v = v.double()
    assert backends.supports("triton", "intl_head_fwd", y.shape, torch.float64, torch.device(DEV)) is not None
    assert backends.select("triton", "intl_head_bwd", y.shape, torch.float64, torch.device(DEV)) == "reference"
    assert backends.select("triton", "intl_head_fwd", y.shape, torch.float32, torch.device(DEV)) == "triton"
    for t in (None, target):
        got = _head_run("reference", y, v, t, 0.3)
        with mock.patch.object(bt, "intl_head_fwd", side_effect=AssertionError("ran")), \
                mock.patch.object(bt, "intl_head_bwd", side_effect=AssertionError("ran")):
            tri = torch.ops.intl.intl_head(y, v, t, 0.3, "triton")
        assert all(torch.equal(a, b) for a, b in zip(tri, got[:3]))
        assert got[0].dtype == torch.float64


def test_backend_without_the_head_falls_back_to_the_reference(monkeypatch):
    """A backend that does not define the head functions (tests/toy_backend.py, like the cuda backend) runs
    them on the reference."""
    from tests import toy_backend

    monkeypatch.setattr(backends, "REGISTRY", {"toy": backends.Entry("tests.toy_backend"), **backends.REGISTRY})
    backends._load.cache_clear()
    try:
        assert backends.select("toy", "intl_head_fwd", (2, 5, 6), torch.float32, torch.device("cpu")) == "reference"
        views = [torch.randn(9, 12, dtype=torch.float64) for _ in range(2)]
        before = toy_backend.calls["iternorm_fwd"]
        got = intl_ops.intl_loss(views, 3, 1, backend="toy")
        assert toy_backend.calls["iternorm_fwd"] == before + 1
        assert torch.equal(got, intl_ops.intl_loss(views, 3, 1, backend="reference"))
    finally:
        backends._load.cache_clear()


def test_bad_inputs_are_named():
    y, v, t = _inputs(2, 5, 6, 5, torch.float32, torch.float32)
    for args, match in (((y[0], v, None), "y must be"), ((y, v[:1], None), "v must be"),
                        ((y[:1], v[:1], None), "K >= 2"), ((y, v, t[:, :3]), "target must be")):
        with pytest.raises(ValueError, match=match):
            torch.ops.intl.intl_head(*args, 0.1, "triton")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_opcheck(backend):
    y, v, t = _inputs(3, 11, 19, 11, torch.float32, torch.float16)
    y.requires_grad_(True)
    v.requires_grad_(True)
    for target in (None, t):
        torch.library.opcheck(torch.ops.intl.intl_head.default, (y, v, target, 0.25, backend))
        torch.library.opcheck(torch.ops.intl.intl_head_bwd.default,
                              (torch.tensor(1.3, device=DEV), y.detach(), v.detach(), target, 0.25, backend))


def test_compile_fullgraph_intl_m():
    """torch.compile(fullgraph=True) of INTL-M (test_triton covers plain INTL) with the triton head, against
    float64 with the eager reference backend's error."""
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, t: intl_ops.intl_loss([a, b], 3, 0, target=t, backend="triton"), fullgraph=True,
                       backend="aot_eager" if DEV == "cpu" else "inductor")
    a, b, t = (torch.randn(21, 34, device=DEV) for _ in range(3))
    a.requires_grad_(True)
    b.requires_grad_(True)
    with _runs_triton(*HEAD):
        loss = fn(a, b, t)
        grads = torch.autograd.grad(loss, (a, b))
    ar, br = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
    loss_ref = intl_ops.intl_loss([ar, br], 3, 0, target=t, backend="reference")
    grads_ref = torch.autograd.grad(loss_ref, (ar, br))
    a64, b64 = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    loss64 = literal.intl_loss([a64, b64], 3, 0, target=t.double())
    grads64 = torch.autograd.grad(loss64, (a64, b64))
    assert_matches_oracle("loss", loss, loss64, ref=loss_ref)
    for name, g, r, o in zip(("da", "db"), grads, grads_ref, grads64, strict=True):
        assert_matches_oracle(name, g, o, ref=r)


@pytest.mark.skipif(torch.cuda.is_available(), reason="records the interpreter's launches")
def test_launches_and_no_torch_compute():
    """The head runs 2 kernels forward and 1 backward, and no torch op besides allocation and views."""
    from triton.runtime.interpreter import InterpretedFunction
    from torch.utils._python_dispatch import TorchDispatchMode

    allowed = {"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.select", "aten.view", "aten.alias",
               "aten.as_strided"}
    y, v, _ = _inputs(3, 37, 90, 37, torch.float32)
    g = torch.tensor(1.0)
    names, ops = [], set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    def run(fn, *args, grid, warmup, **kwargs):
        names.append(fn.__name__)

    with mock.patch.object(InterpretedFunction, "run", run), Record():
        bt.intl_head_fwd(y, v, None, 0.3)
        n_fwd = len(names)
        bt.intl_head_bwd(g, y, v, None, 0.3)
    assert names[:n_fwd] == ["_head_cos_kernel", "_head_finish_kernel"] and names[n_fwd:] == ["_head_bwd_kernel"]
    assert ops <= allowed, ops - allowed


# ------------------------------------------------------------------ the checks can fail
WRONG = [("loss", "intl_head_fwd", 0), ("align", "intl_head_fwd", 1), ("trace", "intl_head_fwd", 2),
         ("dy", "intl_head_bwd", 0), ("dv", "intl_head_bwd", 1)]


@pytest.mark.parametrize("name,fn,index", WRONG, ids=[w[0] for w in WRONG])
def test_check_detects_wrong_output(name, fn, index, monkeypatch):
    """_check_head fails, naming the output, when one element of one output of backend_triton's head is off
    (the reference stands in for the kernels: it passes unperturbed)."""
    args = _inputs(3, 11, 19, 11, torch.float32)
    for f in HEAD:
        monkeypatch.setattr(bt, f, getattr(reference, f))
    _check_head(*args)
    original = getattr(reference, fn)

    def wrong(*a):
        out = list(original(*a))
        out[index] = perturbed(out[index]).reshape(out[index].shape)
        return tuple(out)

    monkeypatch.setattr(bt, fn, wrong)
    with pytest.raises(AssertionError, match=f"^{name}: "):
        _check_head(*args)


def test_check_detects_the_reference_running_instead(monkeypatch):
    monkeypatch.setattr(bt, "supports", lambda *args: "declined for this test")
    with pytest.raises(AssertionError, match="intl_head_fwd never ran"):
        _check_head(*_inputs(2, 11, 19, 11, torch.float32))
