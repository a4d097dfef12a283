"""train/export.py (a pretrain.py backbone as a torchvision ResNet state_dict) and train/bench_step.py
(one rank's step of a multi-GPU run, the loss on the global batch): CPU, tiny settings."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "train"))

import bench_step  # noqa: E402
import intl_ops  # noqa: E402
import export  # noqa: E402
from ssl_models import INTLNet  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ARGS = {"arch": "resnet50", "small_stem": False, "ema": 0.996, "dataset": "imagefolder", "projector": "64-64"}


def run_cli(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def save_ckpt(path, net, ema_net=None, step=10, **args):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"net": net.state_dict() if net is not None else {}, "ema": ema_net.state_dict() if ema_net is not None else None,
                "args": {**ARGS, **args}, "step": step}, path)
    return str(path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A pretrain.py-like INTL-M run folder: a ResNet-50 checkpoint whose EMA encoder differs from the online one."""
    torch.manual_seed(0)
    net, ema = INTLNet("resnet50", "64-64", 3, False), INTLNet("resnet50", "64-64", 3, False)
    out = tmp_path_factory.mktemp("run")
    save_ckpt(out / "ckpt_000000010.pt", net, ema)
    return out, net, ema


def load_into(path, arch="resnet50"):
    import torchvision

    model = getattr(torchvision.models, arch)()
    missing, unexpected = model.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    return model.state_dict()


@pytest.mark.parametrize("encoder", ["online", "ema"])
def test_export_run_folder_loads_into_torchvision(run_dir, tmp_path, encoder):
    out, net, ema = run_dir
    r = export.main([str(out), str(tmp_path / "r50.pth"), "--encoder", encoder])
    assert (r["arch"], r["encoder"], r["step"], r["small_stem"]) == ("resnet50", encoder, 10, False)
    assert r["source"].endswith("ckpt_000000010.pt") and r["tensors"] == len(torch.load(tmp_path / "r50.pth"))
    sd = load_into(tmp_path / "r50.pth")
    src = (net if encoder == "online" else ema).backbone
    assert torch.equal(sd["layer4.2.conv3.weight"], src.layer4[2].conv3.weight)
    assert torch.equal(sd["bn1.running_var"], src.bn1.running_var)


def test_export_cli_on_a_file_with_wrapper_prefixes(tmp_path):
    net = INTLNet("resnet18", "16-16", 3, False)
    wrapped = {k.replace("backbone.", "backbone._orig_mod.module."): v for k, v in net.state_dict().items()}
    torch.save({"net": wrapped, "ema": None, "args": {**ARGS, "arch": "resnet18"}, "step": 3}, tmp_path / "ckpt.pt")
    proc = run_cli("train/export.py", str(tmp_path / "ckpt.pt"), str(tmp_path / "o.pth"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 3
    assert torch.equal(load_into(tmp_path / "o.pth", "resnet18")["conv1.weight"], net.backbone.conv1.weight)
    assert not os.path.exists(tmp_path / "o.pth.tmp")


def test_export_small_stem_when_allowed(tmp_path):
    net = INTLNet("resnet18", "16-16", 3, True)
    ckpt = save_ckpt(tmp_path / "ckpt.pt", net, arch="resnet18", small_stem=True)
    r = export.main([ckpt, str(tmp_path / "r18.pth"), "--allow-small-stem"])
    assert r["small_stem"] and torch.load(tmp_path / "r18.pth")["conv1.weight"].shape == (64, 3, 3, 3)


def test_export_refusals(tmp_path):
    cnn = save_ckpt(tmp_path / "cnn" / "ckpt.pt", INTLNet("cnn", "16-16", 1, False), arch="cnn")
    stem = save_ckpt(tmp_path / "stem" / "ckpt.pt", None, small_stem=True)
    (tmp_path / "corrupt.pt").write_bytes(b"truncated checkpoint")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    for argv, message in [([cnn], "arch 'cnn' is the digits demo's small CNN, not a torchvision model"),
                          ([stem], "torchvision's resnet50 has a 7x7 stem"),
                          ([str(tmp_path / "missing.pt")], "no such file or folder"),
                          ([str(tmp_path / "corrupt.pt")], "corrupt.pt' cannot be read"),
                          ([str(tmp_path / "foreign.pt")], "foreign.pt' is not one of this script's"),
                          ([str(tmp_path / "cnn")], "no readable pretrain.py checkpoint"),  # a folder without ckpt_*.pt
                          ([save_ckpt(tmp_path / "intl.pt", None, ema=0.0), "--encoder", "ema"], "plain INTL")]:
        with pytest.raises(ValueError, match=message):
            export.main([argv[0], str(tmp_path / "o.pth"), *argv[1:]])
    for path in (stem, str(tmp_path / "corrupt.pt")):  # the CLI: one line, exit 1
        proc = run_cli("train/export.py", path, str(tmp_path / "o.pth"))
        assert proc.returncode == 1 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "o.pth")


# ------------------------------------------------------------------ bench_step
def test_bench_step_per_rank_shape_and_amps(tmp_path):
    r = bench_step.main(["--device", "cpu", "--arch", "cnn", "--image-size", "12", "--batch-size", "16", "--world", "4",
                         "--projector", "32-32", "--steps", "1", "--warmup", "1", "--losses", "reference",
                         "--amps", "bf16", "off", "fp16", "--ema", "0.99", "--crops", "3", "--out", str(tmp_path / "s.json")])
    assert json.loads((tmp_path / "s.json").read_text()) == r
    assert (r["world"], r["per_rank_batch"], r["backbone_input"]) == (4, 4, [4, 1, 12, 12])
    assert r["loss_input"] == [2, 16, 32] and r["loss_target"] == [16, 32] and r["gather_comm"] == "not timed"
    assert r["process_group"]["ddp"] and r["process_group"]["gradient_as_bucket_view"]
    assert list(r["results"]) == [f"{loss}/{amp}" for amp in ("bf16", "off", "fp16") for loss in ("reference",)]
    for key, row in r["results"].items():
        assert "error" not in row, (key, row)
        assert row["loss_input_seen"] == [2, 16, 32]  # the loss whitened the global batch
        for k in ("step_ms", "images_per_s", "images_per_s_per_rank", "loss_head_ms", "loss_head_share", "final_loss"):
            assert math.isfinite(row[k]) and row[k] > 0, (key, k, row[k])
        assert row["images_per_s"] == pytest.approx(4 * row["images_per_s_per_rank"])
    assert not torch.distributed.is_initialized()  # the one-process group is gone


def test_bench_step_plain_intl_table_and_flag_errors(capsys):
    r = bench_step.main(["--device", "cpu", "--arch", "cnn", "--image-size", "12", "--batch-size", "16", "--world", "4",
                         "--projector", "32-32", "--steps", "1", "--warmup", "1", "--losses", "reference", "literal"])
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1]) == r and r["objective"] == "INTL"
    assert list(r["results"]) == ["reference/off", "literal/off"] and r["loss_input"] == [2, 16, 32]
    assert "img/s global" in err and "reference/off" in err
    with pytest.raises(SystemExit):
        bench_step.parse_args(["--batch-size", "10", "--world", "4"])
    assert "--batch-size 10 (the GLOBAL batch) must be a multiple of --world 4" in capsys.readouterr().err


def test_bench_step_loss_is_the_global_loss_with_local_gradient():
    """The emulated rank: its rows + the others' fixed rows give the global loss, and its rows' gradient is
    theirs in the one-process loss of the whole batch (what intl_loss's gather gives each rank)."""
    x = torch.randn(2, 16, 8, dtype=torch.float64, requires_grad=True)
    target = torch.randn(16, 8, dtype=torch.float64)
    full = intl_ops.intl_loss(x, target=target, backend="reference")
    full.backward()
    local = x.detach()[:, :4].clone().requires_grad_()
    loss_fn = bench_step.with_other_ranks(intl_ops.intl_loss, x.detach()[:, 4:], target[4:])
    loss, _ = loss_fn(local, 4, 0, None, target=target[:4], backend="reference", return_parts=True)
    loss.backward()
    torch.testing.assert_close(loss, full)
    torch.testing.assert_close(local.grad, x.grad[:, :4])
    assert loss_fn.seen == [2, 16, 8]
