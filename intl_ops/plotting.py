"""Plots of eigenvalue spectra over training (matplotlib is imported only when a plot is made)."""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np


def _as_array(values, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch.Tensor, on any device
        values = values.detach().float().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of eigenvalues, got shape {arr.shape}")
    return arr


def plot_spectra(spectra: Mapping, path, title: str | None = None):
    """Write a PNG of eigenvalue vs index (log y), one line per label, e.g. {epoch: intl_ops.spectrum(z)}.

    Values <= 0 (or non-finite) are left out of a line, since a log axis cannot show them.
    Uses matplotlib's Agg canvas directly: no pyplot, no change to the global backend. Returns path.
    """
    if not isinstance(spectra, Mapping) or len(spectra) == 0:
        raise ValueError(f"spectra must be a non-empty mapping label -> 1-D eigenvalues, got {type(spectra).__name__}"
                         + (" (empty)" if isinstance(spectra, Mapping) else ""))
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a str or None, got {type(title).__name__}")
    lines = {label: _as_array(values, f"spectra[{label!r}]") for label, values in spectra.items()}

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, lam in lines.items():
        shown = np.where(np.isfinite(lam) & (lam > 0), lam, np.nan)
        ax.plot(np.arange(1, lam.size + 1), shown, label=str(label), linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("eigenvalue of the trace-normalised covariance")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", ncol=2 if len(lines) > 8 else 1)
    fig.tight_layout()
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png")
    return path
