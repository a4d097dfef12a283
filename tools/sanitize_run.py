"""One small forward + backward of every CUDA kernel, for compute-sanitizer (GPU machine only):

    compute-sanitizer --tool memcheck  --error-exitcode 1 python tools/sanitize_run.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tools/sanitize_run.py

Shapes: C = 37 (R = 16 slabs) and C = 200 (R = 32) through the one-launch Newton-Schulz kernels,
C = 300 through the centred Gram alone; fp32 and bf16 inputs, both axes, a batch of 2 views; each
Newton-Schulz kernel variant (backend_cuda.set_ns_variant: operand "dsmem" / "l2", cluster 8 / 16).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from intl_ops import backend_cuda, iternorm, intl_loss  # noqa: E402

print(backend_cuda.build())
# every kernel variant: the default, the forward's operand through L2, clusters of 16 blocks
for operand, cluster in (("dsmem", 8), ("l2", 8), ("dsmem", 16)):
    backend_cuda.set_ns_variant(operand=operand, cluster=cluster)
    for dtype in (torch.float32, torch.bfloat16):
        for m, d, axis in ((37, 53, 0), (61, 200, 1), (300, 40, 0)):
            x = torch.randn(m, d, device="cuda", dtype=dtype, requires_grad=True)
            iternorm(x, 4, axis, backend="cuda").float().square().sum().backward()
            v = torch.randn(2, m, d, device="cuda", dtype=dtype, requires_grad=True)
            intl_loss(v, 3, axis, backend="cuda").backward()
torch.cuda.synchronize()
backend_cuda.set_ns_variant()  # the defaults again
print("sanitize_run: done")
