"""nn.Module wrappers of the functional API."""
from __future__ import annotations

from torch import Tensor, nn

from .functional import intl_loss, iternorm


class IterNorm(nn.Module):
    """IterNorm whitening layer: `IterNorm(iters=4, axis=0)(x)` == `intl_ops.iternorm(x, 4, 0)`."""

    def __init__(self, iters: int = 4, axis: int = 0, *, backend: str = "auto", process_group=None):
        super().__init__()
        self.iters, self.axis, self.backend, self.process_group = iters, axis, backend, process_group

    def forward(self, x: Tensor) -> Tensor:
        return iternorm(x, self.iters, self.axis, backend=self.backend, process_group=self.process_group)

    def extra_repr(self) -> str:
        return f"iters={self.iters}, axis={self.axis}, backend={self.backend!r}"


class INTLLoss(nn.Module):
    """The INTL objective as a module: `INTLLoss(iters=4, axis=0)(views, target=None)`."""

    def __init__(self, iters: int = 4, axis: int = 0, beta: float | None = None, *, backend: str = "auto",
                 process_group=None):
        super().__init__()
        self.iters, self.axis, self.beta = iters, axis, beta
        self.backend, self.process_group = backend, process_group

    def forward(self, views, target: Tensor | None = None) -> Tensor:
        return intl_loss(views, self.iters, self.axis, self.beta, target=target, backend=self.backend,
                         process_group=self.process_group)

    def extra_repr(self) -> str:
        return f"iters={self.iters}, axis={self.axis}, beta={self.beta}, backend={self.backend!r}"
