"""intl_ops: fast, exact IterNorm whitening and the INTL objective (Weng et al., ICLR 2024).

Public API: iternorm, trace_loss, intl_loss, IterNorm, INTLLoss, available_backends, set_dot_precision.
The math is defined in docs/math.md; every backend computes the same function.
"""
from ._checks import set_check_finite
from .backends import available_backends, set_dot_precision
from .functional import default_beta, intl_loss, iternorm, trace_loss
from .modules import INTLLoss, IterNorm
from .spectral import effective_rank, plot_spectra, spectral_transform, spectrum, whiten

__version__ = "0.1.0"
__all__ = [
    "iternorm", "trace_loss", "intl_loss", "default_beta", "IterNorm", "INTLLoss",
    "available_backends", "set_check_finite", "set_dot_precision",
    "spectral_transform", "whiten", "spectrum", "effective_rank", "plot_spectra",
]
