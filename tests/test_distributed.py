"""process_group= on 2 CPU processes (gloo, torchrun) equals one process on the concatenated batch.

The single-process results are the oracle (test_reference checks them against the literal code);
each rank's share must match them within tests/_oracle.py's float64 floor."""
import os
import subprocess
import sys

import pytest
import torch

import intl_ops

sys.path.insert(0, os.path.dirname(__file__))
from _oracle import assert_matches_oracle, perturbed  # noqa: E402
from dist_worker import KEYS, global_batch  # noqa: E402

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


def _single_process(axis):
    """What dist_worker computes, in one process on the whole batch: {key: value}."""
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
    return dict(y=y.detach(), g_iternorm=g_iternorm, loss=loss.detach(), g_loss=g_loss,
                loss_m=loss_m.detach(), g_loss_m=g_loss_m)


def _check_ranks(rank_results, axis):
    """Each rank's rows (of y and the gradients) and the replicated losses equal the single process's."""
    single = _single_process(axis)
    assert set(single) == set(KEYS) and len(rank_results) == WORLD
    m = single["y"].shape[0]
    for rank, res in enumerate(rank_results):
        r = res[axis]
        assert set(r) == set(KEYS), f"rank {rank} saved {sorted(r)}"
        rows = slice(rank * m // WORLD, (rank + 1) * m // WORLD)
        for key in KEYS:
            want = single[key] if key.startswith("loss") else single[key][..., rows, :]
            assert_matches_oracle(f"{key} rank {rank}", r[key], want)


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
def test_distributed_equals_single_process(rank_results, axis):
    _check_ranks(rank_results, axis)


@pytest.mark.parametrize("key", ["y", "g_iternorm", "loss", "g_loss", "loss_m", "g_loss_m"])
def test_rank_check_detects_wrong_output(rank_results, key):
    """_check_ranks fails when one value of one rank is off in one element (rank 1: the last rows)."""
    wrong = [{axis: dict(res[axis]) for axis in res} for res in rank_results]
    wrong[1][0][key] = perturbed(wrong[1][0][key])
    with pytest.raises(AssertionError, match=f"^{key} rank 1: "):
        _check_ranks(wrong, 0)
