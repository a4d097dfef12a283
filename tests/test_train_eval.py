"""train/linear_eval.py: the official evaluation protocol (head, lrs, schedule), the standard-subset file
lists, resume, stopping on SIGTERM and one-line errors (CPU, digits and a tiny ImageFolder)."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "train"))

import linear_eval  # noqa: E402
import pretrain  # noqa: E402
from ssl_data import DataError  # noqa: E402
from ssl_models import INTLNet  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def run_cli(args, timeout=120):
    return subprocess.run([sys.executable, "train/linear_eval.py", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    pretrain.main(["--epochs", "1", "--batch-size", "128", "--output-dir", str(out), "--no-tensorboard", "--eval-every", "0"])
    return out


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A tiny ImageFolder (3 classes; one file name, shared.png, in two classes) and a hand-made checkpoint of
    an INTL-M multi-crop run on it (untrained weights: these tests are about the data and the flags)."""
    from PIL import Image

    root, run = tmp_path_factory.mktemp("imgs"), tmp_path_factory.mktemp("folder_run")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in range(3):
            os.makedirs(root / split / f"class{c}")
            names = [f"c{c}_{i}.png" for i in range(n)] + (["shared.png"] if split == "train" and c < 2 else [])
            for name in names:
                Image.fromarray((rng.random((12, 12, 3)) * 255 * (0.3 + 0.35 * c)).astype(np.uint8)).save(
                    root / split / f"class{c}" / name)
    net = INTLNet("cnn", "16-16", 3, False)
    torch.save({"net": net.state_dict(), "ema": net.state_dict(), "optimizer": {}, "step": 0,
                "args": {"dataset": "imagefolder", "data": str(root), "arch": "cnn", "image_size": 12,
                         "small_stem": False, "ema": 0.996, "multi_crop": True}}, run / "ckpt_000000000.pt")
    return root, run


def folder_eval(run, out, *flags):
    return linear_eval.main(["--pretrained", str(run), "--epochs", "1", "--batch-size", "4", "--workers", "0",
                             "--output-dir", str(out), *flags])


# ------------------------------------------------------------------ the official protocol
def test_head_is_a_plain_linear_with_the_official_init():
    head = linear_eval.build_head("linear", 2048, 1000)
    assert type(head) is torch.nn.Linear
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.01) and abs(head.weight.mean().item()) < 1e-4
    assert torch.count_nonzero(head.bias) == 0
    bn = linear_eval.build_head("bn-linear", 16, 3)  # the opt-in, not the paper's
    assert isinstance(bn[0], torch.nn.BatchNorm1d) and not bn[0].affine and isinstance(bn[1], torch.nn.Linear)


def test_defaults_follow_the_official_scripts(digits_run):
    intl, intlm_mc, intlm = {"ema": 0.0, "multi_crop": False}, {"ema": 0.996, "multi_crop": True}, {"ema": 0.996}

    def lrs(pargs, *flags):
        a = linear_eval.parse_args(["--pretrained", str(digits_run), *flags])
        note = linear_eval.resolve_lrs(a, pargs)
        return a.lr_head, a.lr_backbone, note

    assert lrs(intl)[:2] == (0.2, None) and lrs(intlm)[0] == 0.2
    head, _, note = lrs(intlm_mc)
    assert head == 0.4 and "INTL-M multi-crop" in note
    assert lrs(intlm_mc, "--lr-head", "0.3")[0] == 0.3 and "--lr-head" in lrs(intlm_mc, "--lr-head", "0.3")[2]
    assert lrs(intlm_mc, "--mode", "finetune")[:2] == (0.2, 0.004)
    assert lrs(intl, "--mode", "finetune")[:2] == (0.2, 0.006)
    assert lrs(intl, "--mode", "finetune", "--lr-backbone", "0.01")[:2] == (0.2, 0.01)
    a = linear_eval.parse_args(["--pretrained", str(digits_run)])
    assert (a.epochs, a.batch_size, a.weight_decay, a.schedule, a.head) == (100, 256, 1e-5, "step", "linear")
    assert [linear_eval.lr_factor(a, e) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert linear_eval.parse_args(["--pretrained", str(digits_run), "--mode", "finetune"]).epochs == 20
    a.schedule = "cos"
    assert linear_eval.lr_factor(a, 0) == 1 and linear_eval.lr_factor(a, 50) == pytest.approx(0.5)


def test_linear_probe_and_resume(digits_run, tmp_path):
    flags = ["--pretrained", str(digits_run), "--epochs", "3", "--milestones", "2", "--batch-size", "128",
             "--lr-head", "2", "--output-dir", str(tmp_path)]
    s = linear_eval.main(flags)
    assert s["top1"] > 0.5 and s["top5"] >= s["top1"] and s["train_images"] == 1257 and s["lr_head"] == 2.0
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["lr"] for r in records] == pytest.approx([1.0, 1.0, 0.1])  # 2 x 128/256, x 0.1 from epoch 2
    again = linear_eval.main(flags)  # a finished run is resumed, not redone
    assert again["top1"] == pytest.approx(s["top1"]) and (tmp_path / "log.jsonl").read_text().count("\n") == 3
    with pytest.raises(ValueError, match=r"--lr-head was 2.0, now 0.2"):
        linear_eval.main([*flags[:-4], "--output-dir", str(tmp_path)])


# ------------------------------------------------------------------ semi-supervised subsets
def test_train_files_pick_exactly_the_listed_images(folder_run, tmp_path):
    root, run = folder_run
    names = ["c0_1.png", "c1_4.png", "c2_0.png", "class1/shared.png", "c2_5.png"]
    (tmp_path / "subset.txt").write_text("\n".join(names) + "\n\n")  # blank lines are skipped
    s = folder_eval(run, tmp_path / "out", "--train-files", str(tmp_path / "subset.txt"))
    assert s["train_images"] == len(names) and s["train_files"] == str(tmp_path / "subset.txt")
    assert "listed in" in s["train_split"] and s["lr_head"] == 0.4  # an INTL-M multi-crop run's default
    from torchvision.datasets import ImageFolder

    samples = ImageFolder(str(root / "train")).samples
    picked = linear_eval.listed_samples(str(tmp_path / "subset.txt"), samples, str(root / "train"))
    assert sorted(os.path.relpath(samples[i][0], root / "train").replace(os.sep, "/") for i in picked) == \
        sorted(["class0/c0_1.png", "class1/c1_4.png", "class2/c2_0.png", "class1/shared.png", "class2/c2_5.png"])


@pytest.mark.parametrize("lines, message", [
    (["c0_1.png", "n01440764_2708.JPEG"], r"1 of its 2 names are not images of .*train.* \(e.g. n01440764_2708.JPEG\)"),
    ([], r"lists no file names"),
    (["shared.png"], r"match images in several classes \(e.g. shared.png\); write them as class/name"),
    (["c0_1.png", "class0/c0_1.png"], r"lists 1 images more than once"),
], ids=["missing", "empty", "ambiguous", "twice"])
def test_train_files_errors(folder_run, tmp_path, lines, message):
    _, run = folder_run
    (tmp_path / "list.txt").write_text("".join(f"{x}\n" for x in lines))
    with pytest.raises(DataError, match=message):
        folder_eval(run, tmp_path / "out", "--train-files", str(tmp_path / "list.txt"))


def test_generated_split_without_a_file(folder_run, tmp_path):
    root, run = folder_run
    s = folder_eval(run, tmp_path / "out", "--train-percent", "50")
    assert s["train_split"].startswith("generated split") and "not a standard subset" in s["train_split"]
    from torchvision.datasets import ImageFolder

    train = ImageFolder(str(root / "train"))
    a, b = (linear_eval.class_subset(train, 50, seed=0).indices for _ in range(2))
    assert a == b and s["train_images"] == len(a) == 4 + 4 + 3  # round(7 / 2), round(7 / 2), 6 / 2 per class
    with pytest.raises(SystemExit):
        linear_eval.parse_args(["--pretrained", str(run), "--train-files", "x.txt", "--train-percent", "10"])


def test_finetune_on_a_listed_subset(folder_run, tmp_path):
    _, run = folder_run
    (tmp_path / "l.txt").write_text("c0_0.png\nc1_0.png\nc2_0.png\nc2_1.png\n")
    s = folder_eval(run, tmp_path / "out", "--mode", "finetune", "--train-files", str(tmp_path / "l.txt"))
    assert (s["train_images"], s["lr_head"], s["lr_backbone"]) == (4, 0.2, 0.004) and 0 <= s["top1"] <= s["top5"] <= 1


# ------------------------------------------------------------------ stopping and errors
def test_sigterm_keeps_the_last_epoch_and_the_same_command_finishes(digits_run, tmp_path):
    args = ["--pretrained", str(digits_run), "--epochs", "4", "--batch-size", "8", "--print-every", "1",
            "--lr-head", "2", "--output-dir", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, "train/linear_eval.py", *args], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    for line in proc.stderr:  # stderr is a pipe, not a terminal: plain progress lines
        seen.append(line)
        if line.startswith("epoch 2/4 1/157 |"):  # epoch 1 is checkpointed before epoch 2 starts
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    err = "".join(seen) + err
    assert proc.returncode == 0, err[-3000:]
    stop_line = next(x for x in err.splitlines() if x.startswith("stopped by SIGTERM"))
    summary = last_json(out)
    done = summary["epochs_done"]
    assert summary["stopped_by"] == "SIGTERM" and 1 <= done < 4, stop_line
    assert f"in epoch {done + 1}/4: kept {tmp_path / f'ckpt_{done:09d}.pt'}" in stop_line and "run the same command" in stop_line
    assert os.path.exists(summary["checkpoint"]) and torch.load(summary["checkpoint"])["epoch"] == done
    assert not (tmp_path / "summary.json").exists()
    again = run_cli(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert last_json(again.stdout)["epochs"] == 4 and f"resumed from {summary['checkpoint']}" in again.stderr
    assert [json.loads(x)["epoch"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_cli_errors_are_one_line(digits_run, tmp_path):
    (tmp_path / "ckpt_000000001.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "a_file").write_text("x")
    for args, message in ((["--pretrained", str(tmp_path / "ckpt_000000001.pt")], "cannot be read"),
                          (["--pretrained", str(digits_run), "--output-dir", str(tmp_path / "a_file" / "sub")],
                           "--output-dir")):
        proc = run_cli(args)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr
    with pytest.raises(ValueError, match=r"none of its checkpoints can be read"):
        linear_eval.main(["--pretrained", str(tmp_path), "--output-dir", str(tmp_path / "o")])
    (tmp_path / "l.txt").write_text("x.png\n")
    with pytest.raises(DataError, match=r"--train-files needs an ImageFolder"):
        linear_eval.main(["--pretrained", str(digits_run), "--train-files", str(tmp_path / "l.txt"),
                          "--output-dir", str(tmp_path / "o")])
