"""torch.library integration of the `intl` ops: opcheck and torch.compile, reference backend on CPU.
Compiled results are checked against the literal float64 code with tests/_oracle.py's rule."""
import pytest
import torch

import intl_ops
from intl_ops import literal, reference
from _oracle import assert_matches_oracle, perturbed

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
    assert_matches_oracle("loss", out, out_lit)
    assert_matches_oracle("da", ga, ga_lit)
    assert_matches_oracle("db", gb, gb_lit)


def test_compile_check_detects_wrong_output(monkeypatch):
    """test_compile_fullgraph_forward_backward fails when the op the compiled graph calls is off in one
    element of y (or of dx)."""
    for fn, match in (("iternorm_fwd", "^loss: "), ("iternorm_bwd", "^da: ")):
        original = getattr(reference, fn)

        def wrong(*args, original=original, fn=fn):
            out = original(*args)
            return out._replace(y=perturbed(out.y)) if fn == "iternorm_fwd" else perturbed(out)

        with monkeypatch.context() as patch:
            patch.setattr(reference, fn, wrong)
            with pytest.raises(AssertionError, match=match):
                test_compile_fullgraph_forward_backward(1)


def test_compile_inductor_cpu():
    """The default inductor backend on CPU, forward and backward, fullgraph: within 2x the error of the
    eager (uncompiled) call in fp32."""
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: intl_ops.intl_loss([a, b], 4, 0, backend="reference"), fullgraph=True)
    a = torch.randn(8, 24, requires_grad=True)
    b = torch.randn(8, 24, requires_grad=True)
    out = fn(a, b)
    got = torch.autograd.grad(out, (a, b))
    eager = intl_ops.intl_loss([a, b], 4, 0, backend="reference")
    want = torch.autograd.grad(eager, (a, b))
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    oracle = literal.intl_loss([a64, b64], 4, 0)
    grads64 = torch.autograd.grad(oracle, (a64, b64))
    assert_matches_oracle("loss", out, oracle, ref=eager)
    for name, g, w, g64 in zip(("da", "db"), got, want, grads64, strict=True):
        assert_matches_oracle(name, g, g64, ref=w)
