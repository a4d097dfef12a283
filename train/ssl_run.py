"""Run plumbing shared by train/pretrain.py and train/linear_eval.py: distributed setup that also works
as one plain process, atomic checkpoints with auto-resume that never loses the last good one, stopping
cleanly on SIGTERM, progress lines, one-line errors, run metadata, JSON-lines logs."""
from __future__ import annotations

import glob
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ssl_data import DataError

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
# A run folder holds ckpt_<progress>.pt files (progress: the step, or the epoch in linear_eval.py), written
# atomically. Only files that load count: a truncated or foreign file is never resumed from, never counted
# towards --keep-checkpoints and never deleted by pruning (it may be a copy in progress; the user decides).
def atomic_save(obj, path: str) -> None:
    """torch.save to path.tmp, fsync, then os.replace: a crash leaves the old file or the new one, never half."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):  # e.g. a full disk: the older checkpoints are untouched
            os.remove(tmp)
        raise


def checkpoint_path(out_dir: str, progress: int) -> str:
    return os.path.join(out_dir, f"ckpt_{progress:09d}.pt")


def checkpoint_progress(path: str) -> int:
    """The step (or epoch) in a checkpoint's file name; -1 for a name not written by checkpoint_path."""
    m = re.fullmatch(r"ckpt_(\d+)\.pt", os.path.basename(path))
    return int(m.group(1)) if m else -1


def list_checkpoints(out_dir: str) -> list[str]:
    """Every ckpt_*.pt of out_dir, newest first (by the number in the name), readable or not."""
    return sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")), key=lambda p: (checkpoint_progress(p), p), reverse=True)


def read_checkpoint(path: str, required: tuple[str, ...] = (), mmap: bool = False) -> dict:
    """torch.load of a checkpoint, or a ValueError that names the file and what is wrong with it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, pickle of another program, a directory...: all unusable
        why = ("not a torch checkpoint: truncated, or another format" if not zipfile.is_zipfile(path) else
               f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        raise ValueError(f"checkpoint {path!r} cannot be read ({why})") from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"checkpoint {path!r} is not one of this script's (no {', '.join(missing)})")
    return state


def good_checkpoints(out_dir: str, required: tuple[str, ...] = ()) -> list[str]:
    """The checkpoints of out_dir that load (newest first); memory-mapped, so a large file costs little."""
    good = []
    for path in list_checkpoints(out_dir):
        try:
            read_checkpoint(path, required, mmap=True)
            good.append(path)
        except ValueError:
            pass
    return good


def prune_checkpoints(out_dir: str, keep: int, required: tuple[str, ...] = ()) -> list[str]:
    """Delete the good checkpoints beyond the newest `keep` (>= 1); unreadable files are left alone and
    do not count. Returns the deleted paths."""
    doomed = good_checkpoints(out_dir, required)[max(keep, 1):]
    for path in doomed:
        os.remove(path)
    return doomed


def clear_checkpoints(out_dir: str) -> None:
    """Start over (--resume none): every ckpt_*.pt goes, readable or not."""
    for path in list_checkpoints(out_dir):
        os.remove(path)


def load_newest_good(out_dir: str, required: tuple[str, ...]) -> tuple[dict | None, str | None]:
    """The newest checkpoint that loads and holds `required` keys; unreadable ones are reported and skipped."""
    for path in list_checkpoints(out_dir):
        try:
            return read_checkpoint(path, required), path
        except ValueError as e:  # a truncated or foreign file: fall back to the previous one
            print(f"warning: skipping {e}", file=sys.stderr)
    return None, None


def resolve_resume(resume: str, out_dir: str, required: tuple[str, ...],
                   progress_key: str = "step") -> tuple[dict | None, str | None]:
    """The state to continue from, or (None, None) to start afresh.

    auto: the newest good checkpoint of out_dir; a fresh start only when out_dir holds no checkpoint at
    all: if it holds some and none loads, this refuses instead of silently starting over.
    none: a fresh start (the caller clears out_dir's checkpoints). A file: that checkpoint, unless out_dir
    holds good checkpoints newer than it, which the new run's pruning would otherwise treat as its own.
    """
    if resume == "none":
        return None, None
    if resume == "auto":
        state, path = load_newest_good(out_dir, required)
        if state is None and list_checkpoints(out_dir):
            names = ", ".join(os.path.basename(p) for p in list_checkpoints(out_dir))
            raise ValueError(f"--output-dir {out_dir!r} holds checkpoints but none of them loads ({names}): pass a "
                             f"good one with --resume FILE, or --resume none to delete them and start over")
        return state, path
    if not os.path.isfile(resume):
        raise ValueError(f"--resume {resume!r}: no such checkpoint file (use auto, none or a path)")
    state = read_checkpoint(resume, required)
    newer = [p for p in good_checkpoints(out_dir, required) if checkpoint_progress(p) > state[progress_key]
             and not os.path.samefile(p, resume)]
    if newer:
        raise ValueError(f"--output-dir {out_dir!r} holds checkpoints newer than --resume {resume!r} "
                         f"({', '.join(os.path.basename(p) for p in newer)}); continue those with --resume auto, or "
                         f"resume this one into a new --output-dir")
    return state, resume


def check_same_run(state: dict, current: dict, ignore: set[str], path: str, n_train: int) -> None:
    """Refuse to continue a checkpoint made with different flags (a silent schedule change) or on data of
    another size (the data may move, e.g. to node-local disk; a different count means other samples)."""
    saved = state["args"]
    diff = {k: (saved.get(k), v) for k, v in current.items() if k not in ignore and saved.get(k) != v}
    if diff:
        lines = ", ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"checkpoint {path} was made with other flags ({lines}); pass the same flags, "
                         f"a new --output-dir, or --resume none to start over")
    if state.get("n_train", n_train) != n_train:
        raise DataError(f"the training data holds {n_train} images, the run of {path} had {state['n_train']}: "
                        f"the sample order would differ (pass the same data or a new --output-dir)")


def make_output_dir(path: str) -> None:
    """os.makedirs with an error that names --output-dir (rank 0 creates it before anything is written)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test.{os.getpid()}")  # one per rank: they may share the folder
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--output-dir {path!r} cannot be created or written: {e.strerror or e}") from None


# ------------------------------------------------------------------ stopping on a signal
class StopRequest:
    """SIGTERM (SLURM, spot instances, torchrun's shutdown) and SIGUSR1 (SLURM's --signal) set a flag
    instead of killing the process; the training loop checks it after each step, saves a checkpoint and
    exits cleanly. requested() agrees across ranks, so every rank stops after the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signal_name = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers only install there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def requested(self, d: Dist) -> bool:
        if d.world == 1:
            return self.signal_name is not None
        flag = torch.tensor([float(self.signal_name is not None)], device=d.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signal_name is None:
            self.signal_name = "a signal on another rank"
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# ------------------------------------------------------------------ progress and the command line
class Progress:
    """One epoch's progress on rank 0: a live tqdm bar in a terminal; in a log file (batch jobs, CI),
    where tqdm's redraws would be noise, one plain line every `every` steps and at the end."""

    def __init__(self, d: Dist, total: int, desc: str, initial: int = 0, every: int = 10):
        from tqdm import tqdm

        self.enabled, self.every, self.desc, self.total, self.n = d.main, max(every, 1), desc, total, initial
        self.live = d.main and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not self.live, dynamic_ncols=True,
                        leave=False, file=sys.stderr)
        self.t0, self.n0 = time.time(), initial

    def update(self, **stats) -> None:
        """One step done; stats (name -> number or text) are shown beside it."""
        self.n += 1
        if self.live:
            self.bar.update(1)
            self.bar.set_postfix({k: _fmt(v) for k, v in stats.items()}, refresh=False)
        elif self.enabled and (self.n % self.every == 0 or self.n == self.total):
            rate = (self.n - self.n0) / max(time.time() - self.t0, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            items = " ".join(f"{k} {_fmt(v)}" for k, v in stats.items())
            print(f"{self.desc} {self.n}/{self.total} | {items} | {rate:.2f} it/s, eta {eta / 60:.1f} min",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def error_line(e: BaseException) -> str:
    """An exception as one line. Errors raised in DataLoader workers arrive re-wrapped as "Caught X in
    DataLoader worker process N. Original Traceback ...": the original message is its last line."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def run_cli(main) -> None:
    """Run a script's main(): expected failures (bad flags or data, a non-finite loss, an unusable
    checkpoint or folder) end with one "error: ..." line and exit status 1, no traceback."""
    try:
        main()
    except (ValueError, FloatingPointError, OSError) as e:  # ssl_data.DataError is a ValueError
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(1)


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
