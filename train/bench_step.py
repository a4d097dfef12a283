#!/usr/bin/env python
"""Throughput of one pretrain.py training step on synthetic data, per loss implementation, and the
loss head's share of the step: issue 6's GPU figure (ResNet-50, global batch 256, 2 x 224 px, bf16).

    python train/bench_step.py --out $OUT/train_step.json                  # GPU defaults (the issue's setting)
    python train/bench_step.py --device cpu --arch cnn --image-size 16 --batch-size 32 --projector 64-64 --steps 3

For each --losses entry: `triton` / `cuda` / `reference` / `auto` = intl_ops.intl_loss with that backend,
`literal` = intl_ops.literal.intl_loss (the reference code's eager autograd, in fp32 as the op computes).
Per loss: the full step (forward under bf16 autocast, loss, backward, SGD step) and the loss head alone
(forward + backward of the loss on embeddings of the step's shape), medians over --steps timed runs after
--warmup (CUDA events on a GPU, perf_counter on CPU). Prints one JSON line (also written to --out).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import intl_ops
from intl_ops import literal
from pretrain import PROJECTOR, forward_loss
from ssl_models import INTLNet
from ssl_run import git_sha


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", choices=["cnn", "resnet18", "resnet50"])
    p.add_argument("--projector", help="default per arch: " + str(PROJECTOR))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--crops", type=int, default=2, help="crops per image, all at --image-size")
    p.add_argument("--ema", type=float, default=0.0, help="> 0: time the INTL-M step")
    p.add_argument("--losses", nargs="+", default=["triton", "literal"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, help="bf16 autocast; default: on for CUDA")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)
    a.projector = a.projector or PROJECTOR[a.arch]
    a.amp = a.device.startswith("cuda") if a.amp is None else a.amp
    a.iters, a.axis, a.beta = 4, 0, None
    return a


def literal_loss(views, iters, axis, beta, *, target=None, backend=None, process_group=None, return_parts=False):
    """The eager reference code (autograd through every product), in fp32 like the intl_ops op."""
    loss = literal.intl_loss([v.float() for v in views], iters, axis, beta,
                             target=None if target is None else target.float())
    return loss, {}


def timer(device: torch.device):
    """A function that runs fn() and returns its seconds (CUDA events on a GPU)."""
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return run

    def run_cpu(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return run_cpu


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    time_it = timer(device)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    g = torch.Generator(device=device).manual_seed(0)
    in_channels = 1 if args.arch == "cnn" else 3
    crops = [torch.randn(args.batch_size, in_channels, args.image_size, args.image_size, device=device, generator=g)
             .contiguous(memory_format=fmt) for _ in range(args.crops)]
    rows = {}
    for name in args.losses:
        loss_fn = literal_loss if name == "literal" else intl_ops.intl_loss
        args.backend = "auto" if name == "literal" else name
        torch.manual_seed(0)
        net = INTLNet(args.arch, args.projector, in_channels, args.image_size <= 64).to(device, memory_format=fmt)
        ema = INTLNet(args.arch, args.projector, in_channels, args.image_size <= 64).to(device, memory_format=fmt) \
            .requires_grad_(False) if args.ema else None
        if args.compile:
            net.compile()
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

        def step():
            loss, _, _ = forward_loss(net, ema, crops, args, args.amp, None, loss_fn)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            shape_src = net(crops[:1])[0]
        n_views = args.crops - (1 if args.ema else 0)
        emb = [torch.randn(shape_src.shape, device=device, dtype=shape_src.dtype, generator=g).requires_grad_()
               for _ in range(n_views)]
        target = torch.randn(shape_src.shape, device=device, dtype=shape_src.dtype, generator=g) if args.ema else None

        def head():
            loss, _ = loss_fn(emb, args.iters, args.axis, args.beta, target=target, backend=args.backend,
                              process_group=None, return_parts=True)
            loss.backward()

        try:
            for _ in range(args.warmup):
                step()
                head()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step_s = statistics.median(time_it(step) for _ in range(args.steps))
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
            head_s = statistics.median(time_it(head) for _ in range(args.steps))
            rows[name] = {"step_ms": step_s * 1e3, "images_per_s": args.batch_size / step_s, "loss_head_ms": head_s * 1e3,
                          "loss_head_share": head_s / step_s, "peak_step_MiB": peak}
        except Exception as e:  # e.g. a backend that cannot run here: report it and go on
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
        del net, ema, opt, emb
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"what": "pretrain.py step, synthetic data", "arch": args.arch, "batch_size": args.batch_size,
              "image_size": args.image_size, "crops": args.crops, "objective": "INTL-M" if args.ema else "INTL",
              "embedding": list(shape_src.shape), "amp_bf16": args.amp, "compile": args.compile, "results": rows,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "triton": _version("triton"), "git_sha": git_sha(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    line = json.dumps(result)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)
    return result


def _version(module: str):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
