"""train/ssl_data.py's ImageFolder pipeline: the official INTL crops as uint8 PIL work, deterministic per
(seed, epoch, index) in any worker, normalised on the device by to_model_input; and train/bench_data.py."""
import dataclasses
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train")
sys.path.insert(0, TRAIN)

import bench_data  # noqa: E402
import ssl_data as sd  # noqa: E402
from ssl_data import CropSpec, DataError, FolderViews  # noqa: E402


def photo(rng, size=40):
    """A small photo-like RGB image: smooth colour plus grain (so blurring visibly removes detail)."""
    coarse = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    grain = rng.normal(0, 25, (size, size, 3))
    return Image.fromarray((np.asarray(coarse, dtype=np.float32) + grain).clip(0, 255).astype(np.uint8))


def write_folder(root, per_class=3):
    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(root / "train" / f"class{c}", exist_ok=True)
        for i in range(per_class):
            ext = "png" if i % 2 else "jpg"  # both decoders
            photo(rng).save(root / "train" / f"class{c}" / f"{i}.{ext}")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("data"))


def crops(ds, index, epoch):
    return ds[(index, epoch)][0]


def assert_same(a, b):
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def high_freq_energy(x: torch.Tensor) -> float:
    """Mean squared difference of neighbouring pixels, both directions (blind to a horizontal flip)."""
    x = x.double()
    return float((x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean())


# ------------------------------------------------------------------ the recipes
def test_recipes_are_the_official_ones():
    two = sd.two_crop_specs(224)
    assert two == [CropSpec(224, (0.08, 1.0), 1.0, 0.0), CropSpec(224, (0.08, 1.0), 0.1, 0.2)]
    multi = sd.multi_crop_specs(224)
    assert [s.size for s in multi] == [224, 224, 192, 160, 128, 96]
    # the official table (winci-ai/INTL src/transform.py, 6 crops) gives these to 3 decimals
    assert [s.scale[0] for s in multi] == pytest.approx([0.2, 0.2, 0.171, 0.143, 0.114, 0.086], abs=6e-4)
    assert [s.scale[1] for s in multi] == pytest.approx([1.0, 1.0, 0.857, 0.714, 0.571, 0.429], abs=6e-4)
    assert all(s.blur_p == 0.5 and s.solarize_p == 0.1 for s in multi)
    # other sizes: sides shrink in proportion (the 32 px test recipe of tests/test_train.py)
    assert [s.size for s in sd.multi_crop_specs(32)] == [32, 32, 27, 23, 18, 14]
    assert sd.multi_crop_specs(32)[2:] == [dataclasses.replace(a, size=b.size)
                                           for a, b in zip(multi[2:], sd.multi_crop_specs(32)[2:])]
    with pytest.raises(dataclasses.FrozenInstanceError):
        two[0].size = 1


def test_transform_is_the_official_pil_pipeline():
    from torchvision.transforms import v2

    steps = sd.ssl_transform(CropSpec(24, (0.3, 0.9), 0.25, 0.125)).transforms
    assert [type(s) for s in steps] == [v2.RandomResizedCrop, v2.RandomApply, v2.RandomGrayscale, sd.RandomPILBlur,
                                        sd.RandomPILSolarize, v2.RandomHorizontalFlip, v2.PILToTensor]
    rrc, jitter, gray, blur, solarize, flip, _ = steps
    assert rrc.size == (24, 24) and rrc.scale == (0.3, 0.9) and rrc.interpolation == v2.InterpolationMode.BICUBIC
    (cj,) = jitter.transforms
    assert jitter.p == 0.8 and isinstance(cj, v2.ColorJitter)
    assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
    assert gray.p == 0.2 and blur.p == 0.25 and blur.sigma == (0.1, 2.0) and solarize.p == 0.125 and flip.p == 0.5
    # every step but the last keeps a PIL image (no tensor round trips); the last gives uint8 CHW
    x = photo(np.random.default_rng(1))
    forced = [v2.RandomResizedCrop(24, interpolation=v2.InterpolationMode.BICUBIC), v2.ColorJitter(0.4, 0.4, 0.2, 0.1),
              v2.RandomGrayscale(1.0), sd.RandomPILBlur(1.0), sd.RandomPILSolarize(1.0), v2.RandomHorizontalFlip(1.0)]
    for step in forced:  # every step applied (p = 1)
        x = step(x)
        assert isinstance(x, Image.Image) and x.mode == "RGB", step
    out = steps[-1](x)
    assert type(out) is torch.Tensor and out.dtype == torch.uint8 and out.shape == (3, 24, 24)


# ------------------------------------------------------------------ crops: dtype, sizes, determinism
@pytest.mark.parametrize("recipe", ["two", "multi"])
def test_crops_are_uint8_of_the_recipe_sizes(folder, recipe):
    specs = sd.two_crop_specs(32) if recipe == "two" else sd.multi_crop_specs(32)
    ds = FolderViews(str(folder), "train", specs, seed=0)
    assert len(ds) == 6
    views, label = ds[(4, 0)]
    assert label == 1 and len(views) == len(specs)
    for v, s in zip(views, specs):
        assert v.dtype == torch.uint8 and v.shape == (3, s.size, s.size)


def test_crops_depend_only_on_seed_epoch_index(folder):
    specs = sd.multi_crop_specs(24)
    a, b = FolderViews(str(folder), "train", specs, seed=3), FolderViews(str(folder), "train", specs, seed=3)
    first = crops(a, 1, 2)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    assert_same(first, crops(b, 1, 2))  # another instance
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    assert_same(first, crops(a, 1, 2))  # other global states (torch, Python, numpy): no influence
    for other in (crops(a, 1, 3), crops(a, 2, 2), crops(FolderViews(str(folder), "train", specs, seed=4), 1, 2)):
        assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], first[1])  # the two full-size crops differ too
    # the caller's torch generator is left as it was
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a[(0, 0)]
    assert torch.equal(torch.rand(3), expected)


def test_workers_do_not_change_the_batches(folder):
    ds = FolderViews(str(folder), "train", sd.two_crop_specs(24), seed=0)
    sampler = sd.EpochSampler(ds, num_replicas=1, rank=0, seed=0)
    sampler.set_epoch(1)

    def batches(workers):
        return [b for b in DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers)]

    b0, b2 = batches(0), batches(2)
    assert len(b0) == len(b2) == 3
    for (c0, y0), (c2, y2) in zip(b0, b2):
        assert torch.equal(y0, y2)
        assert_same(c0, c2)
        assert c0[0].dtype == torch.uint8 and c0[0].shape == (2, 3, 24, 24)


# ------------------------------------------------------------------ blur, solarisation
def test_blur_draws_from_torch_and_blurs(folder):
    img = photo(np.random.default_rng(2))
    torch.manual_seed(7)
    apply, u = torch.rand(2).tolist()  # what RandomPILBlur draws, in its order
    torch.manual_seed(7)
    out = sd.RandomPILBlur(1.0)(img)
    assert np.array_equal(np.asarray(out), np.asarray(img.filter(ImageFilter.GaussianBlur(0.1 + 1.9 * u))))
    assert sd.RandomPILBlur(0.0)(img) is img
    # in the pipeline: blur p 1 vs p 0 draw the same numbers, so only the blur differs; it removes detail
    sharp = FolderViews(str(folder), "train", [CropSpec(32, (0.5, 1.0), 0.0, 0.0)], seed=0)
    blurred = FolderViews(str(folder), "train", [CropSpec(32, (0.5, 1.0), 1.0, 0.0)], seed=0)
    e_sharp = [high_freq_energy(crops(sharp, i, 0)[0]) for i in range(6)]
    e_blur = [high_freq_energy(crops(blurred, i, 0)[0]) for i in range(6)]
    assert all(b <= s for b, s in zip(e_blur, e_sharp)) and sum(e_blur) < 0.7 * sum(e_sharp), (e_blur, e_sharp)


def test_solarize_inverts_pixels_from_128(folder):
    ramp = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16).repeat(3).reshape(16, 16, 3))
    out = np.asarray(sd.RandomPILSolarize(1.0)(ramp)).astype(int)
    x = np.asarray(ramp).astype(int)
    assert np.array_equal(out, np.where(x >= 128, 255 - x, x))
    assert sd.RandomPILSolarize(0.0)(ramp) is ramp
    # in the pipeline: same draws, so p 1 is exactly the solarised p 0 crop (solarisation is pointwise)
    plain = crops(FolderViews(str(folder), "train", [CropSpec(24, (0.2, 1.0), 0.5, 0.0)], seed=1), 3, 0)[0]
    solar = crops(FolderViews(str(folder), "train", [CropSpec(24, (0.2, 1.0), 0.5, 1.0)], seed=1), 3, 0)[0]
    assert torch.equal(solar, torch.where(plain >= 128, 255 - plain, plain))


# ------------------------------------------------------------------ to_model_input
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_to_model_input_normalises_uint8_on_the_device(device):
    x = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(sd.IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(sd.IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    expected = (x.double() / 255 - mean) / std
    y = sd.to_model_input(x, device)
    assert y.dtype == torch.float32 and y.device.type == device and y.is_contiguous()
    torch.testing.assert_close(y.cpu().double(), expected, rtol=0, atol=1e-6)
    # channels_last, also from a non-contiguous batch (a permuted HWC one, like PILToTensor's crops)
    z = sd.to_model_input(x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), device, torch.channels_last)
    assert z.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(z.cpu().double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_to_model_input_passes_float_through(device):
    f = torch.randn(2, 3, 4, 4)
    y = sd.to_model_input(f, device)
    assert y.dtype == torch.float32 and torch.equal(y.cpu(), f)
    z = sd.to_model_input(f, device, memory_format=torch.channels_last)
    assert z.is_contiguous(memory_format=torch.channels_last) and torch.equal(z.cpu(), f)
    h = sd.to_model_input(f.half(), device)
    assert h.dtype == torch.float16  # float types are left to the caller / autocast


def test_synthetic_views_and_evaluation_images(folder):
    views, _ = sd.SyntheticViews(4, [8, 6], 3, seed=0)[(1, 0)]
    assert [(v.dtype, v.shape[-1]) for v in views] == [(torch.float32, 8), (torch.float32, 6)]
    views, _ = sd.SyntheticViews(4, [8, 6], 3, seed=0, uint8=True)[(1, 0)]
    assert [(v.dtype, v.shape[-1]) for v in views] == [(torch.uint8, 8), (torch.uint8, 6)]
    # evaluation images are uint8 too: resize the short side to 16 x 256/224 = 18, centre crop 16
    img, label = sd.FolderImages(str(folder), "train", 16)[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 16, 16) and label == 0
    from PIL import Image

    path = sd.FolderImages(str(folder), "train", 16).folder.samples[0][0]
    ref = torch.from_numpy(np.array(Image.open(path).convert("RGB").resize((18, 18), Image.BILINEAR))).permute(2, 0, 1)
    assert (img.int() - ref[:, 1:17, 1:17].int()).abs().max() <= 1
    crop = sd.probe_transform(12)(Image.open(path).convert("RGB"))
    assert crop.dtype == torch.uint8 and crop.shape == (3, 12, 12)


# ------------------------------------------------------------------ errors
def test_unreadable_image_is_named_through_two_workers(tmp_path):
    root = write_folder(tmp_path / "data", per_class=2)
    bad = root / "train" / "class1" / "broken.png"
    bad.write_bytes(b"not a png at all")
    ds = FolderViews(str(root), "train", sd.two_crop_specs(16), seed=0)
    loader = DataLoader(ds, batch_size=1, sampler=[(i, 0) for i in range(len(ds))], num_workers=2)
    with pytest.raises(DataError) as e:
        list(loader)
    assert str(bad) in str(e.value) and "unreadable image" in str(e.value)


# ------------------------------------------------------------------ bench_data.py
def test_bench_data_in_process(capsys):
    r = bench_data.main(["--samples", "2", "--size", "16", "--images", "2", "--target", "500"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(r))
    assert {(row["recipe"], row["pipeline"]) for row in r["rows"]} == {
        (a, b) for a in ("2-crop", "multi-crop (6)") for b in ("new", "old")}
    for row in r["rows"]:
        assert row["per_worker"] > 0
        assert row["workers_per_gpu_for_target"] == pytest.approx(500 / row["per_worker"], rel=1e-2)
    assert r["cpu_count"] == os.cpu_count() and r["torch"] == torch.__version__ and r["date"]


def test_bench_data_script_with_workers():
    proc = subprocess.run([sys.executable, "train/bench_data.py", "--samples", "2", "--size", "16", "--images", "2",
                           "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted({row["workers"] for row in r["rows"]}) == [1, 2] and r["bench"] == "data"
