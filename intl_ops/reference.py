"""Pure-PyTorch reference backend: the math of docs/math.md, forward and analytic backward.

Everything works on the (N observations x C variables) matrix A of docs/math.md §2, taken as a
strided view of x (A = x for axis=1, A = x^T for axis=0), with optional leading batch dimensions
(a stack of views shares one call). Products are batched matmuls, so this runs on any device.

IterNorm is composed of stage functions, which the other backends reuse for the parts they do
not replace (and bench/ times on their own):
    forward   centred_covariance -> trace_normalise -> newton_schulz_fwd -> apply_fwd
    backward  output_grad -> apply_bwd -> covariance_grad (newton_schulz_bwd, sigma_grad) -> covariance_bwd
What the forward keeps for the backward is the `IterNormSaved` layout every backend returns
(docs/math.md §8; `saved_shapes` gives the shapes):
    mean (*, C)          column means of A, compute dtype
    S    (*, C, C)       Sigma / tr
    tr   (*)             trace(Sigma)
    Ps   (*, T, C, C)    P_1 .. P_T
    powers (*, T-1, 2, C, C)  (P_k^2, P_k^3) for k = 1 .. T-1, the powers step k+1 used
    v    (*, C)          output variances (the trace loss's v), from y
Never autograd's per-product temporaries: 27 C^3 products at T=4 instead of the literal 36.
The spectral transform (docs/math.md §1) is here too: spectral_transform_fwd / _bwd.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor


class IterNormSaved(NamedTuple):
    y: Tensor
    mean: Tensor
    S: Tensor
    tr: Tensor
    Ps: Tensor
    powers: Tensor
    v: Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 compute in fp32; fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def saved_shapes(batch: tuple[int, ...], C: int, iters: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the saved tensors after y (docs/math.md §8), for `batch` leading dimensions."""
    batch = tuple(batch)
    return {"mean": (*batch, C), "S": (*batch, C, C), "tr": batch, "Ps": (*batch, iters, C, C),
            "powers": (*batch, max(iters - 1, 0), 2, C, C), "v": (*batch, C)}


def as_observations(x: Tensor, axis: int) -> Tensor:
    """The (*, N, C) view A of a (*, m, d) input: columns are the variables being decorrelated."""
    return x if axis == 1 else x.mT


def guarded_power(t: Tensor, p: float, keep: Tensor | None = None) -> Tensor:
    """t^p where `keep` (default t > 0), else 0: the trace's 1/tr, 1/sqrt(tr), tr^-p of a constant input
    (tr = 0) are 0, so its output and gradient are 0 (docs/math.md §3); the spectral transform passes
    the eigenvalues it counts as nonzero."""
    keep = t > 0 if keep is None else keep
    return torch.where(keep, torch.where(keep, t, torch.ones_like(t)).pow(p), torch.zeros_like(t))


def _gemm_(c: Tensor, a: Tensor, b: Tensor, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    """c = beta * c + alpha * (a @ b) in place, one BLAS call: no temporaries for the scaling or the sum."""
    if c.dim() == 2:
        return c.addmm_(a, b, beta=beta, alpha=alpha)
    if c.dim() == 3:
        return c.baddbmm_(a, b, beta=beta, alpha=alpha)
    return c.copy_(beta * c + alpha * (a @ b))


def _eye_like(S: Tensor) -> Tensor:
    return torch.eye(S.shape[-1], dtype=S.dtype, device=S.device).expand_as(S)


def last_iterate(S: Tensor, Ps: Tensor, iters: int) -> Tensor:
    """P_T (*, C, C): the last of Ps, or I when T = 0."""
    return Ps[..., iters - 1, :, :] if iters >= 1 else _eye_like(S)


def whitening_matrix(P_T: Tensor, tr: Tensor) -> Tensor:
    """W = P_T / sqrt(tr) (*, C, C), 0 where tr = 0."""
    return P_T * guarded_power(tr, -0.5)[..., None, None]


def output_variances(y: Tensor, axis: int) -> Tensor:
    """Per-variable unbiased variance of y (*, m, d) in fp32/fp64: shape (*, m) for axis=0, (*, d) for axis=1."""
    a = as_observations(y, axis).to(compute_dtype(y.dtype))
    return a.var(dim=-2, correction=1)


# ------------------------------------------------------------------ forward stages (docs/math.md §3)
def centre(a: Tensor) -> tuple[Tensor, Tensor]:
    """(mean (*, C), Ac (*, N, C)) of A (*, N, C), in its compute dtype."""
    a = a.to(compute_dtype(a.dtype))
    mean = a.mean(dim=-2)
    return mean, a - mean.unsqueeze(-2)


def centred_covariance(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, Ac, Sigma = Ac^T Ac / (N - 1) (*, C, C)) of A (*, N, C), in its compute dtype."""
    mean, ac = centre(a)
    return mean, ac, ac.mT @ ac / (a.shape[-2] - 1)


def trace_normalise(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(S = Sigma / tr, tr) with S = 0 where tr = 0; Sigma is overwritten (it becomes S)."""
    tr = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)
    return sigma.mul_(guarded_power(tr, -1.0)[..., None, None]), tr


def newton_schulz_fwd(S: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """The T Newton-Schulz steps on S (*, C, C): (Ps, powers), Ps = P_1..P_T (*, T, C, C),
    powers = (P_k^2, P_k^3) for k = 1..T-1 (*, T-1, 2, C, C)."""
    C, batch = S.shape[-1], S.shape[:-2]
    Ps = S.new_empty(*batch, iters, C, C)
    powers = S.new_empty(*batch, max(iters - 1, 0), 2, C, C)
    if iters >= 1:  # P_1 = 1.5 I - 0.5 S in closed form
        P = torch.mul(S, -0.5, out=Ps[..., 0, :, :])
        P.diagonal(dim1=-2, dim2=-1).add_(1.5)
    for k in range(1, iters):  # every product is written straight into the saved slot
        P2 = torch.matmul(P, P, out=powers[..., k - 1, 0, :, :])
        P3 = torch.matmul(P2, P, out=powers[..., k - 1, 1, :, :])
        P = _gemm_(Ps[..., k, :, :].copy_(P), P3, S, beta=1.5, alpha=-0.5)
    return Ps, powers


def apply_fwd(ac: Tensor, W: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """(y, v): y = Ac W laid out as the (*, m, d) input (compute dtype, written as W^T Ac^T for axis=0,
    whose variables are its rows), and v its per-variable variances (*, C)."""
    if axis == 0:
        y = W.mT @ ac.mT
        return y, y.var(dim=-1, correction=1)
    y = ac @ W
    return y, y.var(dim=-2, correction=1)


# ------------------------------------------------------------------ backward stages (docs/math.md §5)
def output_grad(grad_y: Tensor, grad_v: Tensor, y: Tensor, axis: int) -> Tensor:
    """Ybar (*, N, C) in the compute dtype: dL/dy plus the trace-loss route through v,
    2 gv_j (y_ij - mean_j(y)) / (N - 1)."""
    ct = compute_dtype(y.dtype)
    yo = as_observations(y, axis).to(ct)
    ybar = as_observations(grad_y, axis).to(ct)
    n_obs = yo.shape[-2]
    return ybar + (2.0 / (n_obs - 1)) * grad_v.to(ct).unsqueeze(-2) * (yo - yo.mean(dim=-2, keepdim=True))


def apply_bwd(ybar: Tensor, ac: Tensor, P_T: Tensor, tr: Tensor) -> tuple[Tensor, Tensor]:
    """(Acbar, G) of Y = Ac P_T / sqrt(tr): Acbar = Ybar W^T (the direct route) and G = dL/dP_T =
    Ac^T Ybar / sqrt(tr)."""
    inv_sqrt_tr = guarded_power(tr, -0.5)[..., None, None]
    acbar = (ybar @ P_T.mT).mul_(inv_sqrt_tr)
    return acbar, (ac.mT @ ybar).mul_(inv_sqrt_tr)


def newton_schulz_bwd(G: Tensor, S: Tensor, Ps: Tensor, powers: Tensor, iters: int) -> Tensor:
    """Sbar = dL/dS through the T steps, given G = dL/dP_T; G is overwritten (it carries dL/dP_k down
    the steps)."""
    Sbar = torch.zeros_like(S)
    for k in range(iters, 0, -1):
        if k == 1:  # B = P_0 = I: only the S term remains, P_0 needs no gradient
            Sbar.add_(G, alpha=-0.5)
            break
        B = Ps[..., k - 2, :, :]
        B2 = powers[..., k - 2, 0, :, :]
        B3 = powers[..., k - 2, 1, :, :]
        _gemm_(Sbar, B3.mT, G, alpha=-0.5)
        H = G @ S.mT  # every iterate commutes with S: G S B^2 + B G S B + B^2 G S
        _gemm_(G, H, B2.mT, beta=1.5, alpha=-0.5)
        _gemm_(G, B2.mT, H, alpha=-0.5)
        _gemm_(G, B.mT @ H, B.mT, alpha=-0.5)
        del H
    return Sbar


def sigma_grad(Sbar: Tensor, S: Tensor, tr: Tensor, trbar: Tensor) -> Tensor:
    """Sigmabar = dL/dSigma from Sbar = dL/dS and trbar = dL/dtr, with S = Sigma / tr.
    Sbar is overwritten (it becomes Sigmabar)."""
    inv_tr = guarded_power(tr, -1.0)
    sbar_dot_s = torch.einsum("...ij,...ij->...", Sbar, S)
    sigmabar = Sbar.mul_(inv_tr[..., None, None])
    sigmabar.diagonal(dim1=-2, dim2=-1).add_((trbar - sbar_dot_s * inv_tr)[..., None])
    return sigmabar


def covariance_grad(G: Tensor, S: Tensor, tr: Tensor, P_T: Tensor, n_obs: int,
                    sbar_from: Callable[[Tensor], Tensor]) -> Tensor:
    """M = (Sigmabar + Sigmabar^T) / (N - 1) from G = dL/dP_T, so that dL/dAc = Acbar + Ac M.
    `sbar_from(G)` is the Newton-Schulz backward (this module's, or a backend's kernels); it may
    overwrite G."""
    trbar = -0.5 * guarded_power(tr, -1.0) * torch.einsum("...ij,...ij->...", G, P_T)  # the 1/sqrt(tr) of W
    sigmabar = sigma_grad(sbar_from(G), S, tr, trbar)
    return (sigmabar + sigmabar.mT) / (n_obs - 1)


def covariance_bwd(acbar: Tensor, ac: Tensor, M: Tensor) -> Tensor:
    """Abar = Acbar + Ac M, centred over the observations (the mean's gradient); Acbar is overwritten."""
    abar = _gemm_(acbar, ac, M)
    return abar - abar.mean(dim=-2, keepdim=True)


# ------------------------------------------------------------------ the iternorm op functions
def iternorm_fwd(x: Tensor, iters: int, axis: int) -> IterNormSaved:
    mean, ac, sigma = centred_covariance(as_observations(x, axis))
    S, tr = trace_normalise(sigma)
    Ps, powers = newton_schulz_fwd(S, iters)
    y, v = apply_fwd(ac, whitening_matrix(last_iterate(S, Ps, iters), tr), axis)
    return IterNormSaved(y.to(x.dtype).contiguous(), mean, S, tr, Ps, powers, v)


def iternorm_bwd(grad_y: Tensor, grad_v: Tensor, y: Tensor, x: Tensor, mean: Tensor, S: Tensor,
                 tr: Tensor, Ps: Tensor, powers: Tensor, iters: int, axis: int) -> Tensor:
    """dL/dx given dL/dy and dL/dv (v the output variances), docs/math.md §5.
    Temporaries are updated in place (the backward's peak memory is what training pays for)."""
    ac = as_observations(x, axis).to(S.dtype) - mean.unsqueeze(-2)
    P_T = last_iterate(S, Ps, iters)
    acbar, G = apply_bwd(output_grad(grad_y, grad_v, y, axis), ac, P_T, tr)
    M = covariance_grad(G, S, tr, P_T, ac.shape[-2], lambda G: newton_schulz_bwd(G, S, Ps, powers, iters))
    del G
    return as_observations(covariance_bwd(acbar, ac, M), axis).to(x.dtype).contiguous()


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


# ------------------------------------------------------------------ spectral transform (docs/math.md §1.1)
class SpectralSaved(NamedTuple):
    y: Tensor      # (*, m, d) in x's dtype
    mean: Tensor   # (*, C) column means of A, compute dtype
    tr: Tensor     # (*) trace(Sigma)
    evals: Tensor  # (*, C) eigenvalues of S, ascending (as eigh returns them)
    evecs: Tensor  # (*, C, C) eigenvectors of S (columns)


def symmetric_normalised_covariance(ac: Tensor) -> tuple[Tensor, Tensor]:
    """(S, tr) of centred Ac, S made exactly symmetric (for eigh / cholesky); S = 0 where tr = 0."""
    S, tr = trace_normalise(ac.mT @ ac / (ac.shape[-2] - 1))
    return 0.5 * (S + S.mT), tr


def _zero_tol(lam: Tensor) -> Tensor:
    """(*, 1) threshold below which a (shifted) eigenvalue of S counts as an exact zero."""
    return lam.shape[-1] * torch.finfo(lam.dtype).eps * lam.amax(dim=-1, keepdim=True)


def _shifted(evals: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(l, valid): l = clamp(lam, 0) + eps, valid = l > tol (else treated as an exact zero)."""
    lam = evals.clamp_min(0) + eps
    return lam, lam > _zero_tol(lam)


def _g(lam: Tensor, valid: Tensor, power: float) -> Tensor:
    return torch.ones_like(lam) if power == 0 else guarded_power(lam, -power, valid)


def _dg(lam: Tensor, valid: Tensor, power: float) -> Tensor:
    return torch.zeros_like(lam) if power == 0 else -power * guarded_power(lam, -power - 1.0, valid)


def _divided_differences(lam: Tensor, valid: Tensor, power: float) -> Tensor:
    """F_ij = (g(l_i) - g(l_j)) / (l_i - l_j), or g' at the midpoint when l_i and l_j are close."""
    g = _g(lam, valid, power)
    li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
    diff = li - lj
    close = diff.abs() <= torch.finfo(lam.dtype).eps ** (1.0 / 3.0) * torch.maximum(li, lj)
    mid = 0.5 * (li + lj)
    dg_mid = _dg(mid, mid > _zero_tol(lam).unsqueeze(-1), power)
    quotient = (g.unsqueeze(-1) - g.unsqueeze(-2)) / torch.where(close, torch.ones_like(diff), diff)
    return torch.where(close, dg_mid, quotient)


def _spectral_phi(evals: Tensor, evecs: Tensor, power: float, eps: float) -> Tensor:
    """Phi(S) = U diag(g(l)) U^T."""
    lam, valid = _shifted(evals, eps)
    return (evecs * _g(lam, valid, power).unsqueeze(-2)) @ evecs.mT


def spectral_transform_fwd(x: Tensor, power: float, axis: int, eps: float) -> SpectralSaved:
    mean, ac = centre(as_observations(x, axis))
    S, tr = symmetric_normalised_covariance(ac)
    evals, evecs = torch.linalg.eigh(S)
    W = _spectral_phi(evals, evecs, power, eps) * guarded_power(tr, -power)[..., None, None]
    y = W @ ac.mT if axis == 0 else ac @ W  # W symmetric: axis=0 writes (m, d) = W Ac^T directly
    return SpectralSaved(y.to(x.dtype).contiguous(), mean, tr, evals, evecs.contiguous())  # eigh: column-major


def spectral_transform_bwd(grad_y: Tensor, x: Tensor, mean: Tensor, tr: Tensor, evals: Tensor,
                           evecs: Tensor, power: float, axis: int, eps: float) -> Tensor:
    """dL/dx from dL/dy: Y = Ac W, W = s Phi(S), s = tr^-p, S = Sigma / tr (docs/math.md §1.1)."""
    ac = as_observations(x, axis).to(mean.dtype) - mean.unsqueeze(-2)
    ybar = as_observations(grad_y, axis).to(ac.dtype)
    lam, valid = _shifted(evals, eps)
    phi = _spectral_phi(evals, evecs, power, eps)
    s = guarded_power(tr, -power)[..., None, None]
    inv_tr = guarded_power(tr, -1.0)

    Wbar = ac.mT @ ybar
    acbar = ybar @ (s * phi)
    phibar = s * Wbar
    trbar = -power * (Wbar * phi).sum((-2, -1)) * s[..., 0, 0] * inv_tr  # d tr^-p / d tr = -p tr^-p / tr
    # Daleckii-Krein in S's eigenbasis; symmetrised, as only symmetric perturbations of S exist
    inner = _divided_differences(lam, valid, power) * (evecs.mT @ phibar @ evecs)
    inner = 0.5 * (inner + inner.mT)
    Sbar = evecs @ inner @ evecs.mT
    sbar_dot_s = (evals * inner.diagonal(dim1=-2, dim2=-1)).sum(-1)  # <Sbar, S> without forming S
    sigmabar = Sbar * inv_tr[..., None, None]
    sigmabar.diagonal(dim1=-2, dim2=-1).add_((trbar - sbar_dot_s * inv_tr)[..., None])
    return as_observations(covariance_bwd(acbar, ac, 2.0 / (ac.shape[-2] - 1) * sigmabar), axis).to(x.dtype).contiguous()


# ------------------------------------------------------------------ the INTL loss head (docs/math.md §4.2)
def head_view_weights(K: int, has_target: bool, dtype: torch.dtype, device) -> Tensor:
    """w (K,): the weight of TL_i in the head's trace term. Without a target: 1 for view 0 (in every
    pair) and 1/(K-1) for the others; with a target: 1/K for each view."""
    if has_target:
        return torch.full((K,), 1.0 / K, dtype=dtype, device=device)
    w = torch.full((K,), 1.0 / (K - 1), dtype=dtype, device=device)
    w[0] = 1.0
    return w


def _head_pairs(y: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
    """(a, b) of the head's P pairs, in y's compute dtype: (y_i, y_0) for i >= 1, or (y_i, target) for every i."""
    ct = compute_dtype(y.dtype)
    if target is None:
        return y[1:].to(ct), y[:1].to(ct).expand_as(y[1:])
    return y.to(ct), target.to(ct).expand_as(y)


def intl_head_fwd(y: Tensor, v: Tensor, target: Tensor | None, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, align, trace), 0-dim in y's compute dtype, of the whitened views y (K, m, d), their output
    variances v (K, C) and the optional whitened target (m, d): align = mean over the pairs of nmse,
    trace = sum_i w_i TL_i (head_view_weights), loss = align + beta * trace."""
    ct = compute_dtype(y.dtype)
    a, b = _head_pairs(y, target)
    align = nmse_fwd(a, b).mean()
    tl = ((v.to(ct) - 1.0) ** 2).sum(-1)
    trace = (head_view_weights(y.shape[0], target is not None, ct, y.device) * tl).sum()
    return align + beta * trace, align, trace


def intl_head_bwd(grad: Tensor, y: Tensor, v: Tensor, target: Tensor | None, beta: float) -> tuple[Tensor, Tensor]:
    """(dL/dy (K, m, d) in y's dtype, dL/dv (K, C) in v's dtype) for grad = dL/dloss (0-dim): each pair's
    nmse gradient with weight grad / P; view 0 as the reference sums its pairs' gradients (in the
    compute dtype, rounded once)."""
    ct = compute_dtype(y.dtype)
    a, b = _head_pairs(y, target)
    P = a.shape[0]
    g = grad.to(ct) / P
    ga, gb = nmse_bwd(g.expand(P), a, b)
    dy = ga if target is not None else torch.cat([gb.sum(0, keepdim=True), ga])
    w = head_view_weights(y.shape[0], target is not None, ct, y.device)
    dv = (2.0 * beta * grad.to(ct)) * w[:, None] * (v.to(ct) - 1.0)
    return dy.to(y.dtype).contiguous(), dv.to(v.dtype)
