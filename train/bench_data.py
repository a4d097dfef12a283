#!/usr/bin/env python
"""Throughput of the ImageNet data pipeline of pretrain.py (FolderViews): 2-crop samples/s per worker.

    python train/bench_data.py                       # synthetic 500x375 JPEGs in a temp dir, 1 worker
    python train/bench_data.py --data /imagenet --workers 8 --samples 400

Compares, on the same images and crop recipes (plain INTL's 2 crops, INTL-M's 6 crops):
  new  the PIL pipeline of ssl_data.ssl_transform: uint8 crops, normalised later on the device;
  old  the former torchvision-v2 tensor pipeline (ToImage, tensor colour jitter / blur, float32 and
       normalisation in the worker), kept here, and only here, as the baseline.
A sample is one image and all its crops, decoding included. "1 worker" is this process on one thread,
as a DataLoader worker runs, timed by wall clock and by CPU time (the per-worker rate on a core of its own,
robust to other load); --workers N also times N workers through a DataLoader (wall clock). The last line printed
is one JSON object with the figures and the machine's CPU count and library versions.

--target is a throughput YOU choose (images/s one GPU should be fed); the table's last column divides it
by the measured per-worker rate. It is not a measurement of any GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ssl_data import IMAGENET_MEAN, IMAGENET_STD, FolderViews, multi_crop_specs, two_crop_specs  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=60, help="timed samples per (recipe, pipeline) (default 60)")
    p.add_argument("--workers", type=int, default=0, help="also time N DataLoader workers (default 0: skip)")
    p.add_argument("--data", help="an ImageFolder root (its train/ is read); default: synthetic JPEGs in a temp dir")
    p.add_argument("--size", type=int, default=224, help="crop size (default 224)")
    p.add_argument("--target", type=float, default=1000.0,
                   help="user-chosen target images/s per GPU, to print workers needed per GPU (default 1000)")
    p.add_argument("--images", type=int, default=24, help="number of synthetic images (default 24)")
    a = p.parse_args(argv)
    if a.samples < 1 or a.workers < 0 or a.size < 8:
        p.error("--samples must be >= 1, --workers >= 0, --size >= 8")
    return a


def _old_tensor_transform(spec):
    """The former pipeline (before the uint8/PIL one), verbatim in effect: tensor ops after ToImage, a
    blur kernel ~10% of the crop, float32 and normalisation in the worker. The benchmark's baseline only."""
    from torchvision.transforms import v2

    kernel = max(3, int(0.1 * spec.size) // 2 * 2 + 1)
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(spec.size, scale=spec.scale, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=spec.blur_p),
        v2.RandomSolarize(threshold=128, p=spec.solarize_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def write_jpeg_folder(root: str, n: int, width: int = 500, height: int = 375, seed: int = 0) -> str:
    """An ImageFolder (root/train/<class>/*.jpg) of n photo-like JPEGs: smooth colour fields plus grain,
    so that they decode and compress like photographs (pure noise would be much larger and slower)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = os.path.join(root, "train", f"class{i % 2}")
        os.makedirs(folder, exist_ok=True)
        coarse = Image.fromarray((rng.random((height // 32, width // 32, 3)) * 255).astype(np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
        grain = rng.normal(0, 8, smooth.shape)
        pixels = (smooth + grain).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i}.jpg"), quality=90)
    return root


def views(root: str, specs, pipeline: str) -> FolderViews:
    ds = FolderViews(root, "train", specs, seed=0)
    if pipeline == "old":  # same images, seeding and recipe; only the per-crop transform differs
        ds.transforms = [_old_tensor_transform(s) for s in specs]
    return ds


def time_one_worker(ds, n: int) -> tuple[float, float]:
    """(samples/s by wall clock, samples/s by this process's CPU time) of ds[(index, 1)] in this process
    on one thread, a DataLoader worker's setting. The CPU-time rate is what one worker reaches on a core
    of its own; the wall-clock one is lower when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(min(3, n)):  # warm-up: imports, first-call costs
            ds[(i % len(ds), 0)]
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            ds[(i % len(ds), 1)]
        return n / (time.perf_counter() - wall), n / max(time.process_time() - cpu, 1e-9)
    finally:
        torch.set_num_threads(threads)


def time_loader(ds, n: int, workers: int) -> float:
    """Samples/s of a DataLoader with `workers` worker processes, timed from its first batch (so the
    workers' start-up is not counted) over about n samples per worker."""
    from torch.utils.data import DataLoader

    batch = 8
    items = [(i % len(ds), 0) for i in range(batch * workers + n * workers)]
    loader = DataLoader(ds, batch_size=batch, sampler=items, num_workers=workers)
    it = iter(loader)
    next(it)
    t, count = time.perf_counter(), 0
    for crops, _ in it:
        count += len(crops[0])
    return count / (time.perf_counter() - t)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import PIL
    import PIL.features
    import torchvision

    recipes = {"2-crop": two_crop_specs(args.size), "multi-crop (6)": multi_crop_specs(args.size)}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or write_jpeg_folder(tmp, args.images)
        source = args.data or f"{args.images} synthetic 500x375 JPEGs"
        rows = []
        for recipe, specs in recipes.items():
            for pipeline in ("new", "old"):
                ds = views(root, specs, pipeline)
                wall, cpu = time_one_worker(ds, args.samples)
                rows.append(dict(recipe=recipe, pipeline=pipeline, workers=1, samples_per_s=wall, per_worker=cpu))
                if args.workers:
                    rate = time_loader(ds, args.samples, args.workers)
                    rows.append(dict(recipe=recipe, pipeline=pipeline, workers=args.workers, samples_per_s=rate,
                                     per_worker=rate / args.workers))
    for r in rows:
        r["ms_per_sample_per_worker"] = 1000 / r["per_worker"]
        r["workers_per_gpu_for_target"] = args.target / r["per_worker"]

    print(f"data: {source}; crops of {args.size} px; {args.samples} timed samples per row; "
          f"{os.cpu_count()} CPUs on this machine")
    print(f"{'recipe':<15} {'pipeline':<9} {'workers':>7} {'samples/s':>10} {'per worker':>10} "
          f"{'ms/sample':>9} {'workers/GPU for target':>23}")
    for r in rows:
        print(f"{r['recipe']:<15} {r['pipeline']:<9} {r['workers']:>7} {r['samples_per_s']:>10.1f} "
              f"{r['per_worker']:>10.1f} {r['ms_per_sample_per_worker']:>9.1f} "
              f"{r['workers_per_gpu_for_target']:>23.1f}")
    print("samples/s: by wall clock. per worker: for workers=1 by this process's CPU time (one core of its own), "
          "for a DataLoader samples/s / workers (wall clock, lower where workers share cores)")
    one_worker = {(r["recipe"], r["pipeline"]): r["per_worker"] for r in rows if r["workers"] == 1}
    speedup = {recipe: one_worker[recipe, "new"] / one_worker[recipe, "old"] for recipe in recipes}
    print("new / old, one worker: " + ", ".join(f"{k} {v:.2f}x" for k, v in speedup.items()))
    print(f"target {args.target:g} images/s per GPU is a user-chosen figure (--target), not a measurement; "
          f"workers/GPU = target / per-worker samples/s, assuming workers scale linearly on free cores")
    result = {
        "bench": "data", "data": source, "size": args.size, "samples": args.samples,
        "rows": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "speedup_new_over_old": {k: round(v, 2) for k, v in speedup.items()},
        "target_images_per_s_user_chosen": args.target,
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__,
        "libjpeg_turbo": PIL.features.check_feature("libjpeg_turbo"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
