"""Pure-PyTorch reference backend: the math of SPEC sections 3-5, forward and analytic backward.

Everything works on the (N observations x C variables) matrix A of SPEC section 2, taken as a
strided view of x (A = x for axis=1, A = x^T for axis=0), with optional leading batch dimensions
(a stack of views shares one call). Products are batched matmuls, so this runs on any device.

What the forward keeps for the backward (the `IterNormSaved` layout every backend returns):
    mean (*, C)          column means of A, compute dtype
    S    (*, C, C)       Sigma / tr
    tr   (*)             trace(Sigma)
    Ps   (*, T, C, C)    P_1 .. P_T
    Pp   (*, T-1, 2, C, C)  (P_k^2, P_k^3) for k = 1 .. T-1, the powers step k+1 used
    v    (*, C)          output variances (the trace loss's v), from y
Never autograd's per-product temporaries: 27 C^3 products at T=4 instead of the literal 36.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class IterNormSaved(NamedTuple):
    y: Tensor
    mean: Tensor
    S: Tensor
    tr: Tensor
    Ps: Tensor
    Pp: Tensor
    v: Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 compute in fp32; fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_observations(x: Tensor, axis: int) -> Tensor:
    """The (*, N, C) view A of a (*, m, d) input: columns are the variables being decorrelated."""
    return x if axis == 1 else x.mT


def _guarded_scales(tr: Tensor) -> tuple[Tensor, Tensor]:
    """1/tr and 1/sqrt(tr), defined as 0 where tr == 0 (constant input: output and gradient 0)."""
    pos = tr > 0
    safe = torch.where(pos, tr, torch.ones_like(tr))
    inv_tr = torch.where(pos, 1.0 / safe, torch.zeros_like(tr))
    return inv_tr, torch.where(pos, safe.rsqrt(), torch.zeros_like(tr))


def _gemm_(c: Tensor, a: Tensor, b: Tensor, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    """c = beta * c + alpha * (a @ b) in place, one BLAS call: no temporaries for the scaling or the sum."""
    if c.dim() == 2:
        return c.addmm_(a, b, beta=beta, alpha=alpha)
    if c.dim() == 3:
        return c.baddbmm_(a, b, beta=beta, alpha=alpha)
    return c.copy_(beta * c + alpha * (a @ b))


def _eye_like(S: Tensor) -> Tensor:
    return torch.eye(S.shape[-1], dtype=S.dtype, device=S.device).expand_as(S)


def output_variances(y: Tensor, axis: int) -> Tensor:
    """Per-variable unbiased variance of y (*, m, d) in fp32/fp64: shape (*, m) for axis=0, (*, d) for axis=1."""
    a = as_observations(y, axis).to(compute_dtype(y.dtype))
    return a.var(dim=-2, correction=1)


# ------------------------------------------------------------------ the stages (also used by other backends and bench/)
def newton_schulz_fwd(S: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """The T Newton-Schulz steps of SPEC section 3 on S (*, C, C): (Ps, Pp), Ps = P_1..P_T (*, T, C, C),
    Pp = (P_k^2, P_k^3) for k = 1..T-1 (*, T-1, 2, C, C). P_T = Ps[..., T-1, :, :] (I when T = 0)."""
    C, batch = S.shape[-1], S.shape[:-2]
    Ps = S.new_empty(*batch, iters, C, C)
    Pp = S.new_empty(*batch, max(iters - 1, 0), 2, C, C)
    if iters >= 1:  # P_1 = 1.5 I - 0.5 S in closed form
        P = torch.mul(S, -0.5, out=Ps[..., 0, :, :])
        P.diagonal(dim1=-2, dim2=-1).add_(1.5)
    for k in range(1, iters):  # every product is written straight into the saved slot
        P2 = torch.matmul(P, P, out=Pp[..., k - 1, 0, :, :])
        P3 = torch.matmul(P2, P, out=Pp[..., k - 1, 1, :, :])
        P = _gemm_(Ps[..., k, :, :].copy_(P), P3, S, beta=1.5, alpha=-0.5)
    return Ps, Pp


def newton_schulz_bwd(G: Tensor, S: Tensor, Ps: Tensor, Pp: Tensor, iters: int) -> Tensor:
    """Sbar = dL/dS through the T steps (SPEC section 5), given G = dL/dP_T; G is overwritten (it carries
    dL/dP_k down the steps)."""
    Sbar = torch.zeros_like(S)
    for k in range(iters, 0, -1):
        if k == 1:  # B = P_0 = I: only the S term remains, P_0 needs no gradient
            Sbar.add_(G, alpha=-0.5)
            break
        B = Ps[..., k - 2, :, :]
        B2 = Pp[..., k - 2, 0, :, :]
        B3 = Pp[..., k - 2, 1, :, :]
        _gemm_(Sbar, B3.mT, G, alpha=-0.5)
        H = G @ S.mT  # every iterate commutes with S: G S B^2 + B G S B + B^2 G S
        _gemm_(G, H, B2.mT, beta=1.5, alpha=-0.5)
        _gemm_(G, B2.mT, H, alpha=-0.5)
        _gemm_(G, B.mT @ H, B.mT, alpha=-0.5)
        del H
    return Sbar


def sigma_grad(Sbar: Tensor, S: Tensor, tr: Tensor, trbar: Tensor) -> Tensor:
    """Sigmabar = dL/dSigma from Sbar = dL/dS and trbar = dL/dtr, with S = Sigma / tr (SPEC section 5).
    Sbar is overwritten (it becomes Sigmabar)."""
    inv_tr, _ = _guarded_scales(tr)
    sbar_dot_s = torch.einsum("...ij,...ij->...", Sbar, S)
    sigmabar = Sbar.mul_(inv_tr[..., None, None])
    sigmabar.diagonal(dim1=-2, dim2=-1).add_((trbar - sbar_dot_s * inv_tr)[..., None])
    return sigmabar


def iternorm_fwd(x: Tensor, iters: int, axis: int) -> IterNormSaved:
    ct = compute_dtype(x.dtype)
    a = as_observations(x, axis).to(ct)
    n_obs = a.shape[-2]
    mean = a.mean(dim=-2)
    ac = a - mean.unsqueeze(-2)
    sigma = ac.mT @ ac / (n_obs - 1)
    tr = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)
    inv_tr, inv_sqrt_tr = _guarded_scales(tr)
    S = sigma.mul_(inv_tr[..., None, None])

    Ps, Pp = newton_schulz_fwd(S, iters)
    P = Ps[..., iters - 1, :, :] if iters >= 1 else _eye_like(S)
    W = P * inv_sqrt_tr[..., None, None]
    if axis == 0:  # write (m, d) = W^T Ac^T directly; the variables are its rows
        y_full = W.mT @ ac.mT
        v = y_full.var(dim=-1, correction=1)
    else:
        y_full = ac @ W
        v = y_full.var(dim=-2, correction=1)
    return IterNormSaved(y_full.to(x.dtype).contiguous(), mean, S, tr, Ps, Pp, v)


def iternorm_bwd(grad_y: Tensor, grad_v: Tensor, y: Tensor, x: Tensor, mean: Tensor, S: Tensor,
                 tr: Tensor, Ps: Tensor, Pp: Tensor, iters: int, axis: int) -> Tensor:
    """dL/dx given dL/dy and dL/dv (v the output variances), SPEC section 5."""
    ct = S.dtype
    a = as_observations(x, axis).to(ct)
    n_obs = a.shape[-2]
    ac = a - mean.unsqueeze(-2)
    inv_tr, inv_sqrt_tr = _guarded_scales(tr)
    P_T = Ps[..., iters - 1, :, :] if iters >= 1 else _eye_like(S)

    # The trace-loss route: v_j = var_j(y) enters as Ybar += 2 gv_j (y_ij - mean_j) / (N - 1).
    yo = as_observations(y, axis).to(ct)
    ybar = as_observations(grad_y, axis).to(ct)
    ybar = ybar + (2.0 / (n_obs - 1)) * grad_v.unsqueeze(-2) * (yo - yo.mean(dim=-2, keepdim=True))

    # Temporaries are updated in place (the backward's peak memory is what training pays for).
    acbar = (ybar @ P_T.mT).mul_(inv_sqrt_tr[..., None, None])  # Ybar W^T
    Wbar = ac.mT @ ybar
    trbar = -0.5 * (inv_sqrt_tr * inv_tr) * torch.einsum("...ij,...ij->...", Wbar, P_T)
    Sbar = newton_schulz_bwd(Wbar.mul_(inv_sqrt_tr[..., None, None]), S, Ps, Pp, iters)  # from Pbar = G
    del Wbar
    sigmabar = sigma_grad(Sbar, S, tr, trbar)
    _gemm_(acbar, ac, sigmabar + sigmabar.mT, alpha=1.0 / (n_obs - 1))
    abar = acbar - acbar.mean(dim=-2, keepdim=True)
    return as_observations(abar, axis).to(x.dtype).contiguous()


def trace_loss_fwd(y: Tensor, axis: int) -> Tensor:
    v = output_variances(y, axis)
    return ((v - 1.0) ** 2).sum(-1)


def trace_loss_bwd(grad: Tensor, y: Tensor, axis: int) -> Tensor:
    a = as_observations(y, axis).to(compute_dtype(y.dtype))
    n_obs = a.shape[-2]
    ac = a - a.mean(dim=-2, keepdim=True)
    v = (ac * ac).sum(-2) / (n_obs - 1)
    coef = grad[..., None] * 4.0 * (v - 1.0) / (n_obs - 1)
    return as_observations(ac * coef.unsqueeze(-2), axis).to(y.dtype).contiguous()


NORM_EPS = 1e-12  # as torch.nn.functional.normalize


def nmse_fwd(a: Tensor, b: Tensor) -> Tensor:
    """2 - 2 * mean_i cos(a_i, b_i) over the last-but-one axis (rows are samples)."""
    ct = compute_dtype(a.dtype)
    a, b = a.to(ct), b.to(ct)
    na = a.norm(dim=-1).clamp_min(NORM_EPS)
    nb = b.norm(dim=-1).clamp_min(NORM_EPS)
    cos = (a * b).sum(-1) / (na * nb)
    return 2.0 - 2.0 * cos.mean(-1)


def nmse_bwd(grad: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    ct = compute_dtype(a.dtype)
    a32, b32 = a.to(ct), b.to(ct)
    na_raw, nb_raw = a32.norm(dim=-1), b32.norm(dim=-1)
    na, nb = na_raw.clamp_min(NORM_EPS), nb_raw.clamp_min(NORM_EPS)
    ua, ub = a32 / na[..., None], b32 / nb[..., None]
    cos = (ua * ub).sum(-1)
    scale = (-2.0 / a.shape[-2]) * grad[..., None, None]
    # d cos / d a = (ub - cos ua) / |a| where the norm is not clamped; clamped norms are constants.
    ga = (ub - torch.where(na_raw > NORM_EPS, cos, 0.0)[..., None] * ua) / na[..., None]
    gb = (ua - torch.where(nb_raw > NORM_EPS, cos, 0.0)[..., None] * ub) / nb[..., None]
    return (scale * ga).to(a.dtype), (scale * gb).to(b.dtype)
