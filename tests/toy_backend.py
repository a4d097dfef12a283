"""A toy backend, the whole of what a new backend needs: this file plus one registry line
(`intl_ops.backends.register("toy", "tests.toy_backend")`, or an entry in intl_ops.backends.REGISTRY).

It provides only the IterNorm forward (delegating to the reference and counting its calls); every
other op, the backward included, runs the reference, which reads the same saved layout.
"""
import torch

from intl_ops import reference

calls = {"iternorm_fwd": 0}


def supports(op: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> str | None:
    if dtype == torch.float16:
        return "the toy backend does not take float16"
    return None


def iternorm_fwd(x: torch.Tensor, iters: int, axis: int) -> reference.IterNormSaved:
    calls["iternorm_fwd"] += 1
    return reference.iternorm_fwd(x, iters, axis)
