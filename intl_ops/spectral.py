"""Spectral transforms beyond IterNorm and collapse diagnostics (docs/math.md §1 and §1.1).

All functions use the axis convention of docs/math.md §2: the (N observations x C variables) matrix A
(A = x^T for axis=0, A = x for axis=1), centred columns Ac, Sigma = Ac^T Ac / (N - 1),
tr = trace(Sigma) and the trace-normalised S = Sigma / tr (eigenvalues in [0, 1], sum 1).

- spectral_transform(x, power, axis, eps=, backend=): W = (Sigma + eps tr I)^(-power) applied to Ac, by
  eigh, with the Daleckii-Krein backward (finite for repeated eigenvalues). It is a pair of torch
  custom ops (`intl::spectral_transform_fwd/bwd`, in intl_ops/ops.py) dispatched like the iternorm
  ops; the math is intl_ops.reference.spectral_transform_fwd/_bwd.
- cholesky_whiten: W-MSE style Ac L^-T, a composite of differentiable torch ops.
- whiten(method=...): iternorm, zca or cholesky behind one call.
- spectrum / effective_rank: detached diagnostics of dimensional collapse.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_axis, check_finite, check_iters, check_matrix
from .backends import resolve
from .functional import iternorm
from .ops import _no_autocast
from .plotting import plot_spectra  # noqa: F401  (re-exported: the public diagnostics live together)
from .reference import as_observations, centre, guarded_power, symmetric_normalised_covariance

WHITEN_METHODS = ("iternorm", "zca", "cholesky")


# ---------------------------------------------------------------- validation
def _check_real(value, name: str, *, nonneg: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite float, got {value!r}")
    if nonneg and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


# ---------------------------------------------------------------- public API
def spectral_transform(x: Tensor, power: float = 0.5, axis: int = 0, *, eps: float = 0.0,
                       backend: str = "auto") -> Tensor:
    """The power-family spectral transform g(lam) = lam^(-power) of x (m samples, d features).

    Returns (m, d) in x's dtype: W applied to the centred variables of `axis` (docs/math.md §2) with
    W = (Sigma + eps tr(Sigma) I)^(-power). power=0.5 is ZCA whitening (output covariance I for
    full-rank input), power=0 returns the centred data, 0 < power < 0.5 compresses the spectrum,
    power > 0.5 reverses it: output covariance eigenvalues lam^(1 - 2 power). eps >= 0 regularises
    (near-)zero eigenvalues relative to the trace. Computed by eigh in fp32 (fp64 for fp64 input);
    the backward is finite for repeated eigenvalues (see the module docstring). Constant input
    gives zeros. `backend` as for iternorm: a backend that does not provide the transform (today
    only the reference does) leaves it to the reference, on x's device.
    """
    power = _check_real(power, "power")
    eps = _check_real(eps, "eps", nonneg=True)
    axis = check_axis(axis)
    check_matrix(x, "x", axis)
    check_finite(x, "x")
    resolve(backend, x.device)
    return torch.ops.intl.spectral_transform_fwd(x, power, axis, eps, backend)[0]


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
        _, ac = centre(as_observations(x, axis))
        S, tr = symmetric_normalised_covariance(ac)
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
        y = torch.linalg.solve_triangular(L.mT, ac, upper=True, left=False) * guarded_power(tr, -0.5)[..., None, None]
        return as_observations(y, axis).to(x.dtype).contiguous()


def whiten(x: Tensor, method: str = "iternorm", axis: int = 0, *, iters: int = 4, eps: float = 0.0,
           backend: str = "auto") -> Tensor:
    """Whiten x (m samples, d features) along `axis` with one of three methods, (m, d) in x's dtype.

    - "iternorm": intl_ops.iternorm(x, iters, axis, backend=backend) (T = iters Newton steps; eps unused, must be 0)
    - "zca": spectral_transform(x, 0.5, axis, eps=eps) (eigh; iters unused)
    - "cholesky": W-MSE style Ac L^-T with Sigma + eps tr I = L L^T (iters unused)
    `backend` is passed to iternorm and to the zca transform; cholesky runs as torch ops on x's device.
    """
    if not isinstance(method, str) or method not in WHITEN_METHODS:
        raise ValueError(f"method must be one of {WHITEN_METHODS}, got {method!r}")
    iters = check_iters(iters)
    eps = _check_real(eps, "eps", nonneg=True)
    if method == "iternorm":
        if eps != 0:
            raise ValueError(f"eps is not used by method='iternorm' (IterNorm has no eps), got eps={eps!r}")
        return iternorm(x, iters, axis, backend=backend)
    if method == "zca":
        return spectral_transform(x, 0.5, axis, eps=eps, backend=backend)
    resolve(backend, x.device)  # validated for every method
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
        _, ac = centre(as_observations(x.detach(), axis))
        C = ac.shape[-1]
        # Ac^T Ac and Ac Ac^T share their nonzero eigenvalues (the trace normalisation cancels any
        # scale): decompose the smaller one, e.g. the m x m Gram of 8192-d embeddings, and pad zeros.
        S, _ = symmetric_normalised_covariance(ac.mT if ac.shape[-2] < C else ac)
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
