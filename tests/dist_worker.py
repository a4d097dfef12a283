"""Run under torchrun (gloo, CPU): every rank whitens its share of one global batch through process_group=
and saves its values and gradients for tests/test_distributed.py to compare with a single process."""
import os
import sys

import torch
import torch.distributed as dist

import intl_ops

KEYS = ("y", "g_iternorm", "loss", "g_loss", "loss_m", "g_loss_m")  # what each rank saves, per axis


def global_batch(seed: int, k: int, m: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, m, d, generator=g, dtype=torch.float64)


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    k, m, d = 3, 8 * world, 20
    rows = slice(rank * m // world, (rank + 1) * m // world)
    views = global_batch(0, k, m, d)[:, rows].clone().requires_grad_()
    weights = global_batch(1, 1, m, d)[0, rows]
    target = global_batch(2, 1, m, d)[0, rows]
    results = {}
    for axis in (0, 1):
        y = intl_ops.iternorm(views[0], 4, axis, process_group=dist.group.WORLD)
        (g_iternorm,) = torch.autograd.grad((y * weights).sum(), views)
        loss = intl_ops.intl_loss(list(views), 4, axis, process_group=dist.group.WORLD)
        (g_loss,) = torch.autograd.grad(loss, views)
        loss_m = intl_ops.intl_loss(list(views[1:]), 4, axis, target=target, process_group=dist.group.WORLD)
        (g_loss_m,) = torch.autograd.grad(loss_m, views)
        results[axis] = dict(zip(KEYS, (y.detach(), g_iternorm, loss.detach(), g_loss, loss_m.detach(), g_loss_m),
                                 strict=True))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
