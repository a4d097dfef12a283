"""The Newton-Schulz kernels (intl_ops/kernels/newton_schulz.py) on their own, against float64.

newton_schulz_bwd returns (Sbar, ss): ss holds partial sums of <Sbar, S>, which the fused covariance
backward sums instead of a torch reduction; both Newton-Schulz paths (row blocks for small C, triangle
tiles for large C), T = 0..4, sizes that are not multiples of the blocks, the GPU's block sizes, and
outputs that do not rely on zero-filled buffers (every torch.empty is NaN-poisoned). Under the
interpreter on CPU (tests/conftest.py); on a GPU the same checks run on CUDA tensors.
"""
import contextlib

import pytest
import torch

from intl_ops import backend_triton as bt
from intl_ops import reference
from intl_ops.kernels import _common, newton_schulz as ns
from _oracle import assert_matches_oracle

DEV = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(bt.unavailable_reason(torch.device(DEV)) is not None,
                                reason=str(bt.unavailable_reason(torch.device(DEV))))


def _problem(B: int, C: int, T: int, seed: int = 0):
    """float64 (S, Ps, powers, G, Sbar, <Sbar, S>) from the reference stages, S of a random covariance."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, 2 * C + 7, C, generator=g, dtype=torch.float64) + 2.0
    _, _, sigma = reference.centred_covariance(a)
    S, _ = reference.trace_normalise(sigma)
    Ps, powers = reference.newton_schulz_fwd(S, T)
    G = torch.randn(B, C, C, generator=g, dtype=torch.float64)
    Sbar = reference.newton_schulz_bwd(G.clone(), S, Ps, powers, T)
    return S, Ps, powers, G, Sbar, (Sbar * S).sum((-2, -1))


def _run_kernels(S, Ps, G, T):
    """(Ps, powers, Sbar, ss) of the kernels on fp32 copies on DEV."""
    f32 = lambda t: t.to(DEV, torch.float32).contiguous()  # noqa: E731
    B, C = S.shape[0], S.shape[-1]
    S32 = f32(S)
    Ps32 = torch.empty(B, T, C, C, device=DEV)
    pw32 = torch.empty(B, max(T - 1, 0), 2, C, C, device=DEV)
    if T >= 1:
        Ps32[:, 0] = f32(Ps[:, 0])  # P_1 comes from the covariance kernels
    ns.newton_schulz_fwd(S32, Ps32, pw32)
    Sbar, ss = ns.newton_schulz_bwd(f32(G), S32, Ps32, pw32)
    return Ps32, pw32, Sbar, ss


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty / empty_like is NaN-filled: an output element left unwritten stays NaN."""
    empty, empty_like = torch.empty, torch.empty_like
    fill = lambda t: t.fill_(float("nan")) if t.is_floating_point() else t  # noqa: E731
    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


# (B, C, T, path, blocks): "interp" the interpreter's few large blocks, "gpu" the GPU's block sizes,
# "groups" the GPU's block sizes on an assumed H200, whose idle SMs split the row blocks by columns
# (column groups of at least 32 here: C = 150 gets 4 groups of 48 columns, the last one ragged).
CASES = [(2, 45, 4, "rows", "interp"), (2, 45, 4, "tiles", "interp"), (1, 70, 1, "rows", "interp"),
         (1, 70, 1, "tiles", "interp"), (2, 33, 2, "rows", "gpu"), (2, 150, 3, "tiles", "gpu"),
         (1, 150, 3, "rows", "gpu"), (3, 20, 0, "rows", "interp"), (1, 150, 3, "rows", "groups"),
         (2, 70, 2, "rows", "groups")]


@contextlib.contextmanager
def _blocks(kind: str, monkeypatch):
    if kind == "interp":
        yield
        return
    monkeypatch.setattr(ns, "MIN_GROUP_COLS", 32)
    with _common.gpu_block_sizes(), _common.assume_gpu(132) if kind == "groups" else contextlib.nullcontext():
        yield


@pytest.mark.parametrize("B,C,T,path,blocks", CASES, ids=[f"B{b}-C{c}-T{t}-{p}-{k}" for b, c, t, p, k in CASES])
def test_newton_schulz_matches_fp64(B, C, T, path, blocks, monkeypatch, poisoned):
    monkeypatch.setattr(ns, "ROWS_MAX_C", 10**9 if path == "rows" else 0)
    S, Ps, powers, G, Sbar64, ss64 = _problem(B, C, T)
    with _blocks(blocks, monkeypatch):
        if blocks == "groups":
            assert ns._col_groups(C, B, ns._row_block(C), torch.device(DEV))[0] > 1
        Ps32, pw32, Sbar, ss = _run_kernels(S, Ps, G, T)
    assert ss.dtype == torch.float32 and ss.dim() == 2 and ss.shape[0] == B
    if T == 0:
        assert torch.equal(Sbar, torch.zeros_like(Sbar)) and torch.equal(ss, torch.zeros_like(ss))
        return
    # the reference at fp32 sets the bound (tests/_oracle.py's rule)
    S32, G32 = S.float(), G.float()
    Ps_r, pw_r = reference.newton_schulz_fwd(S32, T)
    Sbar_r = reference.newton_schulz_bwd(G32.clone(), S32, Ps_r, pw_r, T)
    assert_matches_oracle("Ps", Ps32.cpu(), Ps, ref=Ps_r)
    if T > 1:
        assert_matches_oracle("powers", pw32.cpu(), powers, ref=pw_r)
    assert_matches_oracle("Sbar", Sbar.cpu(), Sbar64, ref=Sbar_r)
    assert_matches_oracle("<Sbar, S>", ss.sum(-1).cpu(), ss64, ref=(Sbar_r * S32).sum((-2, -1)))


def test_partial_sums_detect_a_missing_row_block(monkeypatch):
    """The check above fails when one program's part of <Sbar, S> is lost (it can fail)."""
    monkeypatch.setattr(ns, "ROWS_MAX_C", 10**9)
    S, Ps, powers, G, Sbar64, ss64 = _problem(2, 33, 3)
    with _common.gpu_block_sizes():
        _, _, _, ss = _run_kernels(S, Ps, G, 3)
    assert ss.shape[-1] > 1
    S32 = S.float()
    Ps_r, pw_r = reference.newton_schulz_fwd(S32, 3)
    ref = (reference.newton_schulz_bwd(G.float(), S32, Ps_r, pw_r, 3) * S32).sum((-2, -1))
    with pytest.raises(AssertionError, match="<Sbar, S>"):
        assert_matches_oracle("<Sbar, S>", ss[:, 1:].sum(-1).cpu(), ss64, ref=ref)


def test_backward_is_deterministic():
    """Fixed-order partial sums: two runs are bit-identical."""
    S, Ps, powers, G, _, _ = _problem(2, 45, 4)
    first = _run_kernels(S, Ps, G, 4)
    second = _run_kernels(S, Ps, G, 4)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_autotune_is_one_config_under_the_interpreter():
    """Several configs fail without a GPU driver; on a GPU the pruned lists are what gets timed."""
    tuned = [ns._ns_mm_kernel, ns._ns_fwd_rows_kernel, ns._ns_bwd_rows_a_kernel, ns._ns_bwd_rows_b_kernel]
    for kernel in tuned:
        assert (len(kernel.configs) == 1) == _common.interpreting(), kernel.fn.__name__
    # the GPU's pruning rules keep at least one config for every launch the launchers make
    for prec in _common.DOT_MODES[1:]:
        for bm in (16, 32):
            for C in (256, 250):
                assert ns._prune_rows(list(ns._ROWS_CONFIGS.values()), {"C": C, "CW": 64}, BLOCK_M=bm, PREC=prec)
        for block in (64, 128):
            assert ns._prune_mm(list(ns._MM_CONFIGS.values()), {"C": 1000}, BLOCK=block, PREC=prec)
