"""train/: the digits demo end to end, INTL-M + multi-crop on a tiny ImageFolder, 2 gloo processes == 1
process, kill-and-resume, non-finite loss, clear errors, linear evaluation (CPU, tiny settings)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

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
from ssl_run import Dist, error_line, good_checkpoints, load_newest_good, prune_checkpoints, read_checkpoint  # noqa: E402

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
    """The first update (gradients, momentum, EMA) of 2 processes equals 1 process to rounding; the logged
    losses of all 3 steps agree. The states after 3 steps are not compared: once the weights differ by
    rounding, a pre-activation that sits exactly on a ReLU kink (the digits have constant regions) can
    take either side, and a later gradient then differs by a few percent in either run (rounding-level
    noise on the loss gradient is enough to flip it)."""
    flags = ["train/pretrain.py", "--batch-size", "64", "--epochs", "1", "--max-steps", "3", "--log-every", "1",
             "--ema", "0.9", "--ckpt-every-steps", "1", "--keep-checkpoints", "3", *QUIET]
    one, two = tmp_path / "one", tmp_path / "two"
    run_script([*flags, "--output-dir", str(one)])
    run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *flags, "--output-dir", str(two)])
    log1 = [json.loads(x) for x in (one / "log.jsonl").read_text().splitlines()]
    log2 = [json.loads(x) for x in (two / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log1] == [r["step"] for r in log2] == [1, 2, 3]
    for a, b in zip(log1, log2, strict=True):
        for key in ("loss", "align", "trace", "lr", "eff_rank"):  # eff_rank: of the gathered global batch
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    firsts = []
    for out in (one, two):
        ckpts = {read_checkpoint(p)["step"]: p for p in good_checkpoints(str(out), ("net", "optimizer", "step"))}
        assert sorted(ckpts) == [1, 2, 3], ckpts
        firsts.append(read_checkpoint(ckpts[1]))
    assert_same_state(*firsts, rtol=1e-4, atol=1e-5)
    assert load_ckpt(one)["step"] == load_ckpt(two)["step"] == 3
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


def short_run(out, *flags, steps=2):
    """A few digits steps into out (the final evaluation included): a checkpoint at `steps`."""
    return pretrain.main(["--epochs", "1", "--batch-size", "128", "--max-steps", str(steps), "--output-dir", str(out),
                          *QUIET, *flags])


def test_unreadable_checkpoints_never_cost_a_good_one(tmp_path):
    """Two unreadable high-numbered files used to count as the newest checkpoints: every new checkpoint was
    pruned right after being written. Now only files that load count, and unreadable ones are left alone."""
    short_run(tmp_path)
    for junk in ("ckpt_000000100.pt", "ckpt_000000200.pt"):
        (tmp_path / junk).write_bytes(b"half a checkpoint")
    assert short_run(tmp_path, steps=4)["resumed_from"].endswith("ckpt_000000002.pt")
    names = sorted(p.name for p in tmp_path.glob("ckpt_*"))
    assert names == ["ckpt_000000002.pt", "ckpt_000000004.pt", "ckpt_000000100.pt", "ckpt_000000200.pt"]
    assert load_ckpt(tmp_path)["step"] == 4
    short_run(tmp_path, "--keep-checkpoints", "1", steps=6)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_000000006.pt", "ckpt_000000100.pt", "ckpt_000000200.pt"]
    # pruning alone: good files beyond `keep` go, newest first kept; a foreign file never counts
    torch.save({"unrelated": 1}, tmp_path / "ckpt_000000300.pt")
    assert prune_checkpoints(str(tmp_path), 1, pretrain.REQUIRED) == []
    assert (tmp_path / "ckpt_000000006.pt").exists()


def test_auto_resume_refuses_when_no_checkpoint_loads(tmp_path):
    (tmp_path / "ckpt_000000050.pt").write_bytes(b"truncated")
    (tmp_path / "log.jsonl").write_text('{"step": 50, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"none of them loads \(ckpt_000000050.pt\).*--resume none"):
        short_run(tmp_path)
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 50, "loss": 1.0}\n'  # the old run's log is untouched
    short_run(tmp_path, "--resume", "none")  # the explicit flag starts over, and clears the unreadable file
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_000000002.pt"]


def test_resume_from_an_older_file_into_the_same_run_is_refused(tmp_path):
    short_run(tmp_path, "--ckpt-every-steps", "2", steps=4)
    with pytest.raises(ValueError, match=r"newer than --resume .*ckpt_000000002.pt.*\(ckpt_000000004.pt\)"):
        short_run(tmp_path, "--resume", str(tmp_path / "ckpt_000000002.pt"), steps=6)
    s = short_run(tmp_path / "branch", "--resume", str(tmp_path / "ckpt_000000002.pt"), steps=3)
    assert s["steps"] == 3 and load_ckpt(tmp_path)["step"] == 4


def start_until_logged(argv, log, records: int, timeout: float = 240) -> subprocess.Popen:
    """Start a training process and return once its log.jsonl holds `records` step records (or it ended)."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + timeout
    while not (log.exists() and len(log.read_text().splitlines()) >= records) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.2)
    return proc


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path):
    flags = ["train/pretrain.py", "--epochs", "3", "--batch-size", "128", "--log-every", "1", "--print-every", "2",
             "--output-dir", str(tmp_path), *QUIET]
    proc = start_until_logged(flags, tmp_path / "log.jsonl", 11)  # into epoch 2 (9 steps an epoch)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    stopped = last_json(out)
    assert stopped["stopped_by"] == "SIGTERM" and 11 <= stopped["steps"] < 27, stopped
    assert "stopped by SIGTERM after step" in err and "Traceback" not in err
    state = load_ckpt(tmp_path)
    assert state["step"] == stopped["steps"] and state["tag"] == "signal"
    # stderr is not a terminal: a plain progress line every 2 steps and at the epoch's end, with the data share
    assert "epoch 1/3 2/9 | loss" in err and "epoch 1/3 3/9 |" not in err and "epoch 1/3 9/9 |" in err
    assert "data " in err
    done = last_json(run_script(flags).stdout)
    assert done["steps"] == 27 and done["resumed_from"].endswith(f"ckpt_{stopped['steps']:09d}.pt")


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Under torchrun a signal may reach one worker first: the ranks agree (an all-reduce of the flag), so
    all of them save and leave after the same step, and torchrun exits 0."""
    flags = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train/pretrain.py", "--epochs", "3",
             "--batch-size", "64", "--log-every", "1", "--output-dir", str(tmp_path), *QUIET]
    proc = start_until_logged(flags, tmp_path / "log.jsonl", 2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGTERM)  # one worker only (either rank)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    stopped = last_json(out)
    assert stopped["stopped_by"] in ("SIGTERM", "a signal on another rank") and stopped["steps"] < 57, stopped
    state = load_ckpt(tmp_path)
    assert state["step"] == stopped["steps"] and state["tag"] == "signal"


def test_resume_allows_harmless_changes_and_checks_the_data(folder, tmp_path):
    flags = ["--data", str(folder), "--arch", "cnn", "--image-size", "16", "--batch-size", "8", "--epochs", "2",
             "--projector", "16-16", "--workers", "0", "--output-dir", str(tmp_path), *QUIET]
    pretrain.main([*flags, "--max-steps", "1"])
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.copytree(folder, moved)  # the data copied to node-local disk, other workers, backend and kNN k
    s = pretrain.main([*flags, "--max-steps", "2", "--data", str(moved), "--workers", "1", "--backend", "reference",
                       "--knn-k", "3", "--log-every", "5"])
    assert s["steps"] == 2 and s["resumed_from"].endswith("ckpt_000000001.pt")
    (moved / "train" / "class0" / "0.png").unlink()
    with pytest.raises(DataError, match=r"holds 15 images, the run of .* had 16"):
        pretrain.main([*flags, "--data", str(moved)])


def test_batch_smaller_than_world_is_a_clear_error():
    args = pretrain.parse_args(["--batch-size", "2"])
    with pytest.raises(ValueError, match=r"--batch-size 2 must be a multiple of the 4 processes"):
        pretrain.pretrain(args, Dist(0, 4, 0, torch.device("cpu")))


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
    (["--preset", "intl-imagenet-800ep"], "is an ImageFolder recipe: pass --data ROOT"),
    (["--data", "/x", "--blur-prob", "0.5", "0.5", "0.5"], "one value or one per crop (2 crops)"),
    (["--data", "/x", "--solarize-prob", "1.5"], "must be in [0, 1]"),
], ids=["ema", "arch", "no-data", "projector", "digits-size", "epochs", "batch-type", "resume", "preset-digits",
        "blur-count", "solarize-range"])
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        pretrain.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_one_line_errors(tmp_path, folder):
    """What a user gets wrong first ends with one "error:" line naming the problem, exit status 1."""
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "a_file").write_text("x")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "train" / "class1" / "zz_broken.png").write_bytes(b"not a png")
    small = ["--arch", "cnn", "--image-size", "16", "--projector", "16-16", "--batch-size", "4", "--epochs", "1", *QUIET]
    cases = [
        (["--resume", str(tmp_path / "corrupt.pt"), "--output-dir", str(tmp_path / "o1")], "corrupt.pt' cannot be read"),
        (["--output-dir", str(tmp_path / "a_file" / "run")], "--output-dir"),
        (["--backend", "triton", "--output-dir", str(tmp_path / "o2")], "--backend triton: backend='triton' cannot run on cpu"),
        (["--data", str(broken), *small, "--workers", "2", "--output-dir", str(tmp_path / "o3")],
         "unreadable image '" + str(broken / "train" / "class1" / "zz_broken.png")),
    ]
    env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}  # Triton on CPU only runs under the interpreter
    for argv, message in cases:
        proc = subprocess.run([sys.executable, "train/pretrain.py", *argv], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (argv, proc.stderr[-2000:])
        assert lines[-1].startswith("error: ") and message in lines[-1], (argv, lines[-1])


def test_error_line_unwraps_dataloader_worker_errors():
    wrapped = ValueError("Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
                         "  File \"x.py\", line 1, in f\nssl_data.DataError: unreadable image '/d/a.png': broken")
    assert error_line(wrapped) == "unreadable image '/d/a.png': broken"
    assert error_line(ValueError("plain\nsecond line")) == "plain"


# ------------------------------------------------------------------ presets: the official recipes
def test_presets_and_recipe_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        pretrain.parse_args(["--preset", "intl-m-imagenet-800ep", "--data", "/imagenet", "--print-config"])
    assert e.value.code == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["arch"], cfg["epochs"], cfg["base_lr"], cfg["ema"], cfg["multi_crop"]) == ("resnet50", 800, 0.3, 0.996, True)
    assert cfg["crops"] == [224, 224, 192, 160, 128, 96] and cfg["blur_prob"] == [0.5] * 6 and cfg["solarize_prob"] == [0.1] * 6
    assert [round(lo, 3) for lo, _ in cfg["crop_scales"]] == [0.2, 0.2, 0.171, 0.143, 0.114, 0.086]
    assert [round(hi, 3) for _, hi in cfg["crop_scales"]] == [1.0, 1.0, 0.857, 0.714, 0.571, 0.429]
    assert cfg["published"].startswith("76.6 %") and cfg["output_dir"] == os.path.join("runs", "intl-m-imagenet-800ep")
    # a flag given on the command line wins over the preset
    a = pretrain.parse_args(["--preset", "intl-m-imagenet-100ep", "--data", "/x", "--epochs", "10", "--base-lr", "0.1"])
    assert (a.epochs, a.base_lr, a.ema) == (10, 0.1, 0.996)
    # plain INTL on an ImageFolder: the asymmetric BYOL crops, scale 0.08-1, lr by epoch budget
    a = pretrain.parse_args(["--data", "/x"])
    assert (a.crops, a.crop_scales, a.blur_prob, a.solarize_prob) == ([224, 224], [[0.08, 1.0]] * 2, [1.0, 0.1], [0.0, 0.2])
    assert [pretrain.parse_args(["--data", "/x", "--epochs", str(e)]).base_lr for e in (100, 200, 400, 800)] == [0.5, 0.4, 0.4, 0.3]
    a = pretrain.parse_args(["--preset", "intl-cifar10-1000ep", "--data", "/c"])
    assert (a.arch, a.image_size, a.small_stem, a.blur_prob, a.weight_decay) == ("resnet18", 32, True, [0.0, 0.0], 1e-4)
    assert not a.zero_init_residual
    for preset in pretrain.PRESETS:  # every preset resolves to a valid configuration
        pretrain.parse_args(["--preset", preset, "--data", "/x"])


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
    # the digits CNN's features are tiny (std ~0.06): the standardising head learns them in 3 epochs
    s = linear_eval.main(["--pretrained", str(out), "--epochs", "3", "--milestones", "2", "--batch-size", "128",
                          "--head", "bn-linear", "--output-dir", str(tmp_path)])
    assert s["top1"] > 0.5 and s["top5"] >= s["top1"] and s["train_images"] == 1257
    again = linear_eval.main(["--pretrained", str(out), "--epochs", "3", "--milestones", "2", "--batch-size", "128",
                              "--head", "bn-linear", "--output-dir", str(tmp_path)])
    assert again["top1"] == pytest.approx(s["top1"])  # a finished run is resumed, not redone


def test_semi_supervised_finetune(digits_run, tmp_path):
    out, _ = digits_run
    s = linear_eval.main(["--pretrained", str(out), "--mode", "finetune", "--train-percent", "10", "--epochs", "2",
                          "--lr-backbone", "0.05", "--batch-size", "32", "--output-dir", str(tmp_path)])
    assert s["train_images"] == pytest.approx(126, abs=10) and 0 <= s["top1"] <= 1


def test_bench_step_smoke(tmp_path):
    """The GPU throughput script (train/bench_step.py) runs end to end; CPU timings here mean nothing."""
    r = bench_step.main(["--device", "cpu", "--arch", "cnn", "--image-size", "12", "--batch-size", "16", "--projector",
                         "32-32", "--steps", "1", "--warmup", "1", "--losses", "reference", "literal", "--ema", "0.99",
                         "--crops", "3", "--out", str(tmp_path / "step.json")])
    assert json.loads((tmp_path / "step.json").read_text()) == r
    for name in ("reference", "literal"):
        row = r["results"][f"{name}/off"]  # (loss, autocast); CPU runs without autocast by default
        assert row["images_per_s"] > 0 and 0 < row["loss_head_share"], row
