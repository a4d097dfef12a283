#!/usr/bin/env python
"""Throughput of one rank's pretrain.py training step in a --world-GPU run, on synthetic data, per loss
implementation and autocast mode, and the loss head's share of the step (the GPU figure of the ResNet-50 step).

    python train/bench_step.py --out $OUT/train_step.json          # ResNet-50, 8 x 32 images, 2 x 224 px, bf16
    python train/bench_step.py --amps bf16 fp16 --losses triton literal
    python train/bench_step.py --device cpu --arch cnn --image-size 12 --batch-size 16 --world 4 \\
        --projector 32-32 --steps 1 --warmup 1 --losses reference literal          # smoke run, timings mean nothing

The real run (torchrun, --world processes) gives each rank --batch-size / --world images; intl_loss gathers
every rank's embeddings and each rank whitens the GLOBAL batch. This process is one such rank:
- the network (backbone + projector) runs on batch/world images per crop, wrapped in DistributedDataParallel
  as pretrain wraps it (gradient_as_bucket_view, static_graph, no buffer broadcast; --compile goes around
  DDP) over a real one-process group (nccl on CUDA, gloo on CPU), with SyncBatchNorm's multi-GPU kernels on
  CUDA (their all-gather spans this one process; on CPU the BN is local: a smoke run, not a measurement);
- the loss sees the global batch: this rank's embeddings (with gradient) concatenated along the sample axis
  with the other world-1 ranks' rows (the network's outputs on other synthetic batches, drawn once, no
  gradient) and called with process_group=None, so the gradient reaches the local rows only, as in the run;
- the step is pretrain's: its forward_loss (INTL = all crops through the online network; INTL-M (--ema) =
  crop 0 through the EMA encoder without gradient as the target), loss.item() (its non-finite check),
  backward of loss x world, SGD with its parameter groups, the EMA update. fp16 adds a GradScaler, like the
  official INTL code; the loss computes in fp32 inside intl_ops whatever it is given.
Not timed: the real run's communication, i.e. the embeddings' all-gather ("gather_comm": "not timed" in the
JSON), DDP's gradient all-reduce and SyncBatchNorm's statistics exchange over --world GPUs (all of them span
one process here).

--losses: `triton` / `cuda` / `reference` / `auto` = intl_ops.intl_loss with that backend; `literal` = the
reference code's eager autograd (intl_ops.literal, in fp32). One row per (loss, amp), keyed "loss/amp":
step_ms, images_per_s (GLOBAL-equivalent: per-rank images/s x world, i.e. world such GPUs with free
communication; comparable with pretrain.py's images/s), images_per_s_per_rank, loss_head_ms (forward +
backward of the loss alone on the step's global-shape embeddings, only the local rows requiring grad),
loss_head_share = loss_head_ms / step_ms, peak_step_MiB (CUDA), final_loss. Medians over --steps timed
runs after --warmup (CUDA events on a GPU, perf_counter on CPU). Prints one JSON line (also written to
--out) and a table on stderr.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules._functions import SyncBatchNorm as sync_bn  # the autograd function behind nn.SyncBatchNorm

import intl_ops
from intl_ops import literal
from pretrain import PROJECTOR, WEIGHT_DECAY, build_optimizer, ema_update, forward_loss, wrap_model
from ssl_models import INTLNet, convert_sync_bn
from ssl_run import git_sha

LOSSES = ("triton", "cuda", "reference", "auto", "literal")
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", choices=["cnn", "resnet18", "resnet50"])
    p.add_argument("--projector", help="default per arch: " + str(PROJECTOR))
    p.add_argument("--batch-size", type=int, default=256, help="GLOBAL batch, as pretrain.py's")
    p.add_argument("--world", type=int, default=8, help="GPUs of the run emulated: the network sees batch/world images")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--crops", type=int, default=2, help="crops per image, all at --image-size")
    p.add_argument("--ema", type=float, default=0.0, help="> 0: time the INTL-M step")
    p.add_argument("--losses", nargs="+", default=["triton", "literal"], choices=LOSSES)
    p.add_argument("--amps", nargs="+", choices=list(AMP), help="autocast of the network, one row each; "
                   "fp16 adds a GradScaler (the official code's setting); default: bf16 on CUDA, off on CPU")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile the DDP-wrapped network")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)
    a.projector = a.projector or PROJECTOR[a.arch]
    a.amps = a.amps or (["bf16"] if a.device.startswith("cuda") else ["off"])
    a.iters, a.axis, a.beta = 4, 0, None
    problems = [
        (a.world < 1 or a.batch_size < 2, f"--world must be >= 1 and --batch-size >= 2, got {a.world} and {a.batch_size}"),
        (a.batch_size % a.world or a.batch_size // a.world < 2,
         f"--batch-size {a.batch_size} (the GLOBAL batch) must be a multiple of --world {a.world}, at least 2 per rank"),
        (a.crops < 2, f"--crops must be >= 2, got {a.crops}"),
        (not 0 <= a.ema < 1, f"--ema must be in [0, 1), got {a.ema}"),
        (a.steps < 1 or a.warmup < 0, "--steps must be >= 1 and --warmup >= 0"),
        (int(os.environ.get("WORLD_SIZE", "1")) > 1, "run one process (not under torchrun): it emulates the other ranks"),
    ]
    for bad, msg in problems:
        if bad:
            p.error(msg)
    return a


def literal_loss(views, iters, axis, beta, *, target=None, backend=None, process_group=None, return_parts=False):
    """The eager reference code (autograd through every product), in fp32 like the intl_ops op."""
    loss = literal.intl_loss([v.float() for v in views], iters, axis, beta,
                             target=None if target is None else target.float())
    return loss, {}


class RankSyncBatchNorm(nn.SyncBatchNorm):
    """SyncBatchNorm taking its multi-GPU path (batch_norm_stats / gather / elemt kernels, a host sync per
    layer) in a one-process group, where torch's would fall back to cuDNN's batch norm: a rank's real cost."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        return sync_bn.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps, self.momentum,
                             dist.group.WORLD, 1)


def per_rank_net(args, in_channels: int, device, fmt) -> nn.Module:
    """INTLNet as a rank of the real run builds it (global-batch BN when world > 1)."""
    net = INTLNet(args.arch, args.projector, in_channels, args.image_size <= 64)
    if args.world > 1:
        net = convert_sync_bn(net, device)
        for m in net.modules():
            if type(m) is nn.SyncBatchNorm:
                m.__class__ = RankSyncBatchNorm
    return net.to(device, memory_format=fmt)


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


def with_other_ranks(loss_fn, other_views, other_target):
    """loss_fn as each rank of the real run applies it: on (K, batch, d), this rank's rows first (rank 0's
    place in the gather) then the other ranks' fixed rows; process_group=None, so no communication and the
    gradient reaches this rank's rows only, as intl_loss's gather (reduce_grads=False) gives it."""
    def global_loss(views, iters, axis, beta, *, target=None, backend="auto", process_group=None, return_parts=False):
        x = views if isinstance(views, torch.Tensor) else torch.stack(list(views))
        if other_views is not None:
            x = torch.cat([x, other_views], dim=1)
            target = torch.cat([target, other_target]) if target is not None else None
        global_loss.seen = list(x.shape)  # what the loss whitened: (K, global batch, d)
        return loss_fn(x, iters, axis, beta, target=target, backend=backend, process_group=None, return_parts=return_parts)
    return global_loss


def bench_row(args, device, name: str, amp: str, in_channels: int) -> dict:
    world, m = args.world, args.batch_size // args.world
    cuda, amp_dtype = device.type == "cuda", AMP[amp]
    fmt = torch.channels_last if cuda else torch.contiguous_format
    row_args = argparse.Namespace(**{**vars(args), "backend": "auto" if name == "literal" else name})
    g = torch.Generator(device=device).manual_seed(0)

    def batch():  # one rank's crops
        return [torch.randn(m, in_channels, args.image_size, args.image_size, device=device, generator=g)
                .contiguous(memory_format=fmt) for _ in range(args.crops)]

    torch.manual_seed(0)
    net = per_rank_net(args, in_channels, device, fmt)
    ema = copy.deepcopy(net).requires_grad_(False) if args.ema else None
    model = wrap_model(net, device, world > 1, args.compile)  # pretrain's DDP settings, compile around DDP
    opt = build_optimizer(net, WEIGHT_DECAY[args.arch], lr=1e-3)  # small lr: random data must not diverge
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    @torch.no_grad()
    def encode(crops):
        """(K, m, d) online embeddings and the EMA target (or None) of one rank's crops, without gradient."""
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            return torch.stack(net(crops[1:] if ema is not None else crops)), ema(crops[:1])[0] if ema is not None else None

    others = [encode(batch()) for _ in range(world - 1)]  # the other ranks' rows: drawn once, no gradient
    loss_fn = with_other_ranks(literal_loss if name == "literal" else intl_ops.intl_loss,
                               torch.cat([v for v, _ in others], dim=1) if others else None,
                               torch.cat([t for _, t in others]) if others and ema is not None else None)
    crops = batch()
    last = {}

    def step():  # pretrain.py's step
        loss, _, _ = forward_loss(model, ema, crops, row_args, amp_dtype, None, loss_fn)
        last["loss"], last["seen"] = loss.item(), loss_fn.seen  # pretrain reads the loss before the update (non-finite check)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss * world).backward()  # pretrain's scaling: DDP averages the ranks' gradients
        scaler.step(opt)  # without fp16: opt.step()
        scaler.update()
        if ema is not None:
            ema_update(ema, net, args.ema, 1, 2)

    local, local_target = encode(crops)
    local.requires_grad_()

    def head():  # the loss alone, forward + backward, on the step's global-shape embeddings
        local.grad = None
        (loss_fn(local, args.iters, args.axis, args.beta, target=local_target, backend=row_args.backend,
                 return_parts=True)[0] * world).backward()

    time_it = timer(device)
    for _ in range(args.warmup):
        step()
        head()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    step_s = statistics.median(time_it(step) for _ in range(args.steps))
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None
    head_s = statistics.median(time_it(head) for _ in range(args.steps))
    return {"loss": name, "amp": amp, "step_ms": step_s * 1e3, "images_per_s": args.batch_size / step_s,
            "images_per_s_per_rank": m / step_s, "loss_head_ms": head_s * 1e3, "loss_head_share": head_s / step_s,
            "peak_step_MiB": peak, "final_loss": last["loss"], "loss_input_seen": last["seen"]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    in_channels = 1 if args.arch == "cnn" else 3
    world, m, d = args.world, args.batch_size // args.world, int(args.projector.split("-")[-1])
    backend = "nccl" if cuda else "gloo"
    rows, store_dir = {}, tempfile.mkdtemp(prefix="bench_step_pg_")
    if world > 1:  # a real process group for DDP and SyncBatchNorm, of this one process
        if dist.is_initialized():
            raise RuntimeError("bench_step: a process group is already initialised; run it in a fresh process")
        dist.init_process_group(backend, store=dist.FileStore(os.path.join(store_dir, "store"), 1), rank=0,
                                world_size=1, device_id=device if cuda else None)
    try:
        for amp in args.amps:
            for name in args.losses:
                try:
                    rows[f"{name}/{amp}"] = bench_row(args, device, name, amp, in_channels)
                except Exception as e:  # e.g. a backend that cannot run here: report it and go on
                    rows[f"{name}/{amp}"] = {"loss": name, "amp": amp, "error": f"{type(e).__name__}: {e}"[:500]}
                if cuda:
                    torch.cuda.empty_cache()
    finally:
        if world > 1:
            dist.destroy_process_group()
        shutil.rmtree(store_dir, ignore_errors=True)

    k_online = args.crops - (1 if args.ema else 0)
    result = {"what": f"one rank's pretrain.py step of a {world}-GPU run, synthetic data", "arch": args.arch,
              "batch_size": args.batch_size, "world": world, "per_rank_batch": m, "image_size": args.image_size,
              "crops": args.crops, "objective": "INTL-M" if args.ema else "INTL",
              "backbone_input": [m, in_channels, args.image_size, args.image_size],
              "per_rank_embedding": [m, d], "embedding": [args.batch_size, d],
              "loss_input": [k_online, args.batch_size, d], "loss_target": [args.batch_size, d] if args.ema else None,
              "amps": args.amps, "compile": args.compile,
              "process_group": {"backend": backend, "size": 1, "ddp": world > 1, "gradient_as_bucket_view": world > 1,
                                "sync_bn": ("SyncBatchNorm kernels" if cuda else "local BatchNorm") if world > 1 else None},
              "gather_comm": "not timed", "also_not_timed": ["DDP gradient all-reduce", "SyncBatchNorm statistics exchange"],
              "images_per_s_is": "global-equivalent: images_per_s_per_rank x world", "results": rows,
              "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "torch": torch.__version__, "triton": _version("triton"), "git_sha": git_sha(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    line = json.dumps(result)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print_table(result)
    print(line, flush=True)
    return result


def print_table(r: dict) -> None:
    print(f"{r['arch']} {r['objective']}: {r['world']} ranks x {r['per_rank_batch']} images x {r['crops']} crops of "
          f"{r['image_size']} px, loss on {r['loss_input']}, {r['device']} (communication not timed)", file=sys.stderr)
    print(f"{'row':<18} {'step ms':>9} {'img/s global':>12} {'img/s rank':>10} {'head ms':>8} {'head %':>7} {'peak MiB':>9}",
          file=sys.stderr)
    for key, v in r["results"].items():
        if "error" in v:
            print(f"{key:<18} {v['error'][:100]}", file=sys.stderr)
            continue
        peak = f"{v['peak_step_MiB']:.0f}" if v["peak_step_MiB"] is not None else "-"
        print(f"{key:<18} {v['step_ms']:>9.2f} {v['images_per_s']:>12.1f} {v['images_per_s_per_rank']:>10.1f} "
              f"{v['loss_head_ms']:>8.2f} {100 * v['loss_head_share']:>6.1f}% {peak:>9}", file=sys.stderr)


def _version(module: str):
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
