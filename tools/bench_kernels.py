"""Times the CUDA backend's kernels and its knobs on a GPU (the lent machine), to settle the defaults.

    python tools/bench_kernels.py [--views 2 --m 256 --d 8192 --iters 4] [--out DIR]

At the reference default (K views of 256 x 8192, axis=0: C = 256, N = 8192) it times, with CUDA
events (median, p20, p80 over repeats after warm-up):
  - the one-launch Newton-Schulz forward / backward (torch.ops.intl_cuda.ns_fwd / ns_bwd) for each kernel
    variant (backend_cuda.set_ns_variant: remote operand from DSMEM or L2; clusters of 8 or 16 blocks),
    against the reference loop;
  - the centred Gram and the three N x C products against their torch equivalents (fp32 cuBLAS);
  - iternorm_fwd and fwd+bwd of intl_loss for every backend that is available (reference, triton, cuda).
Prints a markdown table and writes bench_kernels.json / .md under --out (default $OUT if set).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import intl_ops  # noqa: E402
from intl_ops import backend_cuda, reference  # noqa: E402

# every (operand, cluster) of backend_cuda.set_ns_variant: ("dsmem", 8), ("dsmem", 16), ("l2", 8), ("l2", 16)
NS_VARIANTS = list(itertools.product(backend_cuda.NS_OPERANDS, backend_cuda.NS_CLUSTERS))


def timeit(fn, reps: int = 50, warmup: int = 10) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)  # us
    q = statistics.quantiles(times, n=10)
    return {"median_us": statistics.median(times), "p20_us": q[1], "p80_us": q[7]}


def ns_reference(S: torch.Tensor, iters: int):
    """The reference's Newton-Schulz loop alone (what ns_fwd replaces)."""
    C = S.shape[-1]
    eye = torch.eye(C, device=S.device).expand_as(S)
    P = 1.5 * eye - 0.5 * S
    for _ in range(1, iters):
        P2 = P @ P
        P3 = P2 @ P
        P = torch.baddbmm(P, P3, S, beta=1.5, alpha=-0.5)
    return P


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--d", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    print(backend_cuda.build())
    dev = torch.device("cuda")
    K, m, d, T = args.views, args.m, args.d, args.iters
    x = torch.randn(K, m, d, device=dev)
    a = reference.as_observations(x, 0)
    mean = a.mean(1)
    sigma = torch.ops.intl_cuda.centered_gram(a, mean)
    S, tr, Ps, powers, v = torch.ops.intl_cuda.ns_fwd(sigma, T)
    wbar = torch.randn_like(S)
    rows = []

    def add(what, variant, fn):
        r = {"what": what, "variant": variant, **timeit(fn)}
        rows.append(r)
        print(f"| {what} | {variant} | {r['median_us']:.1f} | {r['p20_us']:.1f} | {r['p80_us']:.1f} |", flush=True)

    print("| what | variant | median us | p20 | p80 |\n|---|---|---|---|---|")
    for operand, cluster in NS_VARIANTS:
        backend_cuda.set_ns_variant(operand=operand, cluster=cluster)
        name = f"{operand}, {cluster}"
        add("ns_fwd (one launch)", name, lambda: torch.ops.intl_cuda.ns_fwd(sigma, T))
        add("ns_bwd (one launch)", name, lambda: torch.ops.intl_cuda.ns_bwd(wbar, S, tr, Ps, powers, T, a.shape[1]))
    backend_cuda.set_ns_variant()  # the defaults for the rest
    add("Newton-Schulz forward", "reference (torch)", lambda: ns_reference(S, T))
    add("centred Gram", "cuda kernel", lambda: torch.ops.intl_cuda.centered_gram(a, mean))
    add("centred Gram", "torch", lambda: (lambda ac: ac.mT @ ac / (a.shape[1] - 1))(a - a.mean(1, keepdim=True)))
    W = Ps[:, -1] * tr.rsqrt()[:, None, None]
    g = torch.randn_like(a)
    add("y = Ac W", "cuda kernel", lambda: torch.ops.intl_cuda.centered_matmul(a, mean, W, True))
    add("y = Ac W", "torch", lambda: W.mT @ (a - mean[:, None, :]).mT)
    add("Wbar = Ac^T Ybar", "cuda kernel", lambda: torch.ops.intl_cuda.centered_tmatmul(a, mean, g))
    add("Wbar = Ac^T Ybar", "torch", lambda: (a - mean[:, None, :]).mT @ g)
    add("Ybar W^T + Ac M", "cuda kernel", lambda: torch.ops.intl_cuda.grad_input(g, W, a, mean, W, True))
    add("Ybar W^T + Ac M", "torch", lambda: torch.baddbmm(g @ W.mT, a - mean[:, None, :], W))
    views = x.clone().requires_grad_(True)
    for backend, status in intl_ops.available_backends(dev).items():
        if status != "available":
            print(f"(backend {backend}: {status})")
            continue
        add("iternorm_fwd", backend, lambda: torch.ops.intl.iternorm_fwd(x, T, 0, backend))
        add("intl_loss fwd+bwd", backend, lambda: intl_ops.intl_loss(views, T, 0, backend=backend).backward())

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [K, m, d], "iters": T,
            "axis": 0, "built": backend_cuda._loaded}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_kernels.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        lines = [f"{meta}", "", "| what | variant | median us | p20 | p80 |", "|---|---|---|---|---|"]
        lines += [f"| {r['what']} | {r['variant']} | {r['median_us']:.1f} | {r['p20_us']:.1f} | {r['p80_us']:.1f} |"
                  for r in rows]
        (out / "bench_kernels.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
