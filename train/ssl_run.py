"""Run plumbing shared by train/pretrain.py and train/linear_eval.py: distributed setup that also works
as one plain process, atomic checkpoints with auto-resume, run metadata, JSON-lines logs."""
from __future__ import annotations

import glob
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def group(self):
        """The process group for intl_loss(process_group=...): None in a single process."""
        return dist.group.WORLD if self.world > 1 else None


def init_distributed(device: str = "auto") -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPUs, gloo on CPU. Without them: one process."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:  # one GPU per process: LOCAL_RANK under torchrun, else the one named (cuda:N) or 0
        index = local_rank if world > 1 else (torch.device(device).index or 0) if device != "auto" else 0
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Dist(rank, world, local_rank, dev)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def cleanup(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------ checkpoints
def atomic_save(obj, path: str) -> None:
    """torch.save to path.tmp, fsync, then os.replace: a crash leaves the old file or the new one, never half."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"ckpt_{step:09d}.pt")


def list_checkpoints(out_dir: str) -> list[str]:
    """Newest first (by the step in the name)."""
    return sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")), reverse=True)


def prune_checkpoints(out_dir: str, keep: int) -> None:
    for old in list_checkpoints(out_dir)[keep:]:
        os.remove(old)


def load_newest_good(out_dir: str, required: tuple[str, ...]) -> tuple[dict | None, str | None]:
    """The newest checkpoint that loads and holds `required` keys; unreadable ones are reported and skipped."""
    for path in list_checkpoints(out_dir):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing = [k for k in required if k not in state]
            if missing:
                raise KeyError(f"missing {missing}")
            return state, path
        except Exception as e:  # a truncated or foreign file: fall back to the previous one
            print(f"warning: skipping checkpoint {path}: {type(e).__name__}: {e}", file=sys.stderr)
    return None, None


def resolve_resume(resume: str, out_dir: str, required: tuple[str, ...]) -> tuple[dict | None, str | None]:
    """--resume auto: newest good checkpoint of out_dir (None: start fresh); none: fresh; else a file."""
    if resume == "none":
        return None, None
    if resume == "auto":
        return load_newest_good(out_dir, required)
    if not os.path.isfile(resume):
        raise ValueError(f"--resume {resume!r}: no such checkpoint file (use auto, none or a path)")
    return torch.load(resume, map_location="cpu", weights_only=True), resume


def check_same_run(saved: dict, current: dict, ignore: set[str], path: str) -> None:
    """Refuse to continue a checkpoint made with different training flags (a silent schedule change)."""
    diff = {k: (saved.get(k), v) for k, v in current.items() if k not in ignore and saved.get(k) != v}
    if diff:
        lines = ", ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"checkpoint {path} was made with other flags ({lines}); pass the same flags, "
                         f"a new --output-dir, or --resume none to start over")


# ------------------------------------------------------------------ metadata and logs
def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_metadata(args: dict, d: Dist) -> dict:
    import intl_ops

    try:
        import torchvision
        tv = torchvision.__version__
    except ImportError:
        tv = None
    return {
        "args": args, "argv": sys.argv, "git_sha": git_sha(), "world_size": d.world, "device": str(d.device),
        "gpu": torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "torchvision": tv,
                     "intl_ops": intl_ops.__version__, "cuda": torch.version.cuda},
        "backends": intl_ops.available_backends(d.device),
    }


class JsonLog:
    """Append-only JSON-lines file (rank 0 only; other ranks get a no-op)."""

    def __init__(self, path: str | None):
        self.f = open(path, "a") if path else None

    def write(self, **record) -> None:
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
