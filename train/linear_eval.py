#!/usr/bin/env python
"""Evaluate a train/pretrain.py backbone: a linear classifier on frozen features (the reference schedule:
100 epochs of SGD, lr steps x0.1 at epochs 60 and 80), or a semi-supervised fine-tune of the whole
network on a fraction of the labels. Resumable (a checkpoint per epoch, --resume auto), torchrun-ready.

    python train/linear_eval.py --pretrained runs/digits-cnn-intl                   # digits, frozen
    torchrun --nproc_per_node 8 train/linear_eval.py --pretrained runs/in1k --data /imagenet
    torchrun --nproc_per_node 8 train/linear_eval.py --pretrained runs/in1k --data /imagenet \\
        --mode finetune --train-percent 1 --epochs 20 --milestones 12 16 --lr-backbone 0.005

The classifier is BatchNorm1d(affine=False) + Linear: a per-feature standardisation learned from the
training features, then a linear map (still a linear probe at test time; robust to the feature scale).
The last printed line is a JSON summary (top-1 / top-5 on the held-out split).
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

from ssl_data import DataError, FolderImages, TensorImages, check_image_folder, digits_normalize, load_digits_split
from ssl_models import build_backbone, shard_sampler
from ssl_run import (JsonLog, atomic_save, barrier, check_same_run, checkpoint_path, cleanup, init_distributed,
                     list_checkpoints, prune_checkpoints, resolve_resume, run_metadata)

RESUME_FREE = {"output_dir", "resume", "workers", "device"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("backbone and data")
    g.add_argument("--pretrained", required=True, help="a pretrain.py run folder (its newest checkpoint) or a ckpt_*.pt")
    g.add_argument("--data", help="ImageFolder root (train/, val/); default: the pretraining run's dataset")
    g.add_argument("--workers", type=int, help="DataLoader workers per process: 0 for digits, else 8")
    g = p.add_argument_group("protocol")
    g.add_argument("--mode", choices=["linear", "finetune"], default="linear",
                   help="linear: frozen backbone (eval mode); finetune: train the backbone too (semi-supervised)")
    g.add_argument("--train-percent", type=float, default=100.0,
                   help="percent of the labelled training images used, the same share of each class (1 or 10: semi-supervised)")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--milestones", type=int, nargs="*", default=[60, 80], help="epochs where the lr is divided by 10")
    g.add_argument("--batch-size", type=int, default=256, help="GLOBAL batch, split over the processes")
    g.add_argument("--lr-head", type=float, default=0.2, help="classifier lr at batch 256 (scaled by batch-size/256)")
    g.add_argument("--lr-backbone", type=float, default=0.0, help="backbone lr at batch 256 (finetune only)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", help="default: <pretrained run>/<mode>-p<train-percent>")
    g.add_argument("--resume", default="auto", help="auto (newest good checkpoint of --output-dir), none, or a file")
    g.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    run_dir = a.pretrained if os.path.isdir(a.pretrained) else os.path.dirname(a.pretrained)
    a.output_dir = a.output_dir or os.path.join(run_dir, f"{a.mode}-p{a.train_percent:g}")
    problems = [
        (not os.path.exists(a.pretrained), f"--pretrained {a.pretrained!r} does not exist"),
        (os.path.isdir(a.pretrained) and not list_checkpoints(a.pretrained), f"--pretrained {a.pretrained!r} holds no ckpt_*.pt"),
        (not 0 < a.train_percent <= 100, f"--train-percent must be in (0, 100], got {a.train_percent}"),
        (a.epochs < 1 or a.batch_size < 1, "--epochs and --batch-size must be >= 1"),
        (a.lr_head <= 0 or a.lr_backbone < 0 or a.weight_decay < 0, "--lr-head must be > 0, --lr-backbone and --weight-decay >= 0"),
        (a.mode == "finetune" and a.lr_backbone == 0, "--mode finetune needs --lr-backbone > 0"),
    ]
    for bad, msg in problems:
        if bad:
            p.error(msg)
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    d = init_distributed(args.device)
    try:
        return evaluate(args, d)
    finally:
        cleanup(d)


def evaluate(args, d) -> dict:
    t_start, cuda = time.time(), d.device.type == "cuda"
    if args.batch_size % d.world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {d.world} processes")
    pre, pre_path = resolve_resume("auto" if os.path.isdir(args.pretrained) else args.pretrained, args.pretrained,
                                   ("net", "args"))
    if pre is None:
        raise ValueError(f"--pretrained {args.pretrained!r}: no readable checkpoint")
    pargs = pre["args"]
    digits = pargs["dataset"] == "digits" and not args.data
    data_root = args.data or pargs.get("data")
    if not digits and not data_root:
        raise ValueError(f"the run {args.pretrained!r} was not trained on an ImageFolder: pass --data ROOT")
    workers = (0 if digits else 8) if args.workers is None else args.workers

    # Data: the labelled training split (optionally a per-class subset) and the held-out split.
    train_set, val_set, in_channels, n_classes = build_eval_data(digits, data_root, pargs["image_size"], args.seed)
    if args.train_percent < 100:
        train_set = class_subset(train_set, args.train_percent, args.seed)
    sampler = DistributedSampler(train_set, num_replicas=d.world, rank=d.rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size // d.world, sampler=sampler, num_workers=workers,
                        pin_memory=cuda, persistent_workers=workers > 0, drop_last=len(train_set) >= args.batch_size)
    val_loader = DataLoader(val_set, batch_size=256, sampler=shard_sampler(val_set), num_workers=workers, pin_memory=cuda)

    # Model: the pretrained backbone (online network) + standardising linear head.
    backbone = build_backbone(pargs["arch"], in_channels, pargs["small_stem"])
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in pre["net"].items() if k.startswith("backbone.")})
    head = nn.Sequential(nn.BatchNorm1d(backbone.num_features, affine=False), nn.Linear(backbone.num_features, n_classes))
    nn.init.zeros_(head[1].bias)
    net = nn.Sequential(backbone, head)
    finetune = args.mode == "finetune"
    backbone.requires_grad_(finetune)
    if finetune and d.world > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net) if cuda else net  # CPU: per-rank BN statistics
    net = net.to(d.device)
    scale = args.batch_size / 256
    groups = [{"params": head.parameters(), "lr": args.lr_head * scale}]
    if finetune:
        groups.append({"params": backbone.parameters(), "lr": args.lr_backbone * scale})
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, gamma=0.1)

    state, resumed_from = resolve_resume(args.resume, args.output_dir, ("net", "optimizer", "epoch"))
    start_epoch, best = 0, 0.0
    if state is not None:
        check_same_run(state["args"], vars(args), RESUME_FREE, resumed_from)
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best = state["epoch"], state["best_top1"]
    if d.main:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "run.json"), "w") as f:
            json.dump({**run_metadata(vars(args), d), "pretrained": pre_path, "resumed_from": resumed_from}, f, indent=1)
    barrier(d)
    log = JsonLog(os.path.join(args.output_dir, "log.jsonl") if d.main else None)
    model = DistributedDataParallel(net, device_ids=[d.device.index] if cuda else None) if d.world > 1 else net

    top1 = top5 = float("nan")
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        torch.manual_seed(args.seed + epoch)  # augmentation draws (workers derive their seeds from it)
        net.train()
        if not finetune:
            backbone.eval()  # frozen: running statistics stay those of pretraining
        total_loss, n = 0.0, 0
        for x, y in progress(d, loader, f"epoch {epoch + 1}/{args.epochs}"):
            x, y = x.to(d.device, non_blocking=True), torch.as_tensor(y).to(d.device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}: lower --lr-head / --lr-backbone")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss, n = total_loss + loss.item() * len(y), n + len(y)
        scheduler.step()
        top1, top5 = accuracy(net, val_loader, d)
        best = max(best, top1)
        if d.main:
            log.write(epoch=epoch + 1, loss=total_loss / max(n, 1), top1=top1, top5=top5, lr=optimizer.param_groups[0]["lr"])
            print(f"epoch {epoch + 1}: loss {total_loss / max(n, 1):.4f}, val top-1 {top1:.4f}, top-5 {top5:.4f}", file=sys.stderr)
            atomic_save({"net": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "epoch": epoch + 1, "best_top1": best, "args": vars(args)},
                        checkpoint_path(args.output_dir, epoch + 1))
            prune_checkpoints(args.output_dir, 2)
        barrier(d)
    if start_epoch >= args.epochs:  # a finished run: report its accuracy again
        top1, top5 = accuracy(net, val_loader, d)
    summary = {"mode": args.mode, "train_percent": args.train_percent, "epochs": args.epochs, "top1": top1, "top5": top5,
               "best_top1": max(best, top1), "train_images": len(train_set), "pretrained": pre_path,
               "seconds": round(time.time() - t_start, 2)}
    if d.main:
        log.close()
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(json.dumps(summary), flush=True)
    return summary


# ---------------------------------------------------------------------------------------- helpers
def build_eval_data(digits: bool, root: str | None, size: int, seed: int):
    """(train, val, input channels, classes): digits' held-out split, or root/train and root/val."""
    if digits:
        x_tr, y_tr, x_te, y_te = load_digits_split(seed)
        return TensorImages(digits_normalize(x_tr), y_tr), TensorImages(digits_normalize(x_te), y_te), 1, 10
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    from ssl_data import IMAGENET_MEAN, IMAGENET_STD, load_rgb

    check_image_folder(root, "val")
    train = ImageFolder(check_image_folder(root, "train"), loader=load_rgb, transform=v2.Compose([
        v2.ToImage(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
    val = FolderImages(root, "val", size)
    if val.folder.classes != train.classes:
        raise DataError(f"{root}/train and {root}/val have different class folders")
    return train, val, 3, len(train.classes)


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
def accuracy(net, loader, d) -> tuple[float, float]:
    """Top-1 and top-5 accuracy over the whole held-out split (counts summed over the processes)."""
    was_training = net.training
    net.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=d.device)
    for x, y in loader:
        x, y = x.to(d.device, non_blocking=True), torch.as_tensor(y).to(d.device)
        top = net(x).topk(min(5, net[1][1].out_features), dim=1).indices
        counts += torch.tensor([(top[:, 0] == y).sum().item(), (top == y[:, None]).any(1).sum().item(), len(y)],
                               dtype=torch.float64, device=d.device)
    net.train(was_training)
    if d.world > 1:
        dist.all_reduce(counts)  # the shard sampler pads a few duplicates: negligible on large splits
    return (counts[0] / counts[2]).item(), (counts[1] / counts[2]).item()


def progress(d, iterable, desc: str):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, disable=not d.main or not sys.stderr.isatty(), leave=False, dynamic_ncols=True)


if __name__ == "__main__":
    try:
        main()
    except (DataError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
