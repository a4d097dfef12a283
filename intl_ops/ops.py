"""The `intl` torch custom ops: one schema per op, the backend chosen by a string argument.

Forward and backward are separate ops so that torch.compile and AOT autograd see opaque calls
(no graph breaks, no tracing into Triton/CUDA), with fake implementations for shape propagation.
Each call runs the function of the backend that supports it (intl_ops.backends.select: the named
backend, else the reference). The backward ops are first-order only (no double backward).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from .reference import as_observations, compute_dtype, saved_shapes

_Saved = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _no_autocast(t: Tensor):
    """The ops compute in fp32 (fp64) whatever autocast region they are called from."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _impl(backend: str, op: str, x: Tensor, axis: int | None = None):
    """The function that runs `op` on input x (*, m, d); the backends see A's (*, N, C) shape
    (axis None: the (*, m, d) shape itself, for nmse)."""
    shape = x.shape if axis is None else as_observations(x, axis).shape
    return backends.impl(backend, op, shape, x.dtype, x.device)


# ---------------------------------------------------------------- iternorm
@torch.library.custom_op("intl::iternorm_fwd", mutates_args=())
def iternorm_fwd(x: Tensor, iters: int, axis: int, backend: str) -> _Saved:
    """IterNorm of x (*, m, d): (y, mean, S, tr, Ps, powers, v), docs/math.md §8."""
    with _no_autocast(x):
        return tuple(_impl(backend, "iternorm_fwd", x, axis)(x, iters, axis))


@iternorm_fwd.register_fake
def _(x, iters, axis, backend):
    C = as_observations(x, axis).shape[-1]
    ct = compute_dtype(x.dtype)
    saved = [x.new_empty(shape, dtype=ct) for shape in saved_shapes(x.shape[:-2], C, iters).values()]
    return (torch.empty_like(x, memory_format=torch.contiguous_format), *saved)


@torch.library.custom_op("intl::iternorm_bwd", mutates_args=())
def iternorm_bwd(grad_y: Tensor, grad_v: Tensor, y: Tensor, x: Tensor, mean: Tensor, S: Tensor, tr: Tensor,
                 Ps: Tensor, powers: Tensor, iters: int, axis: int, backend: str) -> Tensor:
    with _no_autocast(x):
        return _impl(backend, "iternorm_bwd", x, axis)(grad_y, grad_v, y, x, mean, S, tr, Ps, powers, iters, axis)


@iternorm_bwd.register_fake
def _(grad_y, grad_v, y, x, mean, S, tr, Ps, powers, iters, axis, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _iternorm_setup(ctx, inputs, output):
    x, iters, axis, backend = inputs
    y, mean, S, tr, Ps, powers, v = output
    ctx.save_for_backward(y, x, mean, S, tr, Ps, powers, v)
    ctx.cfg = (iters, axis, backend)
    ctx.mark_non_differentiable(mean, S, tr, Ps, powers)
    ctx.set_materialize_grads(False)  # no zero-filled C x C gradients for the saved outputs


def _iternorm_backward(ctx, gy, gmean, gS, gtr, gPs, gpowers, gv):
    y, x, mean, S, tr, Ps, powers, v = ctx.saved_tensors
    iters, axis, backend = ctx.cfg
    gy = torch.zeros_like(y) if gy is None else gy
    gv = torch.zeros_like(v) if gv is None else gv
    gx = torch.ops.intl.iternorm_bwd(gy, gv, y, x, mean, S, tr, Ps, powers, iters, axis, backend)
    return gx, None, None, None


iternorm_fwd.register_autograd(_iternorm_backward, setup_context=_iternorm_setup)


# ---------------------------------------------------------------- trace loss
@torch.library.custom_op("intl::trace_loss", mutates_args=())
def trace_loss(y: Tensor, axis: int, backend: str) -> Tensor:
    """sum_j (var_j(y) - 1)^2 over the variables of `axis`, shape y.shape[:-2], fp32 (fp64 for fp64)."""
    with _no_autocast(y):
        return _impl(backend, "trace_loss_fwd", y, axis)(y, axis)


@trace_loss.register_fake
def _(y, axis, backend):
    return y.new_empty(y.shape[:-2], dtype=compute_dtype(y.dtype))


@torch.library.custom_op("intl::trace_loss_bwd", mutates_args=())
def trace_loss_bwd(grad: Tensor, y: Tensor, axis: int, backend: str) -> Tensor:
    with _no_autocast(y):
        return _impl(backend, "trace_loss_bwd", y, axis)(grad, y, axis)


@trace_loss_bwd.register_fake
def _(grad, y, axis, backend):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _trace_loss_setup(ctx, inputs, output):
    y, axis, backend = inputs
    ctx.save_for_backward(y)
    ctx.cfg = (axis, backend)


def _trace_loss_backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return torch.ops.intl.trace_loss_bwd(grad, y, *ctx.cfg), None, None


trace_loss.register_autograd(_trace_loss_backward, setup_context=_trace_loss_setup)


# ---------------------------------------------------------------- nmse
def _one_dtype(backend: str, a: Tensor, b: Tensor) -> str:
    """Backends see a's dtype only: a target of another dtype (e.g. an fp32 EMA target of bf16 views)
    runs the reference, which computes both in a's compute dtype."""
    return backend if a.dtype == b.dtype else backends.FALLBACK


@torch.library.custom_op("intl::nmse", mutates_args=())
def nmse(a: Tensor, b: Tensor, backend: str) -> Tensor:
    """2 - 2 * mean over rows of cos(a_i, b_i); a and b (*, m, d) of one shape; result (*,)."""
    with _no_autocast(a):
        return _impl(_one_dtype(backend, a, b), "nmse_fwd", a)(a, b)


@nmse.register_fake
def _(a, b, backend):
    return a.new_empty(a.shape[:-2], dtype=compute_dtype(a.dtype))


@torch.library.custom_op("intl::nmse_bwd", mutates_args=())
def nmse_bwd(grad: Tensor, a: Tensor, b: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    with _no_autocast(a):
        ga, gb = _impl(_one_dtype(backend, a, b), "nmse_bwd", a)(grad, a, b)
    return ga.contiguous(), gb.contiguous()


@nmse_bwd.register_fake
def _(grad, a, b, backend):
    return (torch.empty_like(a, memory_format=torch.contiguous_format),
            torch.empty_like(b, memory_format=torch.contiguous_format))


def _nmse_setup(ctx, inputs, output):
    a, b, backend = inputs
    ctx.save_for_backward(a, b)
    ctx.backend = backend


def _nmse_backward(ctx, grad):
    a, b = ctx.saved_tensors
    ga, gb = torch.ops.intl.nmse_bwd(grad, a, b, ctx.backend)
    return ga, gb, None


nmse.register_autograd(_nmse_backward, setup_context=_nmse_setup)


# ---------------------------------------------------------------- INTL loss head
def _check_head(y: Tensor, v: Tensor, target: Optional[Tensor]) -> None:
    if y.dim() != 3:
        raise ValueError(f"intl_head: y must be the (K, m, d) whitened views, got shape {tuple(y.shape)}")
    if v.dim() != 2 or v.shape[0] != y.shape[0]:
        raise ValueError(f"intl_head: v must be (K, C) with K = {y.shape[0]}, got shape {tuple(v.shape)}")
    if target is None and y.shape[0] < 2:
        raise ValueError(f"intl_head: without a target it needs K >= 2 views, got {y.shape[0]}")
    if target is not None and target.shape != y.shape[1:]:
        raise ValueError(f"intl_head: target must be (m, d) = {tuple(y.shape[1:])}, got {tuple(target.shape)}")


@torch.library.custom_op("intl::intl_head", mutates_args=())
def intl_head(y: Tensor, v: Tensor, target: Optional[Tensor], beta: float,
              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, align, trace) of intl_loss from the whitened views y (K, m, d), their output variances v (K, C)
    (iternorm_fwd's 7th output) and the optional whitened target (m, d), docs/math.md §4.2: 0-dim, fp32
    (fp64 for fp64 y). align and trace are not differentiable; the target gets no gradient. The target
    may have another dtype than y (the compute dtype is y's)."""
    _check_head(y, v, target)
    with _no_autocast(y):
        return tuple(_impl(backend, "intl_head_fwd", y)(y, v, target, beta))


@intl_head.register_fake
def _(y, v, target, beta, backend):
    ct = compute_dtype(y.dtype)
    return y.new_empty((), dtype=ct), y.new_empty((), dtype=ct), y.new_empty((), dtype=ct)


@torch.library.custom_op("intl::intl_head_bwd", mutates_args=())
def intl_head_bwd(grad: Tensor, y: Tensor, v: Tensor, target: Optional[Tensor], beta: float,
                  backend: str) -> tuple[Tensor, Tensor]:
    """(dL/dy (K, m, d) in y's dtype, dL/dv (K, C) in v's dtype) for grad = dL/dloss (0-dim)."""
    _check_head(y, v, target)
    with _no_autocast(y):
        dy, dv = _impl(backend, "intl_head_bwd", y)(grad, y, v, target, beta)
    return dy.contiguous(), dv.contiguous()


@intl_head_bwd.register_fake
def _(grad, y, v, target, beta, backend):
    return (torch.empty_like(y, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _head_setup(ctx, inputs, output):
    y, v, target, beta, backend = inputs
    ctx.save_for_backward(y, v, target)
    ctx.cfg = (beta, backend)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for align and trace


def _head_backward(ctx, gloss, galign, gtrace):
    if gloss is None:
        return None, None, None, None, None
    y, v, target = ctx.saved_tensors
    dy, dv = torch.ops.intl.intl_head_bwd(gloss, y, v, target, *ctx.cfg)
    return dy, dv, None, None, None


intl_head.register_autograd(_head_backward, setup_context=_head_setup)


# ---------------------------------------------------------------- spectral transform
@torch.library.custom_op("intl::spectral_transform_fwd", mutates_args=())
def spectral_transform_fwd(x: Tensor, power: float, axis: int, eps: float,
                           backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, tr, evals, evecs) as in intl_ops.reference.SpectralSaved; x is (*, m, d)."""
    with _no_autocast(x):
        return tuple(_impl(backend, "spectral_transform_fwd", x, axis)(x, power, axis, eps))


@spectral_transform_fwd.register_fake
def _(x, power, axis, eps, backend):
    C = as_observations(x, axis).shape[-1]
    ct, batch = compute_dtype(x.dtype), x.shape[:-2]
    new = lambda *shape: x.new_empty((*batch, *shape), dtype=ct)  # noqa: E731
    return torch.empty_like(x, memory_format=torch.contiguous_format), new(C), new(), new(C), new(C, C)


@torch.library.custom_op("intl::spectral_transform_bwd", mutates_args=())
def spectral_transform_bwd(grad_y: Tensor, x: Tensor, mean: Tensor, tr: Tensor, evals: Tensor, evecs: Tensor,
                           power: float, axis: int, eps: float, backend: str) -> Tensor:
    with _no_autocast(x):
        return _impl(backend, "spectral_transform_bwd", x, axis)(grad_y, x, mean, tr, evals, evecs, power, axis, eps)


@spectral_transform_bwd.register_fake
def _(grad_y, x, mean, tr, evals, evecs, power, axis, eps, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _spectral_setup(ctx, inputs, output):
    x, power, axis, eps, backend = inputs
    _, mean, tr, evals, evecs = output
    ctx.save_for_backward(x, mean, tr, evals, evecs)
    ctx.cfg = (power, axis, eps, backend)
    ctx.mark_non_differentiable(mean, tr, evals, evecs)


def _spectral_backward(ctx, gy, gmean, gtr, gevals, gevecs):
    if gy is None:
        return None, None, None, None, None
    x, mean, tr, evals, evecs = ctx.saved_tensors
    return torch.ops.intl.spectral_transform_bwd(gy, x, mean, tr, evals, evecs, *ctx.cfg), None, None, None, None


spectral_transform_fwd.register_autograd(_spectral_backward, setup_context=_spectral_setup)
