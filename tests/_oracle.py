"""The one tolerance rule of the numerical tests, and the float64 oracles they share.

The rule. A result `out` is compared with a float64 `oracle` of the same shape by its error relative
to the oracle's largest value,

    rel_err(out, oracle) = max |out - oracle| / max |oracle|

and passes when

    rel_err(out, oracle) <= factor * rel_err(ref, oracle) + floor_scale * FLOOR[dtype]   (with ref=)
    rel_err(out, oracle) <= floor_scale * FLOOR[dtype]                                   (without ref=)

`ref` is the same quantity computed by the reference backend (or another independent implementation)
at the same input dtype: a backend may be at most `factor` (default 2) times as far from float64 as
the reference is, plus a floor of a few units of the dtype's rounding. Without a ref (a float64
result, or a low-precision one with nothing to compare), the floor alone is the bound. floor_scale
(default 1) is for a test whose math has a known error above rounding: it says why next to the call
(no test needs it today).

FLOOR (relative to max |oracle|):
    float32  2e-6   ~17 fp32 eps; fp32 results checked without a ref reach 1.1e-6 at the tested sizes
    float16  1e-3   2x fp16's unit roundoff (4.9e-4), the rounding of an fp16 output
    bfloat16 8e-3   2x bf16's unit roundoff (3.9e-3)
    float64  1e-12  ~4500 fp64 eps; two float64 implementations of the same math differ by <= 1.3e-14 here

It fails, with a message naming `name`, when:
  - out, ref or oracle holds a NaN or an infinity (an oracle that does is a broken test);
  - the shapes of out (and ref) differ from the oracle's (no broadcasting hides a wrong shape);
  - the ref's own error exceeds REF_CEIL[dtype]: the reference itself is wrong (or the test
    compared against the wrong thing) and factor * its error would let anything through;
  - the bound above is exceeded.
An all-zero oracle admits only an all-zero out (use torch.equal for such cases).

API (tests/test_cuda.py and the other test files use it; keep it stable):
    FLOOR, REF_CEIL                         dicts keyed by torch dtype
    rel_err(out, oracle) -> float
    assert_matches_oracle(name, out, oracle, *, ref=None, dtype=None, factor=2.0, floor_scale=1.0)
        -> float (out's rel_err); dtype defaults to ref's dtype (else out's): pass the INPUT dtype
           when the output is computed in fp32 from fp16/bf16 input (a loss, a saved tensor)
    perturbed(t, rel=None) -> a copy of t with its last element moved by rel * max |t| (default 1e-3,
        3e-2 for fp16/bf16): what the wrong-output meta-tests feed a check to show that it can fail
The float64 oracles, independent of intl_ops.reference (the literal code of intl_ops.literal, or
plain float64 torch, differentiated by autograd), for inputs with any leading batch dimensions:
    literal_iternorm(x, iters, axis) -> y
    iternorm_saved_oracle(x, iters, axis) -> IterNormSaved (y, mean, S, tr, Ps, powers, v)
    iternorm_grad_oracle(x, iters, axis, grad_y, grad_v=None) -> dL/dx of <grad_y, y> + <grad_v, v>
    trace_loss_oracle(y, axis, grad) -> (trace loss per view, dL/dy of <grad, trace loss>)
    nmse_oracle(a, b, grad) -> (nmse per view, dL/da, dL/db of <grad, nmse>)
"""
from __future__ import annotations

import contextlib
from unittest import mock

import torch
from torch import Tensor

from intl_ops import literal
from intl_ops.reference import IterNormSaved

FLOOR = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
# The largest error the ref itself may have for the rule to mean anything: at least 20x the largest the
# CPU suite shows (fp32 4.3e-5 at mean 1e3 x spread, fp16 6.1e-4, bf16 3.9e-3). Above it the ref is
# broken (a sabotaged backward shared by a compiled and an eager call is caught here) and
# factor * its error would let anything through.
REF_CEIL = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2e-1, torch.float64: 1e-9}


def rel_err(out: Tensor, oracle: Tensor) -> float:
    """max |out - oracle| / max |oracle| in float64 (0 for empty tensors)."""
    if oracle.numel() == 0:
        return 0.0
    oracle = oracle.detach().double()
    scale = oracle.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return ((out.detach().double() - oracle).abs().max() / scale).item()


def _finite(name: str, what: str, t: Tensor) -> None:
    bad = (~torch.isfinite(t.detach())).sum().item()
    assert bad == 0, f"{name}: {bad} of {t.numel()} values of the {what} are not finite"


def assert_matches_oracle(name: str, out: Tensor, oracle: Tensor, *, ref: Tensor | None = None,
                          dtype: torch.dtype | None = None, factor: float = 2.0, floor_scale: float = 1.0) -> float:
    """Assert the module docstring's rule for `out` against `oracle`; returns out's error."""
    dtype = dtype or (ref.dtype if ref is not None else out.dtype)
    assert dtype in FLOOR, f"{name}: no error floor for {dtype}"
    _finite(name, "oracle (the test is broken)", oracle)
    assert tuple(out.shape) == tuple(oracle.shape), f"{name}: shape {tuple(out.shape)}, oracle {tuple(oracle.shape)}"
    _finite(name, "output", out)
    err = rel_err(out, oracle)
    if ref is None:
        bound = floor_scale * FLOOR[dtype]
        assert err <= bound, f"{name}: error {err:.3g} vs float64 exceeds {bound:.3g} ({dtype})"
        return err
    assert tuple(ref.shape) == tuple(oracle.shape), \
        f"{name}: reference shape {tuple(ref.shape)}, oracle {tuple(oracle.shape)}"
    _finite(name, "reference", ref)
    err_ref = rel_err(ref, oracle)
    assert err_ref <= REF_CEIL[dtype], \
        (f"{name}: the reference's own error {err_ref:.3g} exceeds {REF_CEIL[dtype]:.3g} ({dtype}): "
         "it or the oracle is wrong")
    bound = factor * err_ref + floor_scale * FLOOR[dtype]
    assert err <= bound, f"{name}: error {err:.3g} vs reference {err_ref:.3g}: bound {bound:.3g} ({dtype})"
    return err


def perturbed(t: Tensor, rel: float | None = None) -> Tensor:
    """A copy of t whose last element is off by rel * max |t| (1 if t is 0): a kernel that got one
    element wrong. rel defaults to 1e-3 (3e-2 for fp16/bf16 t, well above their rounding)."""
    if rel is None:
        rel = 3e-2 if t.dtype in (torch.float16, torch.bfloat16) else 1e-3
    out = t.detach().clone(memory_format=torch.contiguous_format)
    flat = out.view(-1)
    top = flat.abs().max().item()
    flat[-1] += rel * (top if top > 0 else 1.0)
    return out


# ---------------------------------------------------------------- float64 oracles
def _obs(x: Tensor, axis: int) -> Tensor:
    """The (*, N observations, C variables) view: x^T for axis=0, x for axis=1."""
    return x.mT if axis == 0 else x


def literal_iternorm(x: Tensor, iters: int, axis: int) -> Tensor:
    """intl_ops.literal.iternorm in float64 on each (m, d) view of x (*, m, d); differentiable."""
    x64 = x.double()
    if x64.dim() == 2:
        return literal.iternorm(x64, iters, axis)
    flat = x64.reshape(-1, *x64.shape[-2:])
    return torch.stack([literal.iternorm(v, iters, axis) for v in flat]).reshape(x64.shape)


def _variances(y: Tensor, axis: int) -> Tensor:
    return _obs(y, axis).var(dim=-2, correction=1)


def iternorm_saved_oracle(x: Tensor, iters: int, axis: int) -> IterNormSaved:
    """Every saved tensor of iternorm_fwd (docs/math.md §8) in float64, by the textbook steps:
    P_0 = I, P_k = 1.5 P_{k-1} - 0.5 P_{k-1}^3 S; powers = (P_k^2, P_k^3) for k = 1..T-1."""
    a = _obs(x.detach().double(), axis)
    mean = a.mean(-2)
    ac = a - mean.unsqueeze(-2)
    sigma = ac.mT @ ac / (a.shape[-2] - 1)
    tr = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)
    pos = tr > 0
    safe_tr = torch.where(pos, tr, torch.ones_like(tr))
    S = torch.where(pos[..., None, None], sigma / safe_tr[..., None, None], torch.zeros_like(sigma))
    P = torch.eye(S.shape[-1], dtype=S.dtype).expand_as(S)
    Ps, powers = [], []
    for k in range(1, iters + 1):
        P3 = P @ P @ P
        if k >= 2:
            powers.append(torch.stack([P @ P, P3], dim=-3))
        P = 1.5 * P - 0.5 * P3 @ S
        Ps.append(P)
    C, batch = S.shape[-1], S.shape[:-2]
    Ps = torch.stack(Ps, dim=-3) if Ps else S.new_zeros(*batch, 0, C, C)
    powers = torch.stack(powers, dim=-4) if powers else S.new_zeros(*batch, 0, 2, C, C)
    W = P * torch.where(pos, safe_tr.rsqrt(), torch.zeros_like(tr))[..., None, None]
    yo = ac @ W
    return IterNormSaved(_obs(yo, axis), mean, S, tr, Ps, powers, yo.var(dim=-2, correction=1))


def iternorm_grad_oracle(x: Tensor, iters: int, axis: int, grad_y: Tensor, grad_v: Tensor | None = None) -> Tensor:
    """dL/dx in float64 for L = <grad_y, y> + <grad_v, v>, v the output variances: autograd through the
    literal code."""
    x64 = x.detach().double().requires_grad_(True)
    y = literal_iternorm(x64, iters, axis)
    loss = (grad_y.double() * y).sum()
    if grad_v is not None:
        loss = loss + (grad_v.double() * _variances(y, axis)).sum()
    (dx,) = torch.autograd.grad(loss, x64)
    return dx


def trace_loss_oracle(y: Tensor, axis: int, grad: Tensor) -> tuple[Tensor, Tensor]:
    """(TL per view (*,), dL/dy of L = <grad, TL>), intl_ops.literal.trace_loss in float64."""
    y64 = y.detach().double().requires_grad_(True)
    flat = y64.reshape(-1, *y64.shape[-2:])
    tl = torch.stack([literal.trace_loss(v, axis) for v in flat]).reshape(y64.shape[:-2])
    (dy,) = torch.autograd.grad((grad.double() * tl).sum(), y64)
    return tl.detach(), dy


def nmse_oracle(a: Tensor, b: Tensor, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(nmse per view (*,), dL/da, dL/db of L = <grad, nmse>), intl_ops.literal.nmse in float64;
    b may be an expanded view (its gradient is per element of the expanded shape)."""
    a64 = a.detach().double().requires_grad_(True)
    b64 = b.detach().double().contiguous().requires_grad_(True)
    fa, fb = a64.reshape(-1, *a64.shape[-2:]), b64.reshape(-1, *b64.shape[-2:])
    val = torch.stack([literal.nmse(u, w) for u, w in zip(fa, fb)]).reshape(a64.shape[:-2])
    da, db = torch.autograd.grad((grad.double() * val).sum(), (a64, b64))
    return val.detach(), da, db


@contextlib.contextmanager
def runs_backend(module, *fns: str):
    """Asserts that each of the backend module's functions `fns` ran inside the block: a backend that
    declined the call (and left it to the reference) cannot pass a check by comparing the reference
    with itself."""
    with contextlib.ExitStack() as stack:
        spies = {f: stack.enter_context(mock.patch.object(module, f, wraps=getattr(module, f))) for f in fns}
        yield
    for f, spy in spies.items():
        assert spy.call_count > 0, f"{module.__name__}.{f} never ran: the reference ran instead"
