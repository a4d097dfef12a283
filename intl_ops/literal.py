"""The INTL reference code as users run it today: eager PyTorch, autograd through every Newton step.

This follows the public implementation literally (matrix_power + baddbmm, autograd keeps every
temporary) with the exact definitions of docs/math.md (N - 1 normalisation, no eps). It is deliberately
independent of `intl_ops.reference`: the tests use it as the oracle (in float64) and the benchmarks
as the `eager` baseline. Not used by the library's own code paths.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def iternorm(x: Tensor, iters: int = 4, axis: int = 0) -> Tensor:
    xt = x.t() if axis == 1 else x  # (C variables, N observations), as the reference lays it out
    C, N = xt.shape
    mean = xt.mean(-1, keepdim=True)
    xc = xt - mean
    P0 = torch.eye(C, dtype=x.dtype, device=x.device).unsqueeze(0)
    sigma = torch.baddbmm(torch.zeros_like(P0), xc.unsqueeze(0), xc.t().unsqueeze(0), beta=0.0, alpha=1.0 / (N - 1))
    r_tr = (sigma * P0).sum((1, 2), keepdim=True).reciprocal()
    sigma_n = sigma * r_tr
    P = P0
    for _ in range(iters):
        P = torch.baddbmm(P, torch.matrix_power(P, 3), sigma_n, beta=1.5, alpha=-0.5)
    wm = P * r_tr.sqrt()
    y = wm.matmul(xc.unsqueeze(0)).squeeze(0)  # (C, N)
    return y.t() if axis == 1 else y


def trace_loss(y: Tensor, axis: int = 0) -> Tensor:
    v = y.var(dim=1 if axis == 0 else 0, unbiased=True)
    return ((v - 1.0) ** 2).sum()


def nmse(a: Tensor, b: Tensor) -> Tensor:
    return 2.0 - 2.0 * (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).mean()


def default_beta(n_vars: int) -> float:
    return 0.01 * (math.log2(n_vars) - 3)


def intl_loss(views: Sequence[Tensor], iters: int = 4, axis: int = 0, beta: float | None = None,
              target: Tensor | None = None) -> Tensor:
    m, d = views[0].shape
    beta = default_beta(m if axis == 0 else d) if beta is None else beta
    ys = [iternorm(v, iters, axis) for v in views]
    if target is not None:
        tk = iternorm(target.detach(), iters, axis)
        terms = [nmse(y, tk) + beta * trace_loss(y, axis) for y in ys]
        return sum(terms) / len(ys)
    tl0 = trace_loss(ys[0], axis)
    terms = [nmse(y, ys[0]) + beta * (trace_loss(y, axis) + tl0) for y in ys[1:]]
    return sum(terms) / (len(ys) - 1)
