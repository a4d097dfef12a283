"""process_group= on 2 CPU processes (gloo, torchrun) equals one process on the concatenated batch."""
import os
import subprocess
import sys

import pytest
import torch

import intl_ops

sys.path.insert(0, os.path.dirname(__file__))
from dist_worker import global_batch  # noqa: E402

WORLD = 2


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    worker = os.path.join(os.path.dirname(__file__), "dist_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", worker, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
def test_distributed_equals_single_process(rank_results, axis):
    k, m, d = 3, 8 * WORLD, 20
    views = global_batch(0, k, m, d).requires_grad_()
    weights = global_batch(1, 1, m, d)[0]
    target = global_batch(2, 1, m, d)[0]
    y = intl_ops.iternorm(views[0], 4, axis)
    (g_iternorm,) = torch.autograd.grad((y * weights).sum(), views)
    loss = intl_ops.intl_loss(list(views), 4, axis)
    (g_loss,) = torch.autograd.grad(loss, views)
    loss_m = intl_ops.intl_loss(list(views[1:]), 4, axis, target=target)
    (g_loss_m,) = torch.autograd.grad(loss_m, views)
    for rank, res in enumerate(rank_results):
        r = res[axis]
        rows = slice(rank * m // WORLD, (rank + 1) * m // WORLD)
        torch.testing.assert_close(r["y"], y[rows].detach())
        torch.testing.assert_close(r["g_iternorm"], g_iternorm[:, rows])
        torch.testing.assert_close(r["loss"], loss.detach())
        torch.testing.assert_close(r["g_loss"], g_loss[:, rows])
        torch.testing.assert_close(r["loss_m"], loss_m.detach())
        torch.testing.assert_close(r["g_loss_m"], g_loss_m[:, rows])
