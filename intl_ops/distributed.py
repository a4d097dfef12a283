"""Gathering samples across ranks with gradient, so that statistics use the global batch."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _GatherSamples(torch.autograd.Function):
    """Concatenate every rank's (*, m, d) along the sample axis (-2).

    reduce_grads=True: the gathered tensor feeds a per-rank computation (each rank keeps its own
    output rows), so every rank's upstream gradient is summed before taking this rank's rows.
    reduce_grads=False: every rank computes the same replicated value (a loss) from the gathered
    tensor, so its rows' gradient is already complete locally: no communication in backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group, reduce_grads: bool) -> Tensor:
        world = dist.get_world_size(group)
        m = x.shape[-2]
        sizes = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([m], dtype=torch.int64, device=x.device), group=group)
        if any(int(s) != m for s in sizes):
            raise ValueError(f"process_group: every rank must pass the same number of samples; got {[int(s) for s in sizes]}")
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.reduce_grads, ctx.m = group, reduce_grads, m
        ctx.rank = dist.get_rank(group)
        return torch.cat(parts, dim=-2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.reduce_grads:
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.group)
        rows = slice(ctx.rank * ctx.m, (ctx.rank + 1) * ctx.m)
        return grad[..., rows, :], None, None


def gather_samples(x: Tensor, group, reduce_grads: bool) -> Tensor:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first, e.g. under torchrun)")
    return _GatherSamples.apply(x, group, reduce_grads)


def local_rows(y: Tensor, group) -> Tensor:
    """This rank's rows of a gathered (*, world*m, d) result."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    m = y.shape[-2] // world
    return y[..., rank * m:(rank + 1) * m, :]
