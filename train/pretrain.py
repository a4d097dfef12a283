#!/usr/bin/env python
"""INTL / INTL-M self-supervised pretraining ("Modulate Your Spectrum in Self-Supervised Learning",
Weng et al., ICLR 2024) with intl_ops.intl_loss, on one CPU process or many GPUs under torchrun.

    python train/pretrain.py                                     # the bundled digits demo (make train)
    torchrun --nproc_per_node 8 train/pretrain.py --data /imagenet --preset intl-m-imagenet-100ep
    python train/pretrain.py --preset intl-m-imagenet-800ep --data /imagenet --print-config

Flags left unset take the preset's values (--preset: the official recipes), else per-dataset defaults
(digits: small CNN, 40 epochs; ImageFolder: the official ImageNet recipe, ResNet-50); `--help` states
them. The run folder holds run.json (args, versions, git SHA), log.jsonl, TensorBoard scalars, ckpt_*.pt,
plots and summary.json. The last printed line is a JSON summary. SIGTERM / SIGUSR1 save a checkpoint
and exit cleanly; rerunning the same command continues the run.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # intl_ops from the repo root

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import intl_ops
from ssl_data import (CropSpec, DataError, DigitsViews, EpochSampler, FolderImages, FolderViews, SyntheticViews,
                      TensorImages, check_image_folder, digits_normalize, load_digits_split, multi_crop_specs,
                      to_model_input, two_crop_specs)
from ssl_models import (ARCHS, INTLNet, convert_sync_bn, embedding_effective_rank, extract_features, knn_accuracy,
                        linear_probe_accuracy, shard_sampler)
from ssl_run import (JsonLog, Progress, StopRequest, atomic_save, barrier, check_same_run, checkpoint_path,
                     cleanup, clear_checkpoints, good_checkpoints, init_distributed, make_output_dir,
                     prune_checkpoints, read_jsonl, resolve_resume, run_cli, run_metadata)

PROJECTOR = {"cnn": "512-512-512", "resnet18": "2048-2048-2048", "resnet50": "8192-8192-8192"}  # docs/math.md §7
BASE_LR = {"cnn": 0.3, "resnet18": 0.3, "resnet50": "0.5 up to 100 epochs, 0.4 up to 400, else 0.3"}
WEIGHT_DECAY = {"cnn": 1e-5, "resnet18": 1e-4, "resnet50": 1e-5}
# The official recipes (winci-ai/INTL scripts/*.sh and cfg.py) and the paper's linear top-1 for each.
PRESETS = {
    **{f"intl-m-imagenet-{e}ep": dict(arch="resnet50", epochs=e, base_lr=lr, ema=0.996, multi_crop=True,
                                      published=f"{top1} % ImageNet linear top-1 (ResNet-50, INTL-M, multi-crop)")
       for e, lr, top1 in ((100, 0.5, 73.5), (200, 0.4, 75.2), (400, 0.4, 76.1), (800, 0.3, 76.6))},
    "intl-imagenet-800ep": dict(arch="resnet50", epochs=800, base_lr=0.3, published="73.1 % ImageNet linear top-1 (ResNet-50)"),
    "intl-imagenet100-400ep": dict(arch="resnet18", batch_size=128, projector="4096-4096-4096", epochs=400, base_lr=0.5,
                                   weight_decay=2.5e-5, published="81.68 % ImageNet-100 linear top-1 (ResNet-18)"),
    **{f"intl-{name}-1000ep": dict(arch="resnet18", image_size=32, projector="2048-2048-2048", epochs=1000, base_lr=0.3,
                                   weight_decay=1e-4, blur_prob=[0.0], published=f"{top1} % {name.upper()} linear top-1 (ResNet-18)")
       for name, top1 in (("cifar10", 92.60), ("cifar100", 70.88))},
}
# Flags that may change between a checkpoint and its resumption (everything else must match). The data
# may move (e.g. to node-local disk); its size is checked instead.
RESUME_FREE = {"output_dir", "resume", "workers", "log_every", "eval_every", "ckpt_every_steps", "keep_checkpoints",
               "compile", "device", "max_steps", "tensorboard", "crash_at_step", "nan_at_step", "knn_bank", "knn_queries",
               "knn_k", "data", "backend", "print_config", "preset", "published", "print_every"}
REQUIRED = ("net", "optimizer", "step", "args")  # what a pretrain checkpoint must hold


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="an official recipe: it sets the flags you leave "
                   "unset (see --print-config); its published figure is in train/README.md")
    p.add_argument("--print-config", action="store_true", help="print the resolved flags as JSON and exit")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["digits", "imagefolder", "synthetic"],
                   help="default: imagefolder when --data is given, else digits (sklearn's 1797 8x8 images, no download)")
    g.add_argument("--data", help="ImageFolder root with train/<class>/<img> and (for the kNN monitor) val/")
    g.add_argument("--image-size", type=int, help="crop size: 8 for digits, 224 otherwise (32 for CIFAR-like data)")
    g.add_argument("--multi-crop", action="store_true", default=None, help="the official multi-crop: 2 crops of "
                   "--image-size plus crops of 192, 160, 128, 96 scaled by --image-size/224, area (min-scale c/224, c/224)")
    g.add_argument("--crop-min-scale", type=float, help="smallest crop area of the two large crops: 0.08 (0.2 with --multi-crop)")
    g.add_argument("--blur-prob", type=float, nargs="+", help="Gaussian blur probability per crop (one value: all "
                   "crops): 1.0 0.1 for two crops (the asymmetric BYOL recipe), 0.5 for every multi-crop")
    g.add_argument("--solarize-prob", type=float, nargs="+", help="solarisation probability per crop: 0.0 0.2 for "
                   "two crops, 0.1 for every multi-crop")
    g.add_argument("--workers", type=int, help="DataLoader workers per process: 0 for digits, else 8")
    g.add_argument("--synthetic-size", type=int, default=4096, help="samples of --dataset synthetic")
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHS, help="cnn (small, digits default) or torchvision resnet18/resnet50 (default)")
    g.add_argument("--small-stem", action=argparse.BooleanOptionalAction,
                   help="ResNet CIFAR variant (3x3 stride-1 stem, no max-pool); default: on when --image-size <= 64")
    g.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction, default=False,
                   help="zero-init each residual branch's last BN (off, as in the official code)")
    g.add_argument("--projector", help="hidden-...-embedding sizes; default per docs/math.md §7: " + str(PROJECTOR))
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="default: on for CUDA")
    g.add_argument("--compile", action="store_true", help="torch.compile the (DDP-wrapped) network")
    g = p.add_argument_group("objective (docs/math.md §4)")
    g.add_argument("--ema", type=float, help="INTL-M: EMA target encoder with base momentum m0 "
                   "(0.996 on ImageNet), m_t = 1 - (1 - m0)(1 + cos(pi t/T))/2; 0 (default) = plain INTL")
    g.add_argument("--iters", type=int, default=4, help="IterNorm Newton steps T")
    g.add_argument("--axis", type=int, choices=[0, 1], default=0, help="0: whiten the samples (reference), 1: the features")
    g.add_argument("--beta", type=float, help="trace-loss weight; default 0.01 (log2(n) - 3), n = global batch (axis 0) or d")
    g.add_argument("--backend", default="auto", help="intl_ops backend: auto (fastest usable), reference, triton, cuda")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="default: 40 for digits, 100 otherwise")
    g.add_argument("--batch-size", type=int, help="GLOBAL batch, split over the processes: 128 for digits, else 256")
    g.add_argument("--base-lr", type=float, help="lr = base-lr x batch-size / 256; default " + str(BASE_LR))
    g.add_argument("--weight-decay", type=float, help="not applied to 1-D params; default " + str(WEIGHT_DECAY))
    g.add_argument("--warmup-epochs", type=float, default=2.0, help="linear warm-up, then cosine to --final-lr x lr")
    g.add_argument("--final-lr", type=float, default=0.001, help="final lr as a fraction of the peak lr")
    g.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto", help="bf16 autocast; auto: on for CUDA")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", help="default: runs/<dataset>-<arch>-<intl|intlm>")
    g.add_argument("--resume", default="auto", help="auto: newest good checkpoint of --output-dir (a fresh start if "
                   "it has none; refused if it has some and none loads); none: start over (deletes its checkpoints); "
                   "or a checkpoint file")
    g.add_argument("--ckpt-every-steps", type=int, default=0, help="also checkpoint every N steps (0: every epoch only)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="newest good checkpoints kept (unreadable files are never deleted)")
    g.add_argument("--log-every", type=int, help="steps between log.jsonl / TensorBoard records: 1 for digits, else 10")
    g.add_argument("--print-every", type=int, default=100, help="steps between progress lines when stderr is not a "
                   "terminal (a live bar when it is), and at each epoch's end")
    g.add_argument("--eval-every", type=int, default=10, help="epochs between kNN monitor runs (0: only at the end)")
    g.add_argument("--knn-k", type=int, help="neighbours of the kNN monitor: 5 for digits, 20 otherwise")
    g.add_argument("--knn-bank", type=int, default=20000, help="training images in the kNN bank (ImageFolder)")
    g.add_argument("--knn-queries", type=int, default=10000, help="val images queried by the kNN monitor (ImageFolder)")
    g.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many steps in total")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda")
    g = p.add_argument_group("testing hooks")
    g.add_argument("--crash-at-step", type=int, help="SIGKILL this process after step N (kill-and-resume tests)")
    g.add_argument("--nan-at-step", type=int, help="make the loss of step N non-finite (failure-path tests)")
    a = p.parse_args(argv)

    preset = PRESETS.get(a.preset, {})
    for key, value in preset.items():  # the preset fills what the command line left unset
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    a.published = preset.get("published")
    a.dataset = a.dataset or ("imagefolder" if a.data else "digits")
    digits = a.dataset == "digits"
    if a.dataset == "imagefolder" and not a.data:
        p.error("--dataset imagefolder needs --data ROOT (an ImageFolder root with train/ and val/)")
    if a.preset and digits:
        p.error(f"--preset {a.preset} is an ImageFolder recipe: pass --data ROOT")
    a.arch = a.arch or ("cnn" if digits else "resnet50")
    a.image_size = (8 if digits else 224) if a.image_size is None else a.image_size
    a.small_stem = a.image_size <= 64 if a.small_stem is None else a.small_stem
    a.projector = a.projector or PROJECTOR[a.arch]
    a.workers = (0 if digits else 8) if a.workers is None else a.workers
    a.epochs = (40 if digits else 100) if a.epochs is None else a.epochs
    a.batch_size = (128 if digits else 256) if a.batch_size is None else a.batch_size
    a.base_lr = default_base_lr(a.arch, a.epochs) if a.base_lr is None else a.base_lr
    a.weight_decay = WEIGHT_DECAY[a.arch] if a.weight_decay is None else a.weight_decay
    a.ema = a.ema or 0.0
    a.multi_crop = bool(a.multi_crop)
    a.knn_k = (5 if digits else 20) if a.knn_k is None else a.knn_k
    a.log_every = (1 if digits else 10) if a.log_every is None else a.log_every
    s = a.image_size
    if digits:  # the digits have their own augmentation (ssl_data.digits_augment): two 8x8 views
        a.crops, a.crop_min_scale, a.crop_scales, a.blur_prob, a.solarize_prob = [s, s], None, None, None, None
    else:
        if a.crop_min_scale is None:
            a.crop_min_scale = 0.2 if a.multi_crop else 0.08
        specs = multi_crop_specs(s, min_scale=a.crop_min_scale) if a.multi_crop else \
            two_crop_specs(s, scale=(a.crop_min_scale, 1.0))
        a.crops, a.crop_scales = [c.size for c in specs], [list(c.scale) for c in specs]
        a.blur_prob = per_crop(a.blur_prob, [c.blur_p for c in specs])
        a.solarize_prob = per_crop(a.solarize_prob, [c.solarize_p for c in specs])
    a.output_dir = a.output_dir or os.path.join("runs", a.preset or f"{a.dataset}-{a.arch}-{'intlm' if a.ema else 'intl'}")
    probs = (a.blur_prob or []) + (a.solarize_prob or [])
    problems = [
        (digits and (s != 8 or a.multi_crop), "--dataset digits works on its 8x8 images: no --image-size or --multi-crop"),
        (not all(x.isdigit() and int(x) > 0 for x in a.projector.split("-")),
         f"--projector must be sizes joined by '-', e.g. 2048-2048-2048, got {a.projector!r}"),
        (min(a.crops) < 4, f"--image-size {s} is too small (crops down to {min(a.crops)} px)"),
        (not digits and len({len(a.crops), len(a.blur_prob), len(a.solarize_prob)}) > 1,
         f"--blur-prob and --solarize-prob take one value or one per crop ({len(a.crops)} crops)"),
        (not all(0 <= q <= 1 for q in probs), "--blur-prob and --solarize-prob must be in [0, 1]"),
        (not digits and not 0 < a.crop_min_scale <= 1, f"--crop-min-scale must be in (0, 1], got {a.crop_min_scale}"),
        (a.epochs < 1 or a.batch_size < 2, "--epochs must be >= 1 and --batch-size >= 2"),
        (min(a.knn_k, a.log_every, a.print_every, a.keep_checkpoints) < 1 or a.ckpt_every_steps < 0 or a.eval_every < 0,
         "--knn-k, --log-every, --print-every and --keep-checkpoints must be >= 1, --ckpt-every-steps and --eval-every >= 0"),
        (not 0 <= a.ema < 1, f"--ema must be in [0, 1) (0 = plain INTL), got {a.ema}"),
        (a.iters < 0, f"--iters must be >= 0, got {a.iters}"),
        (a.base_lr <= 0 or a.weight_decay < 0 or a.warmup_epochs < 0, "--base-lr must be > 0, --weight-decay and --warmup-epochs >= 0"),
        (a.resume not in ("auto", "none") and not os.path.isfile(a.resume), f"--resume {a.resume!r}: not auto, none or a checkpoint file"),
    ]
    for bad, msg in problems:
        if bad:
            p.error(msg)
    if a.print_config:
        print(json.dumps(vars(a), indent=1))
        sys.exit(0)
    return a


def per_crop(given: list[float] | None, recipe: list[float]) -> list[float]:
    """A per-crop flag: the recipe's values when unset, one value for every crop, or one value each."""
    if given is None:
        return recipe
    return given * len(recipe) if len(given) == 1 else given


def default_base_lr(arch: str, epochs: int) -> float:
    """The official lr per epoch budget for ResNet-50 on ImageNet (0.5 / 0.4 / 0.4 / 0.3 at 100 / 200 / 400 / 800)."""
    if arch != "resnet50":
        return BASE_LR[arch]
    return 0.5 if epochs <= 100 else 0.4 if epochs <= 400 else 0.3


def main(argv=None) -> dict:
    args = parse_args(argv)
    d = init_distributed(args.device)
    try:
        return pretrain(args, d)
    finally:
        cleanup(d)


def pretrain(args, d) -> dict:
    t_start, cuda = time.time(), d.device.type == "cuda"
    backend = check_setup(args, d)
    local_bs, amp_dtype = args.batch_size // d.world, torch.bfloat16 if args.amp == "bf16" or (args.amp == "auto" and cuda) else None
    channels_last = cuda if args.channels_last is None else args.channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    # Data: a sampler whose global batches do not depend on the number of processes.
    train_set, bank_set, query_set, in_channels = build_datasets(args)
    sampler = EpochSampler(train_set, d.world, d.rank, args.seed)
    loader = DataLoader(train_set, batch_size=local_bs, sampler=sampler, num_workers=args.workers, pin_memory=cuda,
                        persistent_workers=args.workers > 0, drop_last=True, prefetch_factor=4 if args.workers else None)
    steps_per_epoch = sampler.num_samples // local_bs
    if steps_per_epoch == 0:
        raise DataError(f"{len(train_set)} training samples give no full batch of {args.batch_size}: lower --batch-size")
    total_steps, peak_lr = args.epochs * steps_per_epoch, args.base_lr * args.batch_size / 256

    # Model (+ its EMA copy for INTL-M) and optimizer; then resume, or start over.
    net, ema = build_model(args, in_channels, d, fmt)
    optimizer = build_optimizer(net, args.weight_decay, peak_lr)
    state, resumed_from = resolve_resume(args.resume, args.output_dir, REQUIRED)
    step, train_seconds = restore(state, resumed_from, args, net, ema, optimizer, len(train_set))
    if d.main:
        print(f"{args.dataset} {args.arch}: {len(train_set)} images, {steps_per_epoch} steps/epoch x {args.epochs}, "
              f"global batch {args.batch_size} on {d.world} x {d.device}, peak lr {peak_lr:g}, "
              f"{'INTL-M' if args.ema else 'INTL'} with crops {args.crops}, backend {backend}"
              + (f", preset {args.preset}" if args.preset else "") + (f"; resumed from {resumed_from}" if resumed_from else ""),
              file=sys.stderr)
        start_run_folder(args, d, step, resumed_from)
    barrier(d)
    log = JsonLog(os.path.join(args.output_dir, "log.jsonl") if d.main else None)
    tb = open_tensorboard(args, step) if d.main else None
    model = wrap_model(net, d.device, d.world > 1, args.compile)

    def save(tag: str) -> str:
        path = checkpoint_path(args.output_dir, step)
        if d.main:
            atomic_save({"net": net.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                         "optimizer": optimizer.state_dict(), "step": step, "epoch": step / steps_per_epoch,
                         "train_seconds": train_seconds + time.time() - t_loop, "args": vars(args),
                         "n_train": len(train_set), "tag": tag}, path)
            prune_checkpoints(args.output_dir, args.keep_checkpoints, REQUIRED)
        barrier(d)
        return path

    # The loop: one global batch per step, a checkpoint every epoch (and every N steps, and on SIGTERM).
    stop = StopRequest()  # before the loader's workers start: they inherit it and keep going until the save
    t_loop, last_step = time.time(), min(total_steps, args.max_steps or total_steps)
    try:
        while step < last_step:
            epoch, done = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, skip=done * local_bs)
            bar = Progress(d, steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", initial=done, every=args.print_every)
            window = Window()
            for crops, _ in loader:
                window.data_ready()
                lr = set_lr(optimizer, step, peak_lr, args.final_lr * peak_lr, args.warmup_epochs * steps_per_epoch, total_steps)
                crops = [to_model_input(c, d.device, fmt) for c in crops]
                loss, parts, views = forward_loss(model, ema, crops, args, amp_dtype, d.group)
                if step + 1 == args.nan_at_step:
                    loss = loss * float("nan")
                loss_value = loss.item()  # the loss is replicated: every rank stops together
                if not math.isfinite(loss_value):
                    raise non_finite_loss(loss_value, step + 1, args.output_dir)
                # intl_loss gives each rank the gradient of its own samples of the global loss; DDP averages
                # over ranks, so scale by the world size to get the single-process gradient.
                optimizer.zero_grad(set_to_none=True)
                (loss * d.world).backward()
                optimizer.step()
                step += 1
                momentum = ema_update(ema, net, args.ema, step, total_steps) if ema is not None else None
                window.step_done(args.batch_size)
                bar.update(loss=loss_value, lr=lr, **window.last)
                if step % args.log_every == 0 or step == last_step:
                    eff_rank = global_effective_rank(views[0], d)  # every rank takes part in the gather
                    if d.main:
                        record = dict(step=step, epoch=round(step / steps_per_epoch, 4), loss=loss_value,
                                      align=parts["align"].item(), trace=parts["trace"].item(), beta=parts["beta"],
                                      lr=lr, eff_rank=eff_rank, ema_momentum=momentum, **window.stats())
                        log.write(**record)
                        tb_write(tb, record, step)
                    window = Window()
                if args.ckpt_every_steps and step % args.ckpt_every_steps == 0 and step % steps_per_epoch:
                    save("steps")
                if step == args.crash_at_step:
                    os.kill(os.getpid(), signal.SIGKILL)
                if stop.requested(d):
                    return stopped(stop.signal_name, step, save("signal"), d)
                if step == last_step:
                    break
                window.data_wait()
            bar.close()
            save("epoch" if step % steps_per_epoch == 0 else "stop")
            epoch_done = step // steps_per_epoch
            if args.eval_every and epoch_done % args.eval_every == 0 and step % steps_per_epoch == 0 and step < total_steps:
                acc = knn_monitor(net.backbone, bank_set, query_set, args, d, channels_last)
                if d.main and acc is not None:
                    log.write(step=step, epoch=epoch_done, knn_acc=acc)
                    tb_write(tb, {"knn_acc": acc}, step)
                    print(f"epoch {epoch_done}: {args.knn_k}-NN accuracy {acc:.4f}", file=sys.stderr)
    finally:
        stop.restore()
    train_seconds += time.time() - t_loop

    # Final evaluation (and, on digits, the same architecture at random init for comparison).
    summary = {"dataset": args.dataset, "arch": args.arch, "objective": "INTL-M" if args.ema else "INTL",
               "steps": step, "epochs": round(step / steps_per_epoch, 3), "world_size": d.world}
    summary["knn_acc"] = knn_monitor(net.backbone, bank_set, query_set, args, d, channels_last)
    if args.dataset == "digits" and d.main:
        summary.update(digits_report(net, args, in_channels, d))
    records = read_jsonl(os.path.join(args.output_dir, "log.jsonl")) if d.main else []
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    summary.update(final_loss=losses.get(step), train_seconds=round(train_seconds, 2),
                   seconds=round(time.time() - t_start, 2), output_dir=args.output_dir, resumed_from=resumed_from)
    if d.main:
        plot_loss(losses, os.path.join(args.output_dir, "loss.png"), args)
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        log.close()
        if tb is not None:
            tb.close()
        print(json.dumps(summary), flush=True)
    return summary


# ---------------------------------------------------------------------------------------- stages of pretrain()
def check_setup(args, d) -> str:
    """What can be refused before any data is read: the batch split, the backend, the output folder.
    Returns the backend that "auto" (or the name given) resolves to on this device."""
    if args.batch_size % d.world:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the {d.world} processes "
                         f"(each takes batch-size / {d.world} samples)")
    try:
        backend = intl_ops.backends.resolve(args.backend, d.device)
    except RuntimeError as e:
        raise ValueError(f"--backend {args.backend}: {e}") from None
    make_output_dir(args.output_dir)
    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: let cuDNN pick its fastest kernels once
    return backend


def build_model(args, in_channels: int, d, fmt) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """backbone + projector, and its EMA copy for INTL-M; BatchNorm over the global batch across processes."""
    torch.manual_seed(args.seed)
    net = INTLNet(args.arch, args.projector, in_channels, args.small_stem, args.zero_init_residual)
    ema = copy.deepcopy(net).requires_grad_(False) if args.ema else None
    if d.world > 1:
        net = convert_sync_bn(net, d.device)
        ema = convert_sync_bn(ema, d.device) if ema is not None else None
    net = net.to(d.device, memory_format=fmt)
    return net, ema.to(d.device, memory_format=fmt) if ema is not None else None


def build_optimizer(net: torch.nn.Module, weight_decay: float, lr: float) -> torch.optim.Optimizer:
    """SGD momentum 0.9; no weight decay on 1-D parameters (biases, BN), as docs/math.md §7 says."""
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=0.9)


def wrap_model(net: torch.nn.Module, device: torch.device, ddp: bool, compile: bool) -> torch.nn.Module:
    """DDP with its buckets as views into the gradients (no copy) and a static graph (the same every
    step); BN buffers are not broadcast (global-batch BN keeps them equal). torch.compile goes around DDP,
    so that its optimizer splits the graph at the buckets' boundaries."""
    if ddp:
        with warnings.catch_warnings():  # torch 2.14 deprecates broadcast_buffers, but says to keep False for now
            warnings.filterwarnings("ignore", ".*broadcast_buffers", FutureWarning)
            net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                          broadcast_buffers=False, gradient_as_bucket_view=True, static_graph=True)
    return torch.compile(net) if compile else net


def restore(state, path, args, net, ema, optimizer, n_train: int) -> tuple[int, float]:
    """Load a checkpoint made by the same run (flags and data size checked): (step, train seconds)."""
    if state is None:
        return 0, 0.0
    check_same_run(state, vars(args), RESUME_FREE, path, n_train)
    net.load_state_dict(state["net"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], state["train_seconds"]


def start_run_folder(args, d, step: int, resumed_from: str | None) -> None:
    """Rank 0: start over if asked, write run.json, and cut log.jsonl back to the step the weights are at
    (records of the steps after the checkpoint are redone now)."""
    if args.resume == "none":
        clear_checkpoints(args.output_dir)
    with open(os.path.join(args.output_dir, "run.json"), "w") as f:
        json.dump({**run_metadata(vars(args), d), "resumed_from": resumed_from, "start_step": step}, f, indent=1)
    log_path = os.path.join(args.output_dir, "log.jsonl")
    kept = [r for r in read_jsonl(log_path) if r.get("step", 0) <= step]
    with open(log_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)


def non_finite_loss(value: float, step: int, out_dir: str) -> FloatingPointError:
    last = good_checkpoints(out_dir, REQUIRED)[:1]
    return FloatingPointError(f"non-finite loss ({value}) at step {step}; nothing was updated and the last good "
                              f"checkpoint is kept: {last[0] if last else None}. Lower --base-lr or check the data, "
                              f"then rerun with --resume auto")


def stopped(signal_name: str, step: int, path: str, d) -> dict:
    """The run's end on SIGTERM / SIGUSR1: the checkpoint is saved; say so, and how to continue."""
    summary = {"stopped_by": signal_name, "steps": step, "checkpoint": path}
    if d.main:
        print(f"stopped by {signal_name} after step {step}: {path} saved; run the same command again to continue",
              file=sys.stderr)
        print(json.dumps(summary), flush=True)
    return summary


# ---------------------------------------------------------------------------------------- helpers
class Window:
    """Data time vs step time over the steps since the last log record: a loader that cannot keep up
    shows as a data share near 1 (the GPUs wait for images)."""

    def __init__(self):
        self.t0 = self.t_wait = time.perf_counter()
        self.data_s, self.steps, self.images, self.last = 0.0, 0, 0, {}

    def data_wait(self) -> None:  # the step is over; waiting for the next batch starts now
        self.t_wait = time.perf_counter()

    def data_ready(self) -> None:
        self.data_s += time.perf_counter() - self.t_wait

    def step_done(self, images: int) -> None:
        self.steps, self.images = self.steps + 1, self.images + images
        self.last = {"img_s": round(self.images / max(time.perf_counter() - self.t0, 1e-9)),
                     "data": f"{self.data_s / max(time.perf_counter() - self.t0, 1e-9):.0%}"}

    def stats(self) -> dict:
        wall = max(time.perf_counter() - self.t0, 1e-9)
        return {"images_per_s": self.images / wall, "step_time_s": wall / max(self.steps, 1),
                "data_time_s": self.data_s / max(self.steps, 1), "data_share": self.data_s / wall}


@torch.no_grad()
def global_effective_rank(z: torch.Tensor, d) -> float | None:
    """Effective rank of the embeddings of the GLOBAL batch (gathered from every rank; on rank 0),
    so that the collapse signal does not depend on the number of processes."""
    z = z.detach().float()
    if d.world > 1:
        parts = [torch.empty_like(z) for _ in range(d.world)]
        dist.all_gather(parts, z.contiguous())
        z = torch.cat(parts)
    return embedding_effective_rank(z) if d.main else None


def build_datasets(args):
    """(train views, kNN bank images, kNN query images, input channels); bank/query None if unavailable."""
    if args.dataset == "digits":
        x_tr, y_tr, x_te, y_te = load_digits_split(args.seed)
        return (DigitsViews(x_tr, y_tr, len(args.crops), args.seed), TensorImages(digits_normalize(x_tr), y_tr),
                TensorImages(digits_normalize(x_te), y_te), 1)
    if args.dataset == "synthetic":
        return SyntheticViews(args.synthetic_size, args.crops, 3, args.seed), None, None, 3
    specs = [CropSpec(size, tuple(scale), blur, sol)
             for size, scale, blur, sol in zip(args.crops, args.crop_scales, args.blur_prob, args.solarize_prob)]
    train = FolderViews(args.data, "train", specs, args.seed)
    if not os.path.isdir(os.path.join(args.data, "val")):
        print(f"warning: {args.data}/val missing: no kNN monitor", file=sys.stderr)
        return train, None, None, 3
    check_image_folder(args.data, "val")
    return (train, FolderImages(args.data, "train", args.image_size, args.knn_bank, args.seed),
            FolderImages(args.data, "val", args.image_size, args.knn_queries, args.seed), 3)


def forward_loss(model, ema, crops, args, amp_dtype: torch.dtype | None, group, loss_fn=intl_ops.intl_loss):
    """(loss, parts, views) of one batch of crops: INTL on all crops, or INTL-M (crop 0 through the EMA
    encoder without gradient as the target, the other crops through the online network). The network
    runs under autocast to amp_dtype (None: off); the loss op computes in fp32 inside whatever it is given."""
    with torch.autocast(crops[0].device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        target = None
        if ema is not None:
            with torch.no_grad():
                target = ema(crops[:1])[0]
        views = model(crops[1:] if ema is not None else crops)
    loss, parts = loss_fn(views, args.iters, args.axis, args.beta, target=target, backend=args.backend,
                          process_group=group, return_parts=True)
    return loss, parts, views


def set_lr(optimizer, step: int, peak: float, final: float, warmup_steps: float, total_steps: int) -> float:
    """Linear warm-up to peak, then cosine from peak to final (docs/math.md §7)."""
    if step < warmup_steps:
        lr = peak * (step + 1) / warmup_steps
    else:
        q = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        lr = final + (peak - final) * 0.5 * (1 + math.cos(math.pi * q))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@torch.no_grad()
def ema_update(ema, net, m0: float, step: int, total_steps: int) -> float:
    """EMA target update with the momentum of docs/math.md §7, m_t = 1 - (1 - m0)(1 + cos(pi t / T)) / 2 (m0 -> 1)."""
    m = 1 - (1 - m0) * (1 + math.cos(math.pi * step / total_steps)) / 2
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in net.parameters()], 1 - m)
    for be, b in zip(ema.buffers(), net.buffers()):  # BN running statistics: copied
        be.copy_(b)
    return m


def knn_monitor(backbone, bank_set, query_set, args, d, channels_last: bool):
    """k-NN accuracy of the backbone's features, query (held-out) images vs bank (training) images."""
    if bank_set is None:
        return None
    cuda = d.device.type == "cuda"

    def loader(ds):
        return DataLoader(ds, batch_size=256, sampler=shard_sampler(ds), num_workers=args.workers, pin_memory=cuda)

    bank_f, bank_y = extract_features(backbone, loader(bank_set), d.device, channels_last)
    query_f, query_y = extract_features(backbone, loader(query_set), d.device, channels_last)
    return knn_accuracy(bank_f, bank_y, query_f, query_y, args.knn_k)


def digits_report(net, args, in_channels: int, d) -> dict:
    """kNN and linear-probe accuracy of the trained encoder and of the same architecture at random
    init, on the held-out digits, plus the spectra of their features (PNG next to the run)."""
    x_tr, y_tr, x_te, y_te = load_digits_split(args.seed)
    torch.manual_seed(args.seed)  # the very initial weights of this run
    random_net = INTLNet(args.arch, args.projector, in_channels, args.small_stem, args.zero_init_residual).to(d.device)
    out, spectra = {}, {}
    for name, model in (("", net), ("random_init_", random_net)):
        model.eval()
        with torch.no_grad():
            f_tr = model.backbone(digits_normalize(x_tr).to(d.device)).float().cpu()
            f_te = model.backbone(digits_normalize(x_te).to(d.device)).float().cpu()
        model.train()
        out[name + "knn_acc"] = knn_accuracy(f_tr, y_tr, f_te, y_te, args.knn_k)
        out[name + "linear_acc"] = linear_probe_accuracy(f_tr, y_tr, f_te, y_te)
        out[name + "eff_rank"] = round(float(intl_ops.effective_rank(f_te, axis=1)), 2)
        spectra[("INTL encoder" if not name else "random-init encoder") + f" (eff. rank {out[name + 'eff_rank']})"] = \
            intl_ops.spectrum(f_te, axis=1)
    intl_ops.plot_spectra(spectra, os.path.join(args.output_dir, "spectrum.png"),
                          title=f"digits held-out features: {args.arch} encoder, eigenvalues of the covariance")
    return out


def open_tensorboard(args, step: int):
    if not args.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        print(f"warning: no TensorBoard logging ({e})", file=sys.stderr)
        return None
    return SummaryWriter(os.path.join(args.output_dir, "tb"), purge_step=step)  # drops events of redone steps


def tb_write(tb, record: dict, step: int) -> None:
    if tb is not None:
        for k, v in record.items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)):
                tb.add_scalar(f"train/{k}" if k != "knn_acc" else "eval/knn_acc", v, step)


def plot_loss(losses: dict, path: str, args) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not losses:
        return
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = sorted(losses)
    ax.plot(steps, [losses[s] for s in steps], linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("INTL-M loss" if args.ema else "INTL loss")
    ax.set_title(f"{args.dataset} {args.arch}, global batch {args.batch_size}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")


if __name__ == "__main__":
    run_cli(main)
