"""The public functions: iternorm, trace_loss, intl_loss (docs/math.md §2-4)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from . import ops  # noqa: F401  (registers torch.ops.intl.*)
from ._checks import check_axis, check_finite, check_float_tensor, check_iters, check_matrix
from .backends import resolve
from .distributed import gather_samples, local_rows


def default_beta(n_vars: int) -> float:
    """The trade-off of docs/math.md §4, 0.01 * (log2(n_vars) - 3): n_vars = global batch (axis=0) or d (axis=1)."""
    return 0.01 * (math.log2(n_vars) - 3)


def iternorm(x: Tensor, iters: int = 4, axis: int = 0, *, backend: str = "auto", process_group=None) -> Tensor:
    """IterNorm whitening of x (m samples, d features), returned as (m, d) in x's dtype.

    axis=0 decorrelates the m samples (the m x m Gram, the reference default), axis=1 the d
    features (the d x d covariance). `iters` Newton-Schulz steps (T). With `process_group`, the
    statistics use the samples of every rank (each rank passes the same m) and each rank gets
    its own rows back, with gradients summed over ranks as in a single process.
    """
    iters, axis = check_iters(iters), check_axis(axis)
    check_matrix(x, "x", axis, count_obs=process_group is None or axis == 0)
    check_finite(x, "x")
    resolve(backend, x.device)  # a bad name or a backend that cannot run here fails now, naming it
    if process_group is not None:
        xg = gather_samples(x, process_group, reduce_grads=True)
        check_matrix(xg, "x (gathered over process_group)", axis)
        return local_rows(torch.ops.intl.iternorm_fwd(xg, iters, axis, backend)[0], process_group)
    return torch.ops.intl.iternorm_fwd(x, iters, axis, backend)[0]


def trace_loss(y: Tensor, axis: int = 0, *, backend: str = "auto") -> Tensor:
    """sum_j (v_j - 1)^2 with v_j the unbiased variance of variable j of y (m, d): a 0-dim fp32 tensor
    (fp64 for fp64 input). axis=0: the variables are the m rows; axis=1: the d columns."""
    axis = check_axis(axis)
    check_matrix(y, "y", axis)
    check_finite(y, "y")
    resolve(backend, y.device)
    return torch.ops.intl.trace_loss(y, axis, backend)


def _stack_views(views, name: str) -> Tensor:
    if isinstance(views, Tensor):
        if views.dim() != 3:
            raise ValueError(f"{name} as a tensor must be 3-D (K views, m, d), got shape {tuple(views.shape)}")
        return views
    if not isinstance(views, (list, tuple)):
        raise TypeError(f"{name} must be a sequence of (m, d) tensors or a (K, m, d) tensor, got {type(views).__name__}")
    if len(views) == 0:
        raise ValueError(f"{name} must not be empty")
    for i, v in enumerate(views):
        if not isinstance(v, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(v).__name__}")
        if v.shape != views[0].shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(v.shape)}, but {name}[0] has {tuple(views[0].shape)}: all views must have one shape")
        if v.device != views[0].device:
            raise ValueError(f"{name}[{i}] is on {v.device}, but {name}[0] is on {views[0].device}: all views must be on one device")
        if v.dtype != views[0].dtype:
            raise TypeError(f"{name}[{i}] has dtype {v.dtype}, but {name}[0] has {views[0].dtype}: all views must have one dtype")
    if views[0].dim() != 2:
        raise ValueError(f"{name}[0] must be 2-D (m samples, d features), got shape {tuple(views[0].shape)}")
    return torch.stack(list(views))


def intl_loss(views, iters: int = 4, axis: int = 0, beta: float | None = None, *, target: Tensor | None = None,
              backend: str = "auto", process_group=None, return_parts: bool = False):
    """The INTL objective (docs/math.md §4), a 0-dim fp32 tensor (fp64 for fp64 input).

    views: K >= 2 crops' embeddings, a sequence of (m, d) tensors (crop 0 first) or a (K, m, d)
    tensor: L = 1/(K-1) sum_{i>=1} [nmse(t_i, t_0) + beta (TL(t_i) + TL(t_0))], each crop whitened
    separately. With target= (crop 0 through an EMA encoder, (m, d)): INTL-M,
    L = mean_i [nmse(t_i, t_k) + beta TL(t_i)] over the online views, the target whitened without
    gradient. beta=None: docs/math.md §4's 0.01 (log2(n_vars) - 3) with the global batch (axis=0) or d.
    The trace loss is taken from the iternorm op's output variances: no extra pass over the outputs;
    the alignment and trace terms are one op, torch.ops.intl.intl_head (docs/math.md §4.2).
    return_parts=True returns (loss, {"align": mean nmse, "trace": mean trace-loss term, "beta": beta})
    with the parts detached, for logging.
    """
    iters, axis = check_iters(iters), check_axis(axis)
    x = _stack_views(views, "views")
    check_matrix(x, "views", axis, batched=True, count_obs=process_group is None or axis == 0)
    k = x.shape[0]
    if target is None and k < 2:
        raise ValueError(f"views must hold at least 2 crops (or pass target= for INTL-M), got {k}")
    if target is not None:
        check_float_tensor(target, "target")
        if target.shape != x.shape[1:]:
            raise ValueError(f"target has shape {tuple(target.shape)}, but each view has {tuple(x.shape[1:])}")
        if target.device != x.device:
            raise ValueError(f"target is on {target.device}, but the views are on {x.device}")
    if beta is not None and (isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta)):
        raise TypeError(f"beta must be a finite float or None, got {beta!r}")
    check_finite(x, "views")
    resolve(backend, x.device)

    if process_group is not None:
        x = gather_samples(x, process_group, reduce_grads=False)
        check_matrix(x, "views (gathered over process_group)", axis, batched=True)
        if target is not None:
            target = gather_samples(target.detach(), process_group, reduce_grads=False)
    m, d = x.shape[-2:]
    beta = default_beta(m if axis == 0 else d) if beta is None else float(beta)

    y, _, _, _, _, _, v = torch.ops.intl.iternorm_fwd(x, iters, axis, backend)
    yk = None
    if target is not None:
        with torch.no_grad():
            check_finite(target, "target")
            yk = torch.ops.intl.iternorm_fwd(target.detach(), iters, axis, backend)[0]
    # the alignment and trace terms in one op (docs/math.md §4.2): no torch glue between kernels
    loss, align, trace = torch.ops.intl.intl_head(y, v, yk, beta, backend)
    if return_parts:
        return loss, {"align": align.detach(), "trace": trace.detach(), "beta": beta}
    return loss
