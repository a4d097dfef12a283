#!/usr/bin/env python
"""Evaluate a train/pretrain.py backbone the way the paper does: a linear classifier on the frozen
features, or a semi-supervised fine-tune of the whole network on 1 % / 10 % of the ImageNet labels.
Resumable (a checkpoint per epoch, --resume auto), torchrun-ready; SIGTERM / SIGUSR1 stop it at the next
step on every rank, keeping the last per-epoch checkpoint (the rest of an epoch is cheap to redo), exit 0.

    python train/linear_eval.py --pretrained runs/digits-cnn-intl                   # digits, frozen
    torchrun --nproc_per_node 8 train/linear_eval.py --pretrained runs/in1k --data /imagenet
    torchrun --nproc_per_node 8 train/linear_eval.py --pretrained runs/in1k --data /imagenet \\
        --mode finetune --train-files 1percent.txt                      # the standard 1 % subset list

Protocol of the official code (github.com/winci-ai/INTL: evaluate.py, cfg.py, scripts/*.sh), matched:
  head         one nn.Linear on the pooled features, weight ~ N(0, 0.01), bias 0 (evaluate.py)
  optimiser    SGD, momentum 0.9, weight decay 1e-5 on every parameter (cfg.py's --wd; the scripts keep
               it), lr = base lr x batch / 256, global batch 256 (cfg.py's --bs)
  schedule     step: lr x 0.1 at epochs 60 and 80 (evaluate.py's default --schedule step; --schedule cos
               is its alternative). 20-epoch fine-tunes thus keep a constant lr, as the official ones do.
  epochs       100 linear, 20 semi-supervised (scripts/intl_ep800.sh, scripts/intl_ep*_multi-crop_ema.sh)
  base lrs     linear: classifier 0.2 (intl_ep800.sh, plain INTL), 0.4 for INTL-M multi-crop runs
               (intl_ep100/200_multi-crop_ema.sh, ep400/800_multi-crop_ema.sh); fine-tune: classifier 0.2,
               backbone 0.004 (multi-crop EMA scripts, cfg.py's default) or 0.006 (intl_ep800.sh). The
               default is picked from the pretraining run's flags (INTL-M = --ema > 0, with --multi-crop);
               other combinations, which the paper did not evaluate, take the plain-INTL figures.
  modes        linear: the backbone stays in eval mode (pretraining's BN statistics); fine-tune: train
               mode, BN statistics per process (evaluate.py uses no SyncBatchNorm)
  data         train: RandomResizedCrop(size) (area 0.08-1) + horizontal flip; val: resize to size x 256/224,
               centre crop size (evaluate.py's 256 / 224 at size 224); ImageNet mean and std
  subsets      --train-files: one image file name a line, the form of the standard 1 % / 10 % lists that
               evaluate.py reads (src/percent/{1,10}percent.txt there), matched by name in <data>/train.
               Without it, --train-percent < 100 draws a seeded per-class split, reported as NOT the
               standard one; both together are refused (the list already is the subset).
Deliberate differences: the digits demo is not augmented (8x8 digits; a flip changes the digit); the
val images are split over the processes (evaluate.py runs all of them on every GPU: same numbers, N x
less work); the frozen backbone runs under no_grad outside DDP (only the head's gradients are reduced);
--head bn-linear (BatchNorm1d without affine, then the Linear) is an opt-in that is NOT the paper's
protocol, for small demos whose features are badly scaled. The last printed line is a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # intl_ops from the repo root

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from ssl_data import (DataError, FolderImages, TensorImages, check_image_folder, digits_normalize, load_digits_split,
                      load_rgb, probe_transform, to_model_input)
from ssl_models import backbone_state_dict, build_backbone, shard_sampler
from ssl_run import (JsonLog, Progress, StopRequest, atomic_save, barrier, check_same_run, checkpoint_path, cleanup,
                     clear_checkpoints, init_distributed, list_checkpoints, load_newest_good, make_output_dir,
                     prune_checkpoints, read_checkpoint, read_jsonl, resolve_resume, run_cli, run_metadata)

# Flags that may change between a checkpoint and its resumption (the dataset may move to node-local disk).
RESUME_FREE = {"output_dir", "resume", "workers", "device", "data", "print_every"}
CKPT_KEYS = ("net", "optimizer", "epoch")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("backbone and data")
    g.add_argument("--pretrained", required=True, help="a pretrain.py run folder (its newest checkpoint) or a ckpt_*.pt")
    g.add_argument("--data", help="ImageFolder root (train/, val/); default: the pretraining run's dataset")
    g.add_argument("--workers", type=int, help="DataLoader workers per process: 0 for digits, else 8")
    g = p.add_argument_group("protocol (defaults: the official evaluate.py)")
    g.add_argument("--mode", choices=["linear", "finetune"], default="linear",
                   help="linear: frozen backbone (eval mode); finetune: train the backbone too (semi-supervised)")
    g.add_argument("--head", choices=["linear", "bn-linear"], default="linear",
                   help="linear (the paper's); bn-linear: BatchNorm1d(affine=False) first, NOT the paper's protocol")
    g.add_argument("--train-files", help="text file, one training image file name a line (e.g. n01440764_2708.JPEG, "
                   "or class/name): the standard ImageNet 1%% / 10%% subsets; matched by name in <data>/train")
    g.add_argument("--train-percent", type=float, default=100.0,
                   help="without --train-files: a generated split (not the standard one) with this percent of "
                   "each class; not allowed with --train-files")
    g.add_argument("--epochs", type=int, help="default: 100 linear, 20 finetune")
    g.add_argument("--schedule", choices=["step", "cos"], default="step", help="step: lr x 0.1 at each --milestones "
                   "epoch; cos: cosine to 0 over --epochs (once per epoch)")
    g.add_argument("--milestones", type=int, nargs="*", default=[60, 80], help="epochs where the step lr is divided by 10 (default 60 80)")
    g.add_argument("--batch-size", type=int, default=256, help="GLOBAL batch, split over the processes")
    g.add_argument("--lr-head", type=float, help="classifier lr at batch 256 (scaled by batch-size/256); default "
                   "0.2, or 0.4 for a linear probe of an INTL-M multi-crop run")
    g.add_argument("--lr-backbone", type=float, help="backbone lr at batch 256 (finetune only); default 0.004 for an "
                   "INTL-M multi-crop run, else 0.006")
    g.add_argument("--weight-decay", type=float, default=1e-5, help="on every parameter, as evaluate.py")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", help="default: <pretrained run>/<mode>-p<train-percent> (or -<train-files name>)")
    g.add_argument("--resume", default="auto", help="auto (newest good checkpoint of --output-dir), none "
                   "(its checkpoints are deleted), or a file")
    g.add_argument("--print-every", type=int, default=100, help="steps between progress lines when stderr is not a "
                   "terminal (a live bar when it is), and at each epoch's end")
    g.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    finetune = a.mode == "finetune"
    a.epochs = (20 if finetune else 100) if a.epochs is None else a.epochs
    run_dir = a.pretrained if os.path.isdir(a.pretrained) else os.path.dirname(a.pretrained)
    subset = os.path.splitext(os.path.basename(a.train_files))[0] if a.train_files else f"p{a.train_percent:g}"
    a.output_dir = a.output_dir or os.path.join(run_dir, f"{a.mode}-{subset}")
    problems = [
        (not os.path.exists(a.pretrained), f"--pretrained {a.pretrained!r} does not exist"),
        (os.path.isdir(a.pretrained) and not list_checkpoints(a.pretrained),
         f"--pretrained {a.pretrained!r} holds no ckpt_*.pt"),
        (not 0 < a.train_percent <= 100, f"--train-percent must be in (0, 100], got {a.train_percent}"),
        (a.train_files is not None and a.train_percent != 100,
         "--train-files gives the subset itself: drop --train-percent (it is only for a generated split)"),
        (a.epochs < 1 or a.batch_size < 1 or a.print_every < 1, "--epochs, --batch-size and --print-every must be >= 1"),
        ((a.lr_head is not None and a.lr_head <= 0) or a.weight_decay < 0, "--lr-head must be > 0, --weight-decay >= 0"),
        (finetune and a.lr_backbone is not None and a.lr_backbone <= 0, "--mode finetune needs --lr-backbone > 0"),
        (not finetune and a.lr_backbone is not None, "--lr-backbone is for --mode finetune (the linear probe freezes it)"),
    ]
    for bad, msg in problems:
        if bad:
            p.error(msg)
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    d = init_distributed(args.device)
    stop = StopRequest()  # before the DataLoader forks: its workers inherit the handler and keep running
    try:
        return evaluate(args, d, stop)
    finally:
        stop.restore()
        cleanup(d)


def evaluate(args, d, stop: StopRequest) -> dict:
    t_start, cuda = time.time(), d.device.type == "cuda"
    if args.batch_size % d.world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {d.world} processes")
    make_output_dir(args.output_dir)  # every rank: an unusable folder stops them all, before any work
    local_bs, finetune = args.batch_size // d.world, args.mode == "finetune"
    pre, pre_path = load_pretrained(args.pretrained)
    pargs = pre["args"]
    lr_source = resolve_lrs(args, pargs)

    # Data: the labelled training images (all, a listed subset or a generated split) and the held-out split.
    digits = pargs["dataset"] == "digits" and not args.data
    data_root = args.data or pargs.get("data")
    if not digits and not data_root:
        raise ValueError(f"the run {args.pretrained!r} was not trained on an ImageFolder: pass --data ROOT")
    if digits and args.train_files:
        raise DataError("--train-files needs an ImageFolder (--data ROOT): the digits have no file names")
    workers = (0 if digits else 8) if args.workers is None else args.workers
    train_set, val_set, in_channels, n_classes = build_eval_data(digits, data_root, pargs["image_size"], args.seed)
    train_set, split = training_subset(train_set, args)
    sampler = DistributedSampler(train_set, num_replicas=d.world, rank=d.rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, batch_size=local_bs, sampler=sampler, num_workers=workers, pin_memory=cuda,
                        persistent_workers=workers > 0,
                        drop_last=sampler.num_samples % local_bs == 1)  # a batch of one breaks BatchNorm in train mode
    val_loader = DataLoader(val_set, batch_size=256, sampler=shard_sampler(val_set), num_workers=workers, pin_memory=cuda)

    # Model: the pretrained backbone (online network) + the classifier; channels_last on GPUs.
    fmt = torch.channels_last if cuda else torch.contiguous_format
    backbone, head = build_model(args, pre, pre_path, in_channels, n_classes)
    del pre
    net = nn.Sequential(backbone, head).to(d.device, memory_format=fmt)
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed input sizes
    base_lrs = [lr * args.batch_size / 256 for lr in ([args.lr_head, args.lr_backbone] if finetune else [args.lr_head])]
    groups = [{"params": m.parameters(), "lr": lr} for m, lr in zip((head, backbone), base_lrs)]
    optimizer = torch.optim.SGD(groups, lr=base_lrs[0], momentum=0.9, weight_decay=args.weight_decay)

    # Resume (or start over), then the run folder's metadata and log (records of redone epochs go).
    state, resumed_from = resolve_resume(args.resume, args.output_dir, CKPT_KEYS, progress_key="epoch")
    start_epoch, best = restore(state, resumed_from, args, net, optimizer, len(train_set))
    log_path = os.path.join(args.output_dir, "log.jsonl")

    if d.main:
        if args.resume == "none":
            clear_checkpoints(args.output_dir)
        with open(os.path.join(args.output_dir, "run.json"), "w") as f:
            json.dump({**run_metadata(vars(args), d), "pretrained": pre_path, "train_split": split,
                       "resumed_from": resumed_from}, f, indent=1)
        kept = [r for r in read_jsonl(log_path) if r.get("epoch", 0) <= start_epoch]
        with open(log_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
    barrier(d)
    log = JsonLog(log_path if d.main else None)
    if d.main:
        print(f"{args.mode} evaluation of {pre_path} ({pargs['arch']}): {len(train_set)} training images ({split}), "
              f"{len(val_set)} val, {args.epochs} epochs of global batch {args.batch_size} on {d.world} x {d.device}; "
              f"{lr_source}" + (f"; resumed from {resumed_from}" if resumed_from else ""), file=sys.stderr)
    # Only what trains is DDP-wrapped: the frozen backbone has no gradients to reduce.
    trained = net if finetune else head
    model = DistributedDataParallel(trained, device_ids=[d.device.index] if cuda else None,
                                    gradient_as_bucket_view=True) if d.world > 1 else trained

    top1 = top5 = float("nan")
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        torch.manual_seed(args.seed + epoch)  # augmentation draws (workers derive their seeds from it)
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * lr_factor(args, epoch)
        net.train(finetune)
        head.train()  # bn-linear's statistics; a plain Linear does not care
        bar = Progress(d, len(loader), f"epoch {epoch + 1}/{args.epochs}", every=args.print_every)
        total_loss, n, steps, halted = 0.0, 0, 0, False
        for x, y in loader:
            if stop.requested(d):  # the same answer on every rank, so all stop before the same step
                halted = True
                break
            x = to_model_input(x, d.device, fmt)  # uint8 images are normalised on the device
            y = torch.as_tensor(y).to(d.device, non_blocking=True)
            if finetune:
                logits = model(x)
            else:
                with torch.no_grad():
                    features = backbone(x)
                logits = model(features)
            loss = F.cross_entropy(logits, y)
            value = loss.detach().clone()
            if d.world > 1:  # the global batch's loss: every rank sees the same value, stops together on a NaN
                dist.all_reduce(value)
            value = value.item() / d.world
            if not math.isfinite(value):
                raise FloatingPointError(f"non-finite loss in epoch {epoch + 1} (the checkpoints of finished epochs "
                                         f"are kept): lower --lr-head / --lr-backbone and start over (--resume none)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss, n, steps = total_loss + value * len(y), n + len(y), steps + 1
            bar.update(loss=value, lr=optimizer.param_groups[0]["lr"])
        bar.close()
        if halted:
            log.close()
            return stopped(args, d, stop, epoch, steps, len(loader), start_epoch, resumed_from)
        if finetune and d.world > 1:  # per-process BN statistics: evaluate with rank 0's on every rank
            for b in net.buffers():
                dist.broadcast(b, 0)
        top1, top5 = accuracy(net, val_loader, d, fmt, n_classes)
        best = max(best, top1)
        if d.main:
            atomic_save({"net": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                         "best_top1": best, "n_train": len(train_set), "args": vars(args)},
                        checkpoint_path(args.output_dir, epoch + 1))
            prune_checkpoints(args.output_dir, 2, CKPT_KEYS)
            mean_loss = total_loss / max(n, 1)
            log.write(epoch=epoch + 1, loss=mean_loss, top1=top1, top5=top5, lr=optimizer.param_groups[0]["lr"])
            print(f"epoch {epoch + 1}/{args.epochs}: loss {mean_loss:.4f}, val top-1 {top1:.4f}, top-5 {top5:.4f}",
                  file=sys.stderr, flush=True)
        barrier(d)
    if start_epoch >= args.epochs:  # a finished run: report its accuracy again
        top1, top5 = accuracy(net, val_loader, d, fmt, n_classes)
    summary = {"mode": args.mode, "head": args.head, "train_split": split, "train_files": args.train_files,
               "train_percent": args.train_percent, "train_images": len(train_set), "val_images": len(val_set),
               "epochs": args.epochs, "lr_head": args.lr_head, "lr_backbone": args.lr_backbone,
               "weight_decay": args.weight_decay, "batch_size": args.batch_size, "top1": top1, "top5": top5,
               "best_top1": max(best, top1), "published": pargs.get("published"), "pretrained": pre_path,
               "world_size": d.world,
               "output_dir": args.output_dir, "seconds": round(time.time() - t_start, 2)}
    if d.main:
        log.close()
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(json.dumps(summary), flush=True)
    return summary


# ---------------------------------------------------------------------------------------- helpers
def load_pretrained(path: str) -> tuple[dict, str]:
    """(pretrain.py checkpoint, its path): a file, or the newest readable checkpoint of a run folder."""
    required = ("net", "args")
    if os.path.isdir(path):
        state, found = load_newest_good(path, required)
        if state is None:
            raise ValueError(f"--pretrained {path!r}: none of its checkpoints can be read")
    else:
        state, found = read_checkpoint(path, required), path
    missing = [k for k in ("dataset", "arch", "image_size", "small_stem") if k not in state["args"]]
    if missing:
        raise ValueError(f"--pretrained {found!r} is not a pretrain.py checkpoint (its args lack {', '.join(missing)})")
    return state, found


def build_model(args, pre: dict, pre_path: str, in_channels: int, n_classes: int) -> tuple[nn.Module, nn.Module]:
    """(the pretrained online backbone, the classifier); the backbone is trained only in finetune mode."""
    pargs = pre["args"]
    backbone = build_backbone(pargs["arch"], in_channels, pargs["small_stem"])
    try:
        backbone.load_state_dict(backbone_state_dict(pre["net"]))
    except RuntimeError as e:
        raise ValueError(f"--pretrained {pre_path!r}: its backbone does not fit {pargs['arch']} "
                         f"({str(e).splitlines()[0]})") from None
    backbone.requires_grad_(args.mode == "finetune")
    torch.manual_seed(args.seed)  # the head's initial weights
    return backbone, build_head(args.head, backbone.num_features, n_classes)


def restore(state, path, args, net, optimizer, n_train: int) -> tuple[int, float]:
    """Load a checkpoint of the same evaluation (flags and data size checked): (epochs done, best top-1)."""
    if state is None:
        return 0, 0.0
    check_same_run(state, vars(args), RESUME_FREE, path, n_train)
    net.load_state_dict(state["net"])
    optimizer.load_state_dict(state["optimizer"])
    return state["epoch"], state["best_top1"]


def official_lrs(mode: str, pargs: dict) -> tuple[tuple[float, float], str]:
    """(classifier, backbone) base lrs of the official scripts for this pretraining run, and which script."""
    if pargs.get("ema", 0) > 0 and pargs.get("multi_crop"):
        lrs = (0.2, 0.004) if mode == "finetune" else (0.4, 0.0)
        return lrs, "an INTL-M multi-crop run, scripts/intl_ep100_multi-crop_ema.sh"
    return (0.2, 0.006) if mode == "finetune" else (0.2, 0.0), "a plain INTL run, scripts/intl_ep800.sh"


def resolve_lrs(args, pargs: dict) -> str:
    """Fill in --lr-head / --lr-backbone (explicit values win); returns the line that says what is used."""
    (head, backbone), source = official_lrs(args.mode, pargs)
    official = f"the official figure{'s' if args.mode == 'finetune' else ''} for {source}"
    notes = [f"classifier lr {args.lr_head if args.lr_head is not None else head:g} "
             f"({'--lr-head' if args.lr_head is not None else official})"]
    args.lr_head = head if args.lr_head is None else args.lr_head
    if args.mode == "finetune":
        notes.append(f"backbone lr {args.lr_backbone if args.lr_backbone is not None else backbone:g} "
                     f"({'--lr-backbone' if args.lr_backbone is not None else official})")
        args.lr_backbone = backbone if args.lr_backbone is None else args.lr_backbone
    return " and ".join(notes) + f" (x batch/256 = {args.batch_size / 256:g})"


def build_head(kind: str, features: int, classes: int) -> nn.Module:
    """evaluate.py's classifier: Linear with weight ~ N(0, 0.01) and bias 0 (bn-linear: standardise first)."""
    fc = nn.Linear(features, classes)
    nn.init.normal_(fc.weight, 0.0, 0.01)
    nn.init.zeros_(fc.bias)
    return fc if kind == "linear" else nn.Sequential(nn.BatchNorm1d(features, affine=False), fc)


def lr_factor(args, epoch: int) -> float:
    """evaluate.py's schedules, per epoch: x 0.1 at each milestone (MultiStepLR), or a cosine to 0."""
    if args.schedule == "cos":
        return 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
    return 0.1 ** sum(epoch >= m for m in args.milestones)


def build_eval_data(digits: bool, root: str | None, size: int, seed: int):
    """(train, val, input channels, classes): digits' held-out split, or root/train and root/val."""
    if digits:
        x_tr, y_tr, x_te, y_te = load_digits_split(seed)
        return TensorImages(digits_normalize(x_tr), y_tr), TensorImages(digits_normalize(x_te), y_te), 1, 10
    from torchvision.datasets import ImageFolder

    check_image_folder(root, "val")
    train = ImageFolder(check_image_folder(root, "train"), loader=load_rgb, transform=probe_transform(size))
    val = FolderImages(root, "val", size)  # resize size x 256/224, centre crop
    if val.folder.classes != train.classes:
        raise DataError(f"{root}/train and {root}/val have different class folders")
    return train, val, 3, len(train.classes)


def training_subset(train_set, args) -> tuple[object, str]:
    """(the labelled images trained on, how they were chosen, for the log and the summary)."""
    if args.train_files:
        idx = listed_samples(args.train_files, train_set.samples, train_set.root)
        return Subset(train_set, idx), f"{len(idx)} images listed in {args.train_files}"
    if args.train_percent < 100:
        return (class_subset(train_set, args.train_percent, args.seed),
                f"generated split: {args.train_percent:g}% of each class, seed {args.seed}; not a standard subset file")
    return train_set, "all training images"


def listed_samples(list_path: str, samples: list[tuple[str, int]], train_dir: str) -> list[int]:
    """Indices of the ImageFolder samples named in list_path, one a line: a file name (the standard
    lists' n01440764_2708.JPEG) or, where names repeat across classes, class/name. Blank lines are skipped."""
    try:
        with open(list_path) as f:
            names = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise DataError(f"--train-files {list_path!r} cannot be read: {e.strerror or e}") from None
    if not names:
        raise DataError(f"--train-files {list_path!r} lists no file names (expected one image file name a line)")
    by_name: dict[str, list[int]] = {}
    for i, (path, _) in enumerate(samples):
        by_name.setdefault(os.path.basename(path), []).append(i)
    missing, ambiguous, picked = [], [], []
    for name in names:
        rel = name.replace("\\", "/").strip("/")
        hits = [i for i in by_name.get(os.path.basename(rel), [])
                if "/" not in rel or samples[i][0].replace(os.sep, "/").endswith("/" + rel)]
        if len(hits) == 1:
            picked.append(hits[0])
        else:
            (ambiguous if hits else missing).append(name)
    if missing:
        raise DataError(f"--train-files {list_path!r}: {len(missing)} of its {len(names)} names are not images of "
                        f"{train_dir!r} (e.g. {', '.join(missing[:3])})")
    if ambiguous:
        raise DataError(f"--train-files {list_path!r}: {len(ambiguous)} names match images in several classes "
                        f"(e.g. {ambiguous[0]}); write them as class/name")
    if len(set(picked)) != len(picked):
        raise DataError(f"--train-files {list_path!r} lists {len(picked) - len(set(picked))} images more than once")
    return sorted(picked)


def class_subset(dataset, percent: float, seed: int) -> Subset:
    """The same `percent` of every class (at least one image each), chosen by a seeded shuffle."""
    labels = dataset.labels.tolist() if hasattr(dataset, "labels") else [y for _, y in dataset.samples]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    by_class: dict[int, list[int]] = {}
    for i in order:
        by_class.setdefault(int(labels[i]), []).append(i)
    keep = [i for idx in by_class.values() for i in idx[:max(1, round(len(idx) * percent / 100))]]
    return Subset(dataset, sorted(keep))


@torch.no_grad()
def accuracy(net, loader, d, fmt, n_classes: int) -> tuple[float, float]:
    """Top-1 and top-5 accuracy over the whole held-out split (counts summed over the processes)."""
    was_training = net.training
    net.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=d.device)
    for x, y in loader:
        x, y = to_model_input(x, d.device, fmt), torch.as_tensor(y).to(d.device)
        top = net(x).topk(min(5, n_classes), dim=1).indices
        counts += torch.stack([(top[:, 0] == y).sum(), (top == y[:, None]).any(1).sum(),
                               torch.tensor(len(y), device=d.device)]).double()
    net.train(was_training)
    if d.world > 1:
        dist.all_reduce(counts)  # the shard sampler pads a few duplicates: negligible on large splits
    return (counts[0] / counts[2]).item(), (counts[1] / counts[2]).item()


def stopped(args, d, stop: StopRequest, epoch: int, steps: int, total: int, start_epoch: int, resumed_from) -> dict:
    """After a stop request: mid-epoch progress of a probe is cheap to redo, so the last per-epoch checkpoint is kept."""
    kept = checkpoint_path(args.output_dir, epoch) if epoch > start_epoch else resumed_from
    summary = {"mode": args.mode, "stopped_by": stop.signal_name, "epochs_done": epoch, "epochs": args.epochs,
               "checkpoint": kept, "output_dir": args.output_dir}
    if d.main:
        what = (f"kept {kept} (epoch {epoch} done; the {steps}/{total} steps of epoch {epoch + 1} are redone)" if kept
                else "no epoch had finished, nothing kept")
        print(f"stopped by {stop.signal_name} in epoch {epoch + 1}/{args.epochs}: {what}; run the same command "
              f"again (--resume auto) to continue", file=sys.stderr, flush=True)
        print(json.dumps(summary), flush=True)
    barrier(d)
    return summary


if __name__ == "__main__":
    run_cli(main)
