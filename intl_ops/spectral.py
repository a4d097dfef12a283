"""Spectral transforms beyond IterNorm (SPEC section 1) and collapse diagnostics.

All functions use SPEC section 2's axis convention: the (N observations x C variables) matrix A
(A = x^T for axis=0, A = x for axis=1), centred columns Ac, Sigma = Ac^T Ac / (N - 1),
tr = trace(Sigma) and the trace-normalised S = Sigma / tr (eigenvalues in [0, 1], sum 1).

spectral_transform(x, power=p, eps=e) computes, in fp32 (fp64 for fp64 input),
    S = U diag(lam) U^T                          (torch.linalg.eigh)
    W = tr^(-p) * U diag(g(lam + e)) U^T,        g(l) = l^(-p)
    Y = Ac W                                     returned as Y^T (axis=0) or Y (axis=1), x's dtype
With e = 0, W = Sigma^(-p): the true ST of SPEC section 1, so the output covariance W Sigma W has
eigenvalues Lam^(1-2p) (Lam those of Sigma); p = 0.5 is ZCA whitening (covariance I), p = 0 returns
Ac unchanged. e > 0 regularises relative to the trace: W = (Sigma + e tr I)^(-p), scale-free.
Eigenvalues l <= tol = C * machine_eps * max(lam) (numerically zero; negative round-off is first
clamped to 0) are treated as exactly 0: g(0) = 0 for p != 0 (pseudo-inverse: the output lies in
the data's range) and 1 for p = 0, with g'(0) = 0.

The backward (Daleckii-Krein) is  Sbar = U (F o (U^T Phibar U)) U^T  with the divided differences
F_ij = (g(l_i) - g(l_j)) / (l_i - l_j). When |l_i - l_j| <= eps_dd * max(l_i, l_j), eps_dd =
machine_eps^(1/3), that quotient cancels catastrophically, so F_ij = g'((l_i + l_j) / 2) instead
(error O(eps_dd^2) relative, the same order as the quotient's rounding error at the switch).
Repeated eigenvalues therefore give finite, correct gradients. Near-zero eigenvalues with e = 0
give large (l^(-p-1)) but finite gradients; pass e > 0 for rank-deficient inputs.

The transform is a pair of torch custom ops (`intl::spectral_transform_fwd/bwd`, opaque to
torch.compile, CPU and CUDA); Cholesky whitening is a composite of differentiable torch ops.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_axis, check_finite, check_iters, check_matrix
from .functional import iternorm
from .ops import _no_autocast
from .plotting import plot_spectra  # noqa: F401  (re-exported: the public diagnostics live together)
from .reference import as_observations, compute_dtype

WHITEN_METHODS = ("iternorm", "zca", "cholesky")


# ---------------------------------------------------------------- validation
def _check_real(value, name: str, *, nonneg: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite float, got {value!r}")
    if nonneg and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


# ---------------------------------------------------------------- reference math
class SpectralSaved(NamedTuple):
    y: Tensor      # (*, m, d) in x's dtype
    mean: Tensor   # (*, C) column means of A, compute dtype
    tr: Tensor     # (*) trace(Sigma)
    evals: Tensor  # (*, C) eigenvalues of S, ascending (as eigh returns them)
    evecs: Tensor  # (*, C, C) eigenvectors of S (columns)


def _centred(x: Tensor, axis: int, mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    a = as_observations(x, axis).to(compute_dtype(x.dtype))
    if mean is None:
        mean = a.mean(dim=-2)
    return a - mean.unsqueeze(-2), mean


def _normalised_cov(ac: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(S, tr, inv_tr) with S = 0 and inv_tr = 0 where tr == 0 (constant input)."""
    sigma = ac.mT @ ac / (ac.shape[-2] - 1)
    tr = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)
    pos = tr > 0
    inv_tr = torch.where(pos, 1.0 / torch.where(pos, tr, torch.ones_like(tr)), torch.zeros_like(tr))
    S = sigma * inv_tr[..., None, None]
    return 0.5 * (S + S.mT), tr, inv_tr  # exactly symmetric for eigh / cholesky


def _tr_scale(tr: Tensor, power: float) -> Tensor:
    """tr^(-power), 0 where tr == 0 (the output is Ac W = 0 there anyway)."""
    pos = tr > 0
    return torch.where(pos, torch.where(pos, tr, torch.ones_like(tr)).pow(-power), torch.zeros_like(tr))


def _zero_tol(lam: Tensor) -> Tensor:
    """(*, 1) threshold below which a (shifted) eigenvalue of S counts as an exact zero."""
    return lam.shape[-1] * torch.finfo(lam.dtype).eps * lam.amax(dim=-1, keepdim=True)


def _shifted(evals: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(l, valid): l = clamp(lam, 0) + eps, valid = l > tol (else treated as an exact zero)."""
    lam = evals.clamp_min(0) + eps
    return lam, lam > _zero_tol(lam)


def _g(lam: Tensor, valid: Tensor, power: float) -> Tensor:
    if power == 0:
        return torch.ones_like(lam)
    safe = torch.where(valid, lam, torch.ones_like(lam))
    return torch.where(valid, safe.pow(-power), torch.zeros_like(lam))


def _dg(lam: Tensor, valid: Tensor, power: float) -> Tensor:
    if power == 0:
        return torch.zeros_like(lam)
    safe = torch.where(valid, lam, torch.ones_like(lam))
    return torch.where(valid, -power * safe.pow(-power - 1.0), torch.zeros_like(lam))


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


def spectral_transform_fwd_ref(x: Tensor, power: float, axis: int, eps: float) -> SpectralSaved:
    ac, mean = _centred(x, axis)
    S, tr, _ = _normalised_cov(ac)
    evals, evecs = torch.linalg.eigh(S)
    lam, valid = _shifted(evals, eps)
    W = (evecs * _g(lam, valid, power).unsqueeze(-2)) @ evecs.mT
    W = W * _tr_scale(tr, power)[..., None, None]
    y = W @ ac.mT if axis == 0 else ac @ W  # W symmetric: axis=0 writes (m, d) = W Ac^T directly
    return SpectralSaved(y.to(x.dtype).contiguous(), mean, tr, evals, evecs.contiguous())  # eigh: column-major


def spectral_transform_bwd_ref(grad_y: Tensor, x: Tensor, mean: Tensor, tr: Tensor, evals: Tensor,
                               evecs: Tensor, power: float, axis: int, eps: float) -> Tensor:
    """dL/dx from dL/dy: Y = Ac W, W = s Phi(S), s = tr^-p, S = Sigma / tr (module docstring)."""
    ac, _ = _centred(x, axis, mean)
    n_obs = ac.shape[-2]
    ybar = as_observations(grad_y, axis).to(ac.dtype)
    lam, valid = _shifted(evals, eps)
    phi = (evecs * _g(lam, valid, power).unsqueeze(-2)) @ evecs.mT
    s = _tr_scale(tr, power)[..., None, None]
    pos = tr > 0
    inv_tr = torch.where(pos, 1.0 / torch.where(pos, tr, torch.ones_like(tr)), torch.zeros_like(tr))

    Wbar = ac.mT @ ybar
    acbar = ybar @ (s * phi)
    phibar = s * Wbar
    trbar = -power * (Wbar * phi).sum((-2, -1)) * s[..., 0, 0] * inv_tr  # d tr^-p / d tr = -p tr^-p / tr
    # Daleckii-Krein in S's eigenbasis; symmetrised, as only symmetric perturbations of S exist
    inner = _divided_differences(lam, valid, power) * (evecs.mT @ phibar @ evecs)
    inner = 0.5 * (inner + inner.mT)
    Sbar = evecs @ inner @ evecs.mT
    sbar_dot_s = (evals * inner.diagonal(dim1=-2, dim2=-1)).sum(-1)  # <Sbar, S> without forming S
    eye = torch.eye(Sbar.shape[-1], dtype=Sbar.dtype, device=Sbar.device)
    sigmabar = Sbar * inv_tr[..., None, None] + ((trbar - sbar_dot_s * inv_tr)[..., None, None] * eye)
    acbar = acbar + ac @ (2.0 / (n_obs - 1) * sigmabar)  # sigmabar is symmetric
    abar = acbar - acbar.mean(dim=-2, keepdim=True)
    return as_observations(abar, axis).to(x.dtype).contiguous()


# ---------------------------------------------------------------- custom ops
@torch.library.custom_op("intl::spectral_transform_fwd", mutates_args=())
def spectral_transform_fwd(x: Tensor, power: float, axis: int, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, tr, evals, evecs) as in SpectralSaved; x is (*, m, d)."""
    with _no_autocast(x):
        return tuple(spectral_transform_fwd_ref(x, power, axis, eps))


@spectral_transform_fwd.register_fake
def _(x, power, axis, eps):
    C = x.shape[-2] if axis == 0 else x.shape[-1]
    ct, batch = compute_dtype(x.dtype), x.shape[:-2]
    new = lambda *shape: x.new_empty((*batch, *shape), dtype=ct)  # noqa: E731
    return torch.empty_like(x, memory_format=torch.contiguous_format), new(C), new(), new(C), new(C, C)


@torch.library.custom_op("intl::spectral_transform_bwd", mutates_args=())
def spectral_transform_bwd(grad_y: Tensor, x: Tensor, mean: Tensor, tr: Tensor, evals: Tensor, evecs: Tensor,
                           power: float, axis: int, eps: float) -> Tensor:
    with _no_autocast(x):
        return spectral_transform_bwd_ref(grad_y, x, mean, tr, evals, evecs, power, axis, eps)


@spectral_transform_bwd.register_fake
def _(grad_y, x, mean, tr, evals, evecs, power, axis, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _st_setup(ctx, inputs, output):
    x, power, axis, eps = inputs
    _, mean, tr, evals, evecs = output
    ctx.save_for_backward(x, mean, tr, evals, evecs)
    ctx.cfg = (power, axis, eps)
    ctx.mark_non_differentiable(mean, tr, evals, evecs)


def _st_backward(ctx, gy, gmean, gtr, gevals, gevecs):
    x, mean, tr, evals, evecs = ctx.saved_tensors
    if gy is None:
        return None, None, None, None
    return torch.ops.intl.spectral_transform_bwd(gy, x, mean, tr, evals, evecs, *ctx.cfg), None, None, None


spectral_transform_fwd.register_autograd(_st_backward, setup_context=_st_setup)


# ---------------------------------------------------------------- public API
def spectral_transform(x: Tensor, power: float = 0.5, axis: int = 0, *, eps: float = 0.0) -> Tensor:
    """The power-family spectral transform g(lam) = lam^(-power) of x (m samples, d features).

    Returns (m, d) in x's dtype: W applied to the centred variables of `axis` (SPEC section 2) with
    W = (Sigma + eps tr(Sigma) I)^(-power). power=0.5 is ZCA whitening (output covariance I for
    full-rank input), power=0 returns the centred data, 0 < power < 0.5 compresses the spectrum,
    power > 0.5 reverses it: output covariance eigenvalues lam^(1 - 2 power). eps >= 0 regularises
    (near-)zero eigenvalues relative to the trace. Computed by eigh in fp32 (fp64 for fp64 input);
    the backward is finite for repeated eigenvalues (see the module docstring). Constant input
    gives zeros.
    """
    power = _check_real(power, "power")
    eps = _check_real(eps, "eps", nonneg=True)
    axis = check_axis(axis)
    check_matrix(x, "x", axis)
    check_finite(x, "x")
    return torch.ops.intl.spectral_transform_fwd(x, power, axis, eps)[0]


def cholesky_whiten(x: Tensor, axis: int = 0, *, eps: float = 0.0) -> Tensor:
    """W-MSE style whitening: Sigma + eps tr I = L L^T, output Ac L^-T (covariance I), (m, d) in x's dtype.

    Computed as Ac L_S^-T / sqrt(tr) with L_S the Cholesky factor of S + eps I (the same matrix,
    better scaled). A covariance that is not positive definite raises (pass eps > 0); constant
    input gives zeros. A composite of differentiable torch ops (works under torch.compile).
    """
    eps = _check_real(eps, "eps", nonneg=True)
    axis = check_axis(axis)
    check_matrix(x, "x", axis)
    check_finite(x, "x")
    with _no_autocast(x):
        ac, _ = _centred(x, axis)
        S, tr, inv_tr = _normalised_cov(ac)
        eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
        S = torch.where((tr > 0)[..., None, None], S + eps * eye, eye)  # constant input: L = I, output 0
        if torch.compiler.is_compiling():
            L = torch.linalg.cholesky(S)
        else:
            L, info = torch.linalg.cholesky_ex(S)
            if bool((info > 0).any()):
                raise ValueError(f"x: the covariance of the {'m samples' if axis == 0 else 'd features'} (axis={axis}) "
                                 f"is not positive definite (rank-deficient input, e.g. fewer observations than "
                                 f"variables); pass eps > 0 to regularise it")
        y = torch.linalg.solve_triangular(L.mT, ac, upper=True, left=False) * inv_tr.sqrt()[..., None, None]
        return as_observations(y, axis).to(x.dtype).contiguous()


def whiten(x: Tensor, method: str = "iternorm", axis: int = 0, *, iters: int = 4, eps: float = 0.0,
           backend: str = "auto") -> Tensor:
    """Whiten x (m samples, d features) along `axis` with one of three methods, (m, d) in x's dtype.

    - "iternorm": intl_ops.iternorm(x, iters, axis, backend=backend) (T = iters Newton steps; eps unused, must be 0)
    - "zca": spectral_transform(x, 0.5, axis, eps=eps) (eigh; iters unused)
    - "cholesky": W-MSE style Ac L^-T with Sigma + eps tr I = L L^T (iters unused)
    `backend` selects IterNorm's backend; zca and cholesky run as torch ops on x's device
    (backend must be "auto" or "reference" for them).
    """
    if not isinstance(method, str) or method not in WHITEN_METHODS:
        raise ValueError(f"method must be one of {WHITEN_METHODS}, got {method!r}")
    iters = check_iters(iters)
    eps = _check_real(eps, "eps", nonneg=True)
    if method == "iternorm":
        if eps != 0:
            raise ValueError(f"eps is not used by method='iternorm' (IterNorm has no eps), got eps={eps!r}")
        return iternorm(x, iters, axis, backend=backend)
    if backend not in ("auto", "reference"):
        raise ValueError(f"backend={backend!r} applies to method='iternorm' only; "
                         f"method={method!r} takes backend='auto' or 'reference'")
    if method == "zca":
        return spectral_transform(x, 0.5, axis, eps=eps)
    return cholesky_whiten(x, axis, eps=eps)


def spectrum(x: Tensor, axis: int = 0) -> Tensor:
    """Eigenvalues of the trace-normalised covariance S of `axis`'s variables, descending (C,).

    They sum to 1 (round-off aside); tiny negative round-off is clamped to 0; constant input gives
    zeros. fp32 (fp64 for fp64 input), detached: a diagnostic, e.g. of dimensional collapse.
    """
    axis = check_axis(axis)
    check_matrix(x, "x", axis)
    check_finite(x, "x")
    with torch.no_grad(), _no_autocast(x):
        ac = _centred(x.detach(), axis)[0]
        C = ac.shape[-1]
        # Ac^T Ac and Ac Ac^T share their nonzero eigenvalues (the trace normalisation cancels any
        # scale): decompose the smaller one, e.g. the m x m Gram of 8192-d embeddings, and pad zeros.
        S, _, _ = _normalised_cov(ac.mT if ac.shape[-2] < C else ac)
        lam = torch.linalg.eigvalsh(S).flip(-1).clamp_min(0)
        return torch.nn.functional.pad(lam, (0, C - lam.shape[-1]))


def effective_rank(x: Tensor, axis: int = 0) -> Tensor:
    """exp(H(p)), H the Shannon entropy of p = spectrum(x, axis) / sum: a 0-dim tensor in [1, C].

    C for an isotropic (white) input, k for rank-k data, 1 for a single direction, 0 for constant
    input (no variance). Detached; fp32 (fp64 for fp64 input).
    """
    lam = spectrum(x, axis)
    total = lam.sum(-1, keepdim=True)
    p = lam / torch.where(total > 0, total, torch.ones_like(total))
    entropy = -torch.special.xlogy(p, p).sum(-1)  # 0 log 0 = 0
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))
