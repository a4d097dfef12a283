"""The backend registry: a backend is one module plus one registry line, declares what it supports,
and every call runs the named backend where it supports it, the reference elsewhere."""
import pytest
import torch

import intl_ops
from intl_ops import backends, reference
from tests import toy_backend


@pytest.fixture
def toy(monkeypatch):
    """Registers tests/toy_backend.py as "toy" (first among the auto candidates) for one test."""
    registry = {"toy": backends.Entry("tests.toy_backend", auto=("cpu",)), **backends.REGISTRY}
    monkeypatch.setattr(backends, "REGISTRY", registry)
    backends._load.cache_clear()
    toy_backend.calls["iternorm_fwd"] = 0
    yield toy_backend.calls
    backends._load.cache_clear()


def _run(x, backend):
    x = x.clone().requires_grad_(True)
    y = intl_ops.iternorm(x, 3, 1, backend=backend)
    y.backward(torch.ones_like(y) + torch.arange(y.numel()).reshape(y.shape) / y.numel())
    return y.detach(), x.grad


def test_toy_backend_runs_its_forward_and_the_reference_backward(toy):
    assert "toy" in backends.registered() and "toy" in backends.names()
    assert intl_ops.available_backends("cpu")["toy"] == "available"
    x = torch.randn(23, 7, dtype=torch.float64)
    y, gx = _run(x, "toy")
    assert toy["iternorm_fwd"] == 1
    y_ref, gx_ref = _run(x, "reference")
    assert toy["iternorm_fwd"] == 1  # the reference run did not go through the toy
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)


def test_supports_names_what_a_backend_does_not_take(toy):
    cpu = torch.device("cpu")
    assert backends.supports("toy", "iternorm_fwd", (23, 7), torch.float32, cpu) is None
    assert "does not provide iternorm_bwd" in backends.supports("toy", "iternorm_bwd", (23, 7), torch.float32, cpu)
    assert "float16" in backends.supports("toy", "iternorm_fwd", (23, 7), torch.float16, cpu)
    assert backends.select("toy", "iternorm_bwd", (23, 7), torch.float32, cpu) == "reference"
    assert backends.select("toy", "iternorm_fwd", (23, 7), torch.float16, cpu) == "reference"
    with pytest.raises(ValueError, match="op must be one of"):
        backends.supports("toy", "iternorm", (23, 7), torch.float32, cpu)


def test_auto_on_cpu_is_the_reference_without_other_candidates():
    """The Triton interpreter is a test tool: "auto" never picks triton for CPU tensors."""
    cpu = torch.device("cpu")
    assert backends.resolve("auto", cpu) == "reference"
    assert backends.select("auto", "iternorm_fwd", (23, 7), torch.float32, cpu) == "reference"


def test_auto_takes_the_first_candidate_that_supports_the_call(toy):
    cpu = torch.device("cpu")
    assert backends.select("auto", "iternorm_fwd", (23, 7), torch.float32, cpu) == "toy"
    assert backends.resolve("auto", cpu) == "toy"
    intl_ops.iternorm(torch.randn(23, 7), 2, 1)
    assert toy["iternorm_fwd"] == 1
    # float16 is declined by the toy: the next auto candidate that supports it, or the reference
    picked = backends.select("auto", "iternorm_fwd", (23, 7), torch.float16, cpu)
    assert picked != "toy" and backends.supports(picked, "iternorm_fwd", (23, 7), torch.float16, cpu) is None


def test_register_and_unregister(monkeypatch):
    monkeypatch.setattr(backends, "REGISTRY", dict(backends.REGISTRY))
    backends.register("toy2", "tests.toy_backend")
    assert backends.registered()[-1] == "toy2" and backends.REGISTRY["toy2"].auto == ()
    backends.unregister("toy2")
    assert "toy2" not in backends.registered()
    with pytest.raises(ValueError, match="cannot be removed"):
        backends.unregister("reference")
    with pytest.raises(ValueError, match="other than 'auto'"):
        backends.register("auto", "tests.toy_backend")
    with pytest.raises(TypeError, match="tuple of device types"):
        backends.register("toy3", "tests.toy_backend", auto="cuda")
    backends._load.cache_clear()


def test_a_backend_that_does_not_import_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(backends, "REGISTRY", {**backends.REGISTRY, "broken": backends.Entry("tests.no_such_module")})
    backends._load.cache_clear()
    try:
        assert "ModuleNotFoundError" in intl_ops.available_backends("cpu")["broken"]
        with pytest.raises(RuntimeError, match="backend='broken' cannot run on cpu"):
            intl_ops.iternorm(torch.randn(5, 4), backend="broken")
        with pytest.raises(RuntimeError, match="backend='broken' cannot run on cpu"):
            torch.ops.intl.iternorm_fwd(torch.randn(5, 4), 2, 0, "broken")
    finally:
        backends._load.cache_clear()


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="backend must be one of"):
        intl_ops.iternorm(torch.randn(5, 4), backend="nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        torch.ops.intl.iternorm_fwd(torch.randn(5, 4), 2, 0, "nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        intl_ops.spectral_transform(torch.randn(9, 4), backend="nope")


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_spectral_transform_dispatches_like_the_other_ops(backend):
    """No backend but the reference provides the transform: every backend name gives its result."""
    if backend != "auto" and backends.unavailable_reason(backend, "cpu") is not None:
        pytest.skip(backends.unavailable_reason(backend, "cpu"))
    assert backends.select(backend, "spectral_transform_fwd", (9, 4), torch.float64, torch.device("cpu")) == "reference"
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    y = intl_ops.spectral_transform(x, 0.5, 1, backend=backend)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = torch.stack(list(reference.spectral_transform_fwd(x2.detach(), 0.5, 1, 0.0)[:1]))[0]
    torch.testing.assert_close(y.detach(), y2, rtol=0, atol=0)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
