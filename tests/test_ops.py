"""torch.library integration of the `intl` ops: opcheck and torch.compile, reference backend on CPU."""
import pytest
import torch

import intl_ops
from intl_ops import literal

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
@pytest.mark.parametrize("shape", [(11, 17), (2, 9, 14)], ids=["2d", "batched"])
def test_opcheck_iternorm(shape, axis, dtype):
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    for iters in (0, 1, 3):
        _opcheck(torch.ops.intl.iternorm_fwd.default, (x, iters, axis, "reference"))
    saved = torch.ops.intl.iternorm_fwd(x.detach(), 3, axis, "reference")
    y, mean, S, tr, Ps, Pp, v = saved
    _opcheck(torch.ops.intl.iternorm_bwd.default,
             (torch.randn_like(y), torch.randn_like(v), y, x.detach(), mean, S, tr, Ps, Pp, 3, axis, "reference"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_losses(dtype):
    y = torch.randn(2, 10, 13, dtype=dtype, requires_grad=True)
    b = torch.randn(2, 10, 13, dtype=dtype, requires_grad=True)
    for axis in (0, 1):
        _opcheck(torch.ops.intl.trace_loss.default, (y, axis, "reference"))
    _opcheck(torch.ops.intl.nmse.default, (y, b, "reference"))
    _opcheck(torch.ops.intl.trace_loss_bwd.default, (torch.randn(2), y.detach(), 1, "reference"))
    _opcheck(torch.ops.intl.nmse_bwd.default, (torch.randn(2), y.detach(), b.detach(), "reference"))


@pytest.mark.parametrize("axis", [0, 1], ids=["axis0", "axis1"])
def test_compile_fullgraph_forward_backward(axis):
    torch._dynamo.reset()

    def step(a, b):
        y = intl_ops.iternorm(a, 4, axis, backend="reference")
        return intl_ops.intl_loss([a, b], 4, axis, backend="reference") + intl_ops.trace_loss(y, axis) * 1e-3

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = torch.randn(12, 20, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, 20, dtype=torch.float64, requires_grad=True)
    out = compiled(a, b)
    ga, gb = torch.autograd.grad(out, (a, b))

    def step_lit(a, b):
        return literal.intl_loss([a, b], 4, axis) + literal.trace_loss(literal.iternorm(a, 4, axis), axis) * 1e-3

    out_lit = step_lit(a, b)
    ga_lit, gb_lit = torch.autograd.grad(out_lit, (a, b))
    torch.testing.assert_close(out, out_lit)
    torch.testing.assert_close(ga, ga_lit)
    torch.testing.assert_close(gb, gb_lit)


def test_compile_inductor_cpu():
    """The default inductor backend on CPU, forward and backward, fullgraph."""
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: intl_ops.intl_loss([a, b], 4, 0), fullgraph=True)
    a = torch.randn(8, 24, requires_grad=True)
    b = torch.randn(8, 24, requires_grad=True)
    out = fn(a, b)
    out.backward()
    ref = literal.intl_loss([a.detach().double(), b.detach().double()], 4, 0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(a.grad).all()
