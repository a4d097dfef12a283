"""Roofline floors: the FLOPs and minimum bytes of every benchmarked op, and the device's peaks.

Notation (docs/math.md §2): each view is an (N observations x C variables) matrix A; axis=0 means
N = d, C = m; axis=1 means N = m, C = d. K views, T Newton steps, `e` bytes per input element.

FLOPs count a matmul (a x b) @ (b x c) as 2abc, and every product in full: the symmetric ones
(Sigma, the iterates) are counted both ways, as a dense GEMM would compute them. The algorithm
counted is the cheapest one we know (docs/math.md §3 and §5), not what any provider happens to do:
    iternorm forward   Sigma 2NC^2 + Newton 3 products/step for steps 2..T (P^2, P^3, P^3 S;
                       step 1 is the closed form 1.5 I - 0.5 S) + Y = Ac W 2NC^2
                       = 4NC^2 + 6(T-1)C^3, plus ~6NC elementwise (mean, centre, variances).
    iternorm backward  Wbar = Ac^T Ybar, Acbar = Ybar W^T, Ac (Sigmabar + Sigmabar^T): 6NC^2;
                       6 products per step for steps T..2 (docs/math.md §5; step 1 has none):
                       12(T-1)C^3, plus ~6NC elementwise.
    (full = 10NC^2 + 18(T-1)C^3: 27 C^3-sized products at T=4, the literal code does 31;
    tests/test_bench.py counts them.)
    trace_loss         forward ~4NC (mean, subtract, square, sum), backward ~4NC.
    nmse (per pair)    forward ~6md (a.b, |a|^2, |b|^2), backward ~10md.
    intl_loss          K iternorms + (K-1) nmse pairs (the trace loss comes from the C-vector v).
    whiten zca         Sigma 2NC^2 + eigh ~9C^3 (tridiagonalisation 4/3 C^3 + QR/divide-and-conquer
                       and back-transformation ~8C^3, a textbook estimate) + W = U g U^T 2C^3 + Y 2NC^2.
    whiten cholesky    Sigma 2NC^2 + Cholesky C^3/3 + triangular solve Ac L^-T NC^2.
    The whiten backward is estimated as 2x its forward (an autograd rule of thumb, not a count).
Minimum bytes: each input read once and each output written once, nothing else (saved tensors,
C x C intermediates and workspaces are the implementation's choice, not the op's):
    forward  reads x, writes y (iternorm/whiten) or a scalar (losses: 4 bytes, ignored);
    backward reads x and dy (iternorm/whiten; losses have a scalar dy), writes dx;
    full     reads x (and dy), writes y (iternorm/whiten) and dx.
floor = max(FLOPs / peak FLOP/s, bytes / peak bytes/s); a row's "x floor" is time / floor. The
FLOP/s peak is that of the row's input precision, or fp32's when faster (a bf16 input may be computed
in fp32: on CPUs without bf16 units fp32 is the faster path); fp32 rows use tf32 with --tf32 only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# H200 ceilings (the project's GPU notes): copy measured on such a machine (bytes read + written),
# bf16 matmul measured at 8192^3; tf32 about half of bf16; fp32 without tensor cores ~67 TFLOP/s.
H200 = {"bytes_per_s": 4.3e12, "bf16": 790e12, "fp16": 790e12, "tf32": 395e12, "fp32": 67e12}

ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


@dataclass(frozen=True)
class Work:
    flops: float
    bytes: float


def dims(m: int, d: int, axis: int) -> tuple[int, int]:
    """(N observations, C variables) of an (m, d) view."""
    return (d, m) if axis == 0 else (m, d)


def iternorm_flops(N: int, C: int, T: int) -> tuple[float, float]:
    """(forward, backward) FLOPs of one IterNorm of an N x C matrix with T steps (module docstring)."""
    steps = max(T - 1, 0)
    fwd = 4 * N * C**2 + 6 * steps * C**3 + 6 * N * C
    bwd = 6 * N * C**2 + 12 * steps * C**3 + 6 * N * C
    return float(fwd), float(bwd)


def whiten_flops(method: str, N: int, C: int, T: int) -> tuple[float, float]:
    if method == "iternorm":
        return iternorm_flops(N, C, T)
    if method == "zca":
        fwd = 4 * N * C**2 + 9 * C**3 + 2 * C**3
    elif method == "cholesky":
        fwd = 2 * N * C**2 + C**3 / 3 + N * C**2
    else:
        raise ValueError(f"unknown whitening method {method!r}")
    return float(fwd), float(2 * fwd)


def work(op: str, mode: str, m: int, d: int, axis: int, iters: int, k: int, dtype: str,
         method: str | None = None) -> Work:
    """FLOPs and minimum bytes of one call of `op` in `mode` (forward / backward / full)."""
    N, C = dims(m, d, axis)
    e = ELEMENT_BYTES[dtype]
    x_bytes = k * m * d * e  # all K views
    if op in ("iternorm", "whiten"):
        f, b = iternorm_flops(N, C, iters) if op == "iternorm" else whiten_flops(method or "iternorm", N, C, iters)
        io = {"forward": 2 * x_bytes, "backward": 3 * x_bytes, "full": 4 * x_bytes}
    elif op == "trace_loss":
        f, b = 4.0 * N * C, 4.0 * N * C
        io = {"forward": x_bytes, "backward": 2 * x_bytes, "full": 2 * x_bytes}
    elif op == "intl_loss":
        fi, bi = iternorm_flops(N, C, iters)
        f = k * fi + (k - 1) * 6.0 * m * d
        b = k * bi + (k - 1) * 10.0 * m * d
        io = {"forward": x_bytes, "backward": 2 * x_bytes, "full": 2 * x_bytes}
    else:
        raise ValueError(f"unknown op {op!r}")
    flops = {"forward": f, "backward": b, "full": f + b}[mode]
    return Work(float(flops), float(io[mode]))


def peak_flops_keys(dtype: str, tf32: bool) -> tuple[str, ...]:
    """The precisions a row may compute in: its input precision or any finer one (bf16/fp16 inputs
    may be computed in fp32, as intl_ops does); fp32 rows use tf32 only when it is enabled."""
    if dtype in ("bf16", "fp16"):
        return (dtype, "fp32")
    if dtype == "fp32" and tf32:
        return ("tf32",)
    return (dtype,)


def floor_seconds(w: Work, peaks: dict, dtype: str, tf32: bool = False) -> float | None:
    """max(FLOPs / the fastest allowed peak, bytes / bandwidth), or None without the peaks."""
    rates = [peaks[k] for k in peak_flops_keys(dtype, tf32) if isinstance(peaks.get(k), (int, float))]
    if not rates or not peaks.get("bytes_per_s"):
        return None
    return max(w.flops / max(rates), w.bytes / peaks["bytes_per_s"])


# ------------------------------------------------------------------ measuring peaks
def _best_seconds(fn, reps: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_peaks(device: torch.device, quick: bool = False) -> dict:
    """Peaks measured here: best-of-N time of a square matmul per dtype (2n^3 FLOPs) and of a large
    copy (bytes read + written). Used on CPU and on GPUs other than the H200 (whose table is above).
    These are achieved ceilings, not datasheet numbers, so time / floor >= 1 is expected."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = (1024 if quick else 2048) if device.type == "cpu" else 8192
    numel = (64 if device.type == "cpu" else 512) * 2**20 // 4
    peaks: dict = {"method": f"measured now: best of 5 {n}^3 matmuls per dtype (bf16 {n // 2}^3 on CPU), best of 5 "
                             f"copy_ of {numel * 4 >> 20} MiB, {torch.get_num_threads()} threads"}
    for key, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        nn = n if key == "fp32" or device.type == "cuda" else n // 2  # CPU bf16 can be slow
        a = torch.randn(nn, nn, device=device, dtype=dt)
        b = torch.randn(nn, nn, device=device, dtype=dt)
        peaks[key] = 2 * nn**3 / _best_seconds(lambda: a @ b, 5, sync)
    peaks["fp16"] = peaks["bf16"]
    peaks["tf32"] = peaks["fp32"]  # torch's fp32 matmul default (no tf32)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    peaks["bytes_per_s"] = 2 * src.numel() * 4 / _best_seconds(lambda: dst.copy_(src), 5, sync)
    return peaks


def device_peaks(device: torch.device, quick: bool = False) -> dict:
    """The ceilings a row's floor uses on `device`: the H200 table or numbers measured now."""
    if device.type == "cuda" and "H200" in torch.cuda.get_device_name(device):
        return {**H200, "method": "H200 table (bench/roofline.py): 4.3 TB/s copy, 790 TFLOP/s bf16, tf32 half, fp32 67"}
    return measure_peaks(device, quick)
