#!/usr/bin/env python
"""Export a train/pretrain.py backbone as a plain torchvision ResNet state_dict.

    python train/export.py runs/in1k-r50-intl resnet50_intl.pth              # newest good checkpoint of a run
    python train/export.py runs/in1k-r50-intlm/ckpt_000500400.pt r50.pth --encoder ema

Convention (the usual one of SSL repositories): the backbone only, without fc. Load it with
    model = torchvision.models.resnet50()
    missing, unexpected = model.load_state_dict(torch.load("r50.pth"), strict=False)
    # missing == ["fc.weight", "fc.bias"], unexpected == []
--encoder online (default): the trained network; ema: INTL-M's EMA target encoder. Refused with one line:
a file that is not a readable pretrain.py checkpoint, arch cnn (not a torchvision model) and CIFAR-stem
runs (--small-stem: 3x3 stride-1 conv1, no max-pool; torchvision's 7x7 stem cannot take them). With
--allow-small-stem those are exported anyway, for a model patched the same way:
model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False); model.maxpool = nn.Identity().
The dict is loaded into that torchvision model (strict except fc) before it is written, atomically.
Prints one JSON line: out, arch, encoder, tensors, source, step, small_stem.
"""
from __future__ import annotations

import argparse
import json
import os

from torch import nn

from ssl_models import backbone_state_dict
from ssl_run import atomic_save, load_newest_good, read_checkpoint, run_cli

FC = ["fc.bias", "fc.weight"]  # sorted


class ExportError(ValueError):
    pass


def load_checkpoint(path: str) -> tuple[dict, str]:
    """(state, checkpoint path) of a run folder's newest good checkpoint or of one ckpt_*.pt file."""
    if os.path.isdir(path):
        state, ckpt = load_newest_good(path, ("net", "args"))
        if state is None:
            raise ExportError(f"{path}: no readable pretrain.py checkpoint (ckpt_*.pt) in this folder")
        return state, ckpt
    if not os.path.isfile(path):
        raise ExportError(f"{path}: no such file or folder")
    state = read_checkpoint(path, ("net", "args"))  # a ValueError naming the file when it is not one
    return state, path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a pretrain.py run folder (its newest good checkpoint) or a ckpt_*.pt file")
    p.add_argument("out", help="the .pth file to write")
    p.add_argument("--encoder", choices=["online", "ema"], default="online")
    p.add_argument("--allow-small-stem", action="store_true", help="export a CIFAR-stem ResNet (see above)")
    a = p.parse_args(argv)
    state, source = load_checkpoint(a.checkpoint)
    args, arch = state["args"], state["args"].get("arch")
    if arch == "cnn":
        raise ExportError(f"{source}: arch 'cnn' is the digits demo's small CNN, not a torchvision model: nothing to export")
    small_stem = bool(args.get("small_stem"))
    if small_stem and not a.allow_small_stem:
        raise ExportError(f"{source}: the run used --small-stem (3x3 stride-1 conv1, no max-pool); torchvision's {arch} "
                          "has a 7x7 stem and these weights would not load. Pass --allow-small-stem to export anyway")
    weights = state["net"] if a.encoder == "online" else state.get("ema")
    if weights is None:
        raise ExportError(f"{source}: --encoder ema, but the run was plain INTL (--ema {args.get('ema')}): no EMA encoder")
    import torchvision  # after the checks that need no model: a refusal costs one import less

    if not callable(getattr(torchvision.models, str(arch), None)):
        raise ExportError(f"{source}: arch {arch!r} is not a torchvision model: nothing to export")
    sd = backbone_state_dict(weights)

    # What is written must really load: the torchvision model, strict except the fc it does not hold.
    model = getattr(torchvision.models, arch)()
    if small_stem:
        model.conv1, model.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        raise ExportError(f"{source}: the backbone does not load into torchvision's {arch}: "
                          f"{' '.join(str(e).split())[:300]}")
    if sorted(missing) != FC or unexpected:
        raise ExportError(f"{source}: the backbone does not match torchvision's {arch}: missing "
                          f"{[k for k in missing if k not in FC][:5]}, unexpected {unexpected[:5]}")

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    atomic_save(sd, a.out)
    result = {"out": a.out, "arch": arch, "encoder": a.encoder, "tensors": len(sd), "source": source,
              "step": state.get("step"), "small_stem": small_stem}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    run_cli(main)
