"""Data for train/pretrain.py and train/linear_eval.py: the bundled digits, any ImageFolder, synthetic.

Every sample's augmentation is seeded by (seed, epoch, index), and the sampler yields (index, epoch)
pairs, so the crops of a sample do not depend on the world size, the number of workers or the
point a run was resumed from: a 2-process run sees exactly the global batches of a 1-process run.

ImageFolder crops (FolderViews) are made by the official INTL augmentations on PIL images and leave the
workers as uint8 tensors, a quarter of float32's bytes; to_model_input turns them into normalised float32
on the device. The digits, synthetic and evaluation datasets give normalised float tensors.
"""
from __future__ import annotations

import functools
import itertools
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DIGITS_MEAN, DIGITS_STD = 0.30, 0.38  # of load_digits / 16 (pixel values 0..16)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A data folder or file that cannot be used, with a message that says which and why."""


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2 ** 63)


class EpochSampler(DistributedSampler):
    """DistributedSampler (shuffle, drop_last) that yields (index, epoch) and can skip the first
    `skip` samples of this rank's share (mid-epoch resume). Global batch b is the slice
    perm[b*B:(b+1)*B] of one permutation seeded by (seed, epoch), for any number of ranks."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        return ((i, self.epoch) for i in itertools.islice(super().__iter__(), self.skip, None))

    def __len__(self) -> int:
        return self.num_samples - self.skip


# ------------------------------------------------------------------ digits (sklearn, 8x8, no download)
def load_digits_split(seed: int = 0, test_fraction: float = 0.3):
    """(x_train, y_train, x_test, y_test): (N, 1, 8, 8) float images in [0, 1], stratified held-out split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    i_tr, i_te = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=digits.target)
    return x[i_tr], y[i_tr], x[i_te], y[i_te]


def digits_normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - DIGITS_MEAN) / DIGITS_STD


def digits_augment(img: torch.Tensor, n_views: int, g: torch.Generator) -> list[torch.Tensor]:
    """Views of one (1, 8, 8) digit: a random resized crop (area 0.5-1, aspect 3/4-4/3) with a small
    rotation (+-15 deg) as one affine resampling (zero background, like the digits'), then pixel noise."""
    area = 0.5 + 0.5 * torch.rand(n_views, generator=g)
    aspect = torch.exp((torch.rand(n_views, generator=g) - 0.5) * 2 * math.log(4 / 3))
    sx, sy = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
    cx, cy = (1 - sx) * (2 * torch.rand(n_views, generator=g) - 1), (1 - sy) * (2 * torch.rand(n_views, generator=g) - 1)
    angle = (torch.rand(n_views, generator=g) - 0.5) * (math.pi / 6)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output grid coords (x, y) in [-1, 1] -> input coords: rotate, scale to the crop, shift to its centre
    theta = torch.stack([torch.stack([sx * cos, -sx * sin, cx], -1), torch.stack([sy * sin, sy * cos, cy], -1)], 1)
    grid = F.affine_grid(theta, [n_views, *img.shape], align_corners=False)
    views = F.grid_sample(img.expand(n_views, *img.shape), grid, align_corners=False)
    views = (views + 0.1 * torch.randn(views.shape, generator=g)).clamp(0, 1)
    return [digits_normalize(v) for v in views]


class DigitsViews(Dataset):
    """Digits images -> (list of n_views augmented crops, label); items are (index, epoch) pairs."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, n_views: int, seed: int):
        self.images, self.labels, self.n_views, self.seed = images, labels, n_views, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item):
        index, epoch = item
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        return digits_augment(self.images[index], self.n_views, g), self.labels[index]


# ------------------------------------------------------------------ ImageFolder (ImageNet layout)
def check_image_folder(root: str, split: str) -> str:
    """root/split as a usable ImageFolder path, or a DataError that names the folder and the problem."""
    if not os.path.isdir(root):
        raise DataError(f"--data {root!r} does not exist or is not a folder (expected an ImageFolder root with train/ and val/)")
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise DataError(f"--data {root!r} has no {split}/ folder (expected {root}/{split}/<class>/<image>)")
    classes = [c for c in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, c))]
    if not classes:
        raise DataError(f"{path!r} is empty: expected one sub-folder of images per class, found none")
    for c in classes:  # cheap check of the first file only; every file is checked when read
        for _, _, files in os.walk(os.path.join(path, c)):
            if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
                break
        else:
            raise DataError(f"class folder {os.path.join(path, c)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return path


def load_rgb(path: str):
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:  # PIL raises several types; all mean the same thing here
        raise DataError(f"unreadable image {path!r}: {type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class CropSpec:
    """One crop of the SSL views: output side, RandomResizedCrop area range, blur and solarisation chances."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


def two_crop_specs(size: int, scale: tuple[float, float] = (0.08, 1.0), blur: tuple[float, float] = (1.0, 0.1),
                   solarize: tuple[float, float] = (0.0, 0.2)) -> list[CropSpec]:
    """The official asymmetric 2-crop recipe of plain INTL on ImageNet (BYOL's): the first view is always
    blurred and never solarised, the second is blurred with p 0.1 and solarised with p 0.2."""
    return [CropSpec(size, tuple(scale), b, s) for b, s in zip(blur, solarize)]


MULTI_CROP_SIDES = (192, 160, 128, 96)  # the official INTL-M small crops, for 224 crops


def multi_crop_specs(size: int, base: int = 224, min_scale: float = 0.2) -> list[CropSpec]:
    """The official INTL-M multi-crop: 2 crops of `size` (area min_scale-1) and 4 smaller ones whose side and
    area range shrink by c / base for c in 192, 160, 128, 96 (official table: min area 0.2/0.171/0.143/
    0.114/0.086, max 1/0.857/0.714/0.571/0.429); blur p 0.5 and solarisation p 0.1 for every crop."""
    specs = [CropSpec(size, (min_scale, 1.0), 0.5, 0.1)] * 2
    for c in MULTI_CROP_SIDES:
        f = c / base
        specs.append(CropSpec(round(size * f), (min_scale * f, f), 0.5, 0.1))
    return specs


class RandomPILBlur:
    """PIL Gaussian blur with probability p, sigma ~ U(0.1, 2). Both numbers are always drawn from torch's
    global generator (seeded per sample), so the draws of the transforms after it do not depend on p."""

    def __init__(self, p: float, sigma: tuple[float, float] = (0.1, 2.0)):
        self.p, self.sigma = p, sigma

    def __call__(self, img):
        from PIL import ImageFilter

        apply, u = torch.rand(2).tolist()
        if apply >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, sigma={self.sigma})"


class RandomPILSolarize:
    """PIL solarisation (pixels >= 128 -> 255 - pixel) with probability p, one draw from torch's generator."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        from PIL import ImageOps

        return ImageOps.solarize(img, 128) if torch.rand(()).item() < self.p else img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


def ssl_transform(spec: CropSpec):
    """One crop of the official INTL (BYOL) pipeline, on a PIL image, in the official order: bicubic
    RandomResizedCrop, ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2, blur, solarisation,
    horizontal flip; then a uint8 (3, size, size) tensor. Every step stays in PIL (torchvision's v2
    kernels for PIL images are PIL's own; its v2 GaussianBlur is not, hence RandomPILBlur). The float
    conversion and normalisation happen on the device: see to_model_input."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(spec.size, scale=spec.scale, interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        RandomPILBlur(spec.blur_p),
        RandomPILSolarize(spec.solarize_p),
        v2.RandomHorizontalFlip(p=0.5),
        v2.PILToTensor(),
    ])


@functools.lru_cache(maxsize=None)
def _normalize_affine(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) on `device` with (x / 255 - mean) / std == x * scale + shift, made once per device."""
    mean, std = torch.tensor(IMAGENET_MEAN, dtype=torch.float64), torch.tensor(IMAGENET_STD, dtype=torch.float64)
    scale, shift = 1 / (255 * std), -mean / std
    return (scale.view(1, 3, 1, 1).to(device, torch.float32), shift.view(1, 3, 1, 1).to(device, torch.float32))


def to_model_input(x: torch.Tensor, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """A batch as the network's input on `device`. uint8 batches (FolderViews crops: 4x fewer bytes to
    move than float32) become float32 there, normalised with the ImageNet mean/std; float batches (digits,
    synthetic views, evaluation images) are already normalised and only move. Then `memory_format`."""
    x = x.to(device, non_blocking=True)
    if x.dtype != torch.uint8:
        return x.contiguous(memory_format=memory_format)
    scale, shift = _normalize_affine(x.device)
    # one conversion (dtype and layout together), then in-place ops, which keep the layout
    return x.to(torch.float32, memory_format=memory_format).mul_(scale).add_(shift)


def eval_transform(size: int):
    """Evaluation images: resize the short side to size x 256/224, centre crop (evaluate.py's 256 / 224 at
    224 px), as PIL operations, shipped as uint8 like the training crops (to_model_input normalises them)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(int(round(size * 256 / 224))), v2.CenterCrop(size), v2.PILToTensor()])


def probe_transform(size: int):
    """The linear probe's training augmentation (evaluate.py): random resized crop (area 0.08-1) and a
    horizontal flip, on PIL images, shipped as uint8."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), v2.PILToTensor()])


class FolderViews(Dataset):
    """ImageFolder images -> (list of uint8 crops, one per CropSpec, label); items are (index, epoch) pairs,
    so each sample's crops are drawn from torch's generator seeded by (seed, epoch, index), in any worker."""

    def __init__(self, root: str, split: str, crops: list[CropSpec], seed: int):
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(check_image_folder(root, split), loader=load_rgb)
        self.crops = list(crops)
        self.transforms = [ssl_transform(c) for c in self.crops]
        self.seed = seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, item):
        index, epoch = item
        path, label = self.folder.samples[index]
        img = load_rgb(path)
        # The transforms draw from torch's global CPU generator: seed it for this sample and restore it
        # after. Only the CPU one: torch.manual_seed would also (re)seed the CUDA generators, which
        # fork_rng(devices=[]) does not restore (the training's, with workers=0), and costs ~1 ms.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            return [t(img) for t in self.transforms], label


class FolderImages(Dataset):
    """Plain evaluation images (resize, centre crop; uint8) and labels of root/split; optionally a fixed subset."""

    def __init__(self, root: str, split: str, size: int, limit: int | None = None, seed: int = 0):
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(check_image_folder(root, split), loader=load_rgb, transform=eval_transform(size))
        n = len(self.folder)
        self.indices = list(range(n))
        if limit is not None and limit < n:  # a fixed random subset keeps the kNN monitor cheap
            self.indices = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].tolist())

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.folder[self.indices[i]]


class SyntheticViews(Dataset):
    """Random images (pipeline and throughput checks without data): crops of the given sizes, normal
    floats, or with uint8=True random uint8 pixels like FolderViews' crops (to_model_input normalises)."""

    def __init__(self, n: int, sizes: list[int], channels: int, seed: int, n_classes: int = 10, uint8: bool = False):
        self.n, self.sizes, self.channels, self.seed, self.n_classes = n, sizes, channels, seed, n_classes
        self.uint8 = uint8

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item):
        index, epoch = item
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        if self.uint8:
            crops = [torch.randint(0, 256, (self.channels, s, s), generator=g, dtype=torch.uint8) for s in self.sizes]
        else:
            crops = [torch.randn(self.channels, s, s, generator=g) for s in self.sizes]
        return crops, index % self.n_classes


class TensorImages(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]
