"""train/: the digits demo end to end, INTL-M + multi-crop on a tiny ImageFolder, 2 gloo processes == 1
process, kill-and-resume, non-finite loss, clear errors, linear evaluation (CPU, tiny settings)."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train")
sys.path.insert(0, TRAIN)

import bench_step  # noqa: E402
import intl_ops  # noqa: E402
import linear_eval  # noqa: E402
import pretrain  # noqa: E402
from ssl_data import DataError, EpochSampler  # noqa: E402
from ssl_models import GlobalBatchNorm  # noqa: E402
from ssl_run import load_newest_good  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
QUIET = ["--no-tensorboard", "--eval-every", "0"]


def run_script(args, check=True, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def load_ckpt(out_dir):
    state, path = load_newest_good(str(out_dir), ("net", "optimizer", "step"))
    assert state is not None, f"no checkpoint in {out_dir}"
    return state


def assert_same_state(a: dict, b: dict, **tol):
    for key in ("net", "ema"):
        if a[key] is None:
            assert b[key] is None
            continue
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], msg=lambda m: f"{key}.{name}: {m}", **tol)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:  # SGD momentum buffers: the accumulated gradients
        torch.testing.assert_close(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"], **tol)


# ------------------------------------------------------------------ the digits demo, end to end
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    summary = pretrain.main(["--epochs", "1", "--batch-size", "128", "--output-dir", str(out), "--log-every", "2"])
    return out, summary


def test_digits_one_epoch(digits_run):
    out, s = digits_run
    for key in ("knn_acc", "linear_acc", "random_init_knn_acc", "random_init_linear_acc", "seconds"):
        assert isinstance(s[key], float) and s[key] >= 0, key
    assert s["steps"] == 1257 // 128 and s["epochs"] == 1
    assert s["knn_acc"] > 0.5 and s["random_init_knn_acc"] > 0.5  # 10 classes: chance is 0.1
    for name in ("loss.png", "spectrum.png", "run.json", "log.jsonl", "summary.json"):
        assert os.path.getsize(out / name) > 0, name
    assert any(f.startswith("events") for f in os.listdir(out / "tb"))
    meta = json.loads((out / "run.json").read_text())
    assert meta["args"]["dataset"] == "digits" and meta["versions"]["torch"] == torch.__version__ and meta["git_sha"]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 9]
    for r in records:
        assert np.isfinite(r["loss"]) and r["loss"] == pytest.approx(r["align"] + r["beta"] * r["trace"], rel=1e-5)
        assert 1 <= r["eff_rank"] <= 512 and r["images_per_s"] > 0
    assert r["beta"] == pytest.approx(intl_ops.default_beta(128))
    assert load_ckpt(out)["step"] == 9


def test_digits_demo_defaults():
    """`make train` runs the defaults: 40 epochs of the small CNN on the digits, batch 128 (checked, not run, here)."""
    a = pretrain.parse_args([])
    assert (a.dataset, a.arch, a.epochs, a.batch_size, a.crops, a.ema) == ("digits", "cnn", 40, 128, [8, 8], 0.0)


# ------------------------------------------------------------------ ImageFolder: INTL-M, multi-crop, workers
def write_image_folder(root, classes=2, per_class=8, val_per_class=3, size=40):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            os.makedirs(root / split / f"class{c}", exist_ok=True)
            for i in range(n):
                img = (rng.random((size, size, 3)) * 255 * (0.3 + 0.7 * c)).astype(np.uint8)
                Image.fromarray(img).save(root / split / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imgs"))


def test_folder_intlm_multicrop(folder, tmp_path):
    s = pretrain.main(["--data", str(folder), "--arch", "resnet18", "--image-size", "32", "--multi-crop", "--ema", "0.99",
                       "--batch-size", "8", "--epochs", "1", "--workers", "2", "--projector", "64-64",
                       "--knn-k", "3", "--log-every", "1", "--output-dir", str(tmp_path), "--no-tensorboard"])
    assert s["objective"] == "INTL-M" and s["steps"] == 2 and 0 <= s["knn_acc"] <= 1
    state = load_ckpt(tmp_path)
    assert state["args"]["crops"] == [32, 32, 27, 23, 18, 14] and state["args"]["small_stem"]
    assert state["ema"] is not None and state["ema"].keys() == state["net"].keys()
    # the EMA target moved towards the online network, but is not a copy of it
    w_net, w_ema = state["net"]["projector.0.weight"], state["ema"]["projector.0.weight"]
    assert not torch.equal(w_net, w_ema)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    m = [r["ema_momentum"] for r in records]
    assert m[0] == pytest.approx(1 - 0.01 * (1 + np.cos(np.pi * 1 / 2)) / 2) and m[-1] == pytest.approx(1.0)
    # INTL-M: only the online trace term enters the loss
    assert all(np.isfinite(r["loss"]) and r["loss"] == pytest.approx(r["align"] + r["beta"] * r["trace"], rel=1e-5)
               for r in records)
    # linear evaluation of that ResNet on the same ImageFolder (train/ and val/)
    e = linear_eval.main(["--pretrained", str(tmp_path), "--epochs", "1", "--batch-size", "8", "--workers", "0",
                          "--output-dir", str(tmp_path / "lin")])
    assert e["train_images"] == 16 and 0 <= e["top1"] <= e["top5"] == 1.0  # 2 classes: top-5 is everything


def test_synthetic_intl_plain(tmp_path):
    s = pretrain.main(["--dataset", "synthetic", "--synthetic-size", "16", "--arch", "cnn", "--image-size", "12",
                       "--batch-size", "8", "--epochs", "1", "--workers", "0", "--projector", "32-32",
                       "--output-dir", str(tmp_path), *QUIET])
    assert s["steps"] == 2 and s["knn_acc"] is None and np.isfinite(s["final_loss"])


# ------------------------------------------------------------------ 2 gloo processes == 1 process
def test_two_processes_equal_one(tmp_path):
    flags = ["train/pretrain.py", "--batch-size", "64", "--epochs", "1", "--max-steps", "3", "--log-every", "1",
             "--ema", "0.9", *QUIET]
    one, two = tmp_path / "one", tmp_path / "two"
    run_script([*flags, "--output-dir", str(one)])
    run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *flags, "--output-dir", str(two)])
    log1 = [json.loads(x) for x in (one / "log.jsonl").read_text().splitlines()]
    log2 = [json.loads(x) for x in (two / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log1] == [r["step"] for r in log2] == [1, 2, 3]
    for a, b in zip(log1, log2):
        for key in ("loss", "align", "trace", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    s1, s2 = load_ckpt(one), load_ckpt(two)
    assert s1["step"] == s2["step"] == 3
    assert_same_state(s1, s2, rtol=1e-4, atol=1e-5)
    # the kNN monitor's sharded feature extraction (gathered and re-ordered over 2 ranks) sees the same images
    sum1, sum2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert sum2["world_size"] == 2 and sum1["knn_acc"] == pytest.approx(sum2["knn_acc"], abs=2 / 540)


def test_global_batchnorm_single_process_is_batchnorm():
    x = torch.randn(6, 5, 3, 3)
    bn, gbn = torch.nn.BatchNorm2d(5), GlobalBatchNorm(5)
    torch.testing.assert_close(gbn(x), bn(x))
    torch.testing.assert_close(gbn.running_var, bn.running_var)


def test_epoch_sampler_global_batches_do_not_depend_on_world_size():
    data = list(range(50))
    one = list(EpochSampler(data, 1, 0, seed=3))
    ranks = [list(EpochSampler(data, 2, r, seed=3)) for r in range(2)]
    bs = 4  # global batch 8 = 4 per rank
    for b in range(len(ranks[0]) // bs):
        merged = ranks[0][b * bs:(b + 1) * bs] + ranks[1][b * bs:(b + 1) * bs]
        assert sorted(merged) == sorted(one[b * 2 * bs:(b + 1) * 2 * bs])
    resumed = EpochSampler(data, 1, 0, seed=3)
    resumed.set_epoch(0, skip=8)
    assert list(resumed) == one[8:]


# ------------------------------------------------------------------ runs lose nothing
def test_kill_and_resume_reproduces_the_run(tmp_path):
    flags = ["train/pretrain.py", "--batch-size", "128", "--epochs", "2", "--ckpt-every-steps", "4", *QUIET]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_script([*flags, "--output-dir", str(straight)])
    proc = run_script([*flags, "--output-dir", str(killed), "--crash-at-step", "14"], check=False)
    assert proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), proc.stderr[-2000:]
    assert load_ckpt(killed)["step"] == 12  # steps 13-14 are lost, mid-epoch 2 (9 steps per epoch)
    resumed = last_json(run_script([*flags, "--output-dir", str(killed)]).stdout)
    assert resumed["steps"] == 18
    assert_same_state(load_ckpt(straight), load_ckpt(killed), rtol=0, atol=0)
    log_a, log_b = ((d / "log.jsonl").read_text().splitlines() for d in (straight, killed))
    assert [json.loads(x)["step"] for x in log_b] == [json.loads(x)["step"] for x in log_a]  # no duplicates
    assert [json.loads(x)["loss"] for x in log_b] == [json.loads(x)["loss"] for x in log_a]


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path):
    torch.save({"net": {}, "optimizer": {}, "step": 3}, tmp_path / "ckpt_000000003.pt")
    (tmp_path / "ckpt_000000005.pt").write_bytes(b"truncated")
    state, path = load_newest_good(str(tmp_path), ("net", "optimizer", "step"))
    assert state["step"] == 3 and path.endswith("ckpt_000000003.pt")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at step 6.*ckpt_000000004.pt"):
        pretrain.main(["--epochs", "2", "--batch-size", "128", "--ckpt-every-steps", "4", "--nan-at-step", "6",
                       "--output-dir", str(tmp_path), *QUIET])
    assert sorted(os.listdir(tmp_path)) == ["ckpt_000000004.pt", "log.jsonl", "run.json"]
    assert load_ckpt(tmp_path)["step"] == 4


def test_resume_refuses_other_flags(digits_run):
    out, _ = digits_run
    with pytest.raises(ValueError, match=r"--batch-size was 128, now 64"):
        pretrain.main(["--epochs", "1", "--batch-size", "64", "--output-dir", str(out), *QUIET])


# ------------------------------------------------------------------ clear errors
def test_missing_and_empty_data_folders(tmp_path):
    with pytest.raises(DataError, match=r"does not exist"):
        pretrain.main(["--data", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")])
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"train.* is empty"):
        pretrain.main(["--data", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "o")])
    (tmp_path / "noimg" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "train" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"cat.* holds no image files"):
        pretrain.main(["--data", str(tmp_path / "noimg"), "--output-dir", str(tmp_path / "o")])
    (tmp_path / "noval" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"has no train/ folder"):
        pretrain.main(["--data", str(tmp_path / "noval" / "train"), "--output-dir", str(tmp_path / "o")])


def test_unreadable_image_is_named(tmp_path):
    root = write_image_folder(tmp_path / "data", per_class=4, val_per_class=1, size=16)
    bad = root / "train" / "class1" / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"unreadable image .*broken\.png"):
        pretrain.main(["--data", str(root), "--arch", "cnn", "--image-size", "16", "--batch-size", "9", "--epochs", "1",
                       "--workers", "0", "--projector", "16-16", "--output-dir", str(tmp_path / "o"), *QUIET])


@pytest.mark.parametrize("argv, message", [
    (["--ema", "1.5"], "--ema must be in [0, 1)"),
    (["--arch", "vgg16"], "invalid choice: 'vgg16'"),
    (["--dataset", "imagefolder"], "--dataset imagefolder needs --data"),
    (["--projector", "512-x"], "--projector must be sizes joined by '-'"),
    (["--image-size", "16"], "--dataset digits works on its 8x8 images"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--batch-size", "lots"], "invalid int value: 'lots'"),
    (["--resume", "/no/such/ckpt.pt"], "not auto, none or a checkpoint file"),
], ids=["ema", "arch", "no-data", "projector", "digits-size", "epochs", "batch-type", "resume"])
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        pretrain.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_reports_errors_without_traceback(tmp_path):
    proc = run_script(["train/pretrain.py", "--data", str(tmp_path / "missing")], check=False)
    assert proc.returncode == 1 and "error: --data" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ helpers and evaluation
def test_lr_schedule_and_ema_momentum():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    lrs = [pretrain.set_lr(opt, s, 1.0, 0.001, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.001, abs=1e-3)
    net, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    w0 = ema.weight.detach().clone()
    m = pretrain.ema_update(ema, net, 0.996, 0, 100)
    assert m == pytest.approx(0.996)
    torch.testing.assert_close(ema.weight, 0.996 * w0 + 0.004 * net.weight.detach())
    assert pretrain.ema_update(ema, net, 0.996, 100, 100) == pytest.approx(1.0)


def test_linear_eval_and_resume(digits_run, tmp_path):
    out, _ = digits_run
    s = linear_eval.main(["--pretrained", str(out), "--epochs", "3", "--milestones", "2", "--batch-size", "128",
                          "--output-dir", str(tmp_path)])
    assert s["top1"] > 0.5 and s["top5"] >= s["top1"] and s["train_images"] == 1257
    again = linear_eval.main(["--pretrained", str(out), "--epochs", "3", "--milestones", "2", "--batch-size", "128",
                              "--output-dir", str(tmp_path)])
    assert again["top1"] == pytest.approx(s["top1"])  # a finished run is resumed, not redone


def test_semi_supervised_finetune(digits_run, tmp_path):
    out, _ = digits_run
    s = linear_eval.main(["--pretrained", str(out), "--mode", "finetune", "--train-percent", "10", "--epochs", "2",
                          "--lr-backbone", "0.05", "--batch-size", "32", "--output-dir", str(tmp_path)])
    assert s["train_images"] == pytest.approx(126, abs=10) and 0 <= s["top1"] <= 1


def test_bench_step_smoke(tmp_path):
    """The GPU throughput script (issue 6's figure) runs end to end; CPU timings here mean nothing."""
    r = bench_step.main(["--device", "cpu", "--arch", "cnn", "--image-size", "12", "--batch-size", "16", "--projector",
                         "32-32", "--steps", "1", "--warmup", "1", "--losses", "reference", "literal", "--ema", "0.99",
                         "--crops", "3", "--out", str(tmp_path / "step.json")])
    assert json.loads((tmp_path / "step.json").read_text()) == r
    for name in ("reference", "literal"):
        row = r["results"][name]
        assert row["images_per_s"] > 0 and 0 < row["loss_head_share"], row
