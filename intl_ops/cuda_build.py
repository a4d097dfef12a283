"""The one build definition of the CUDA extension (csrc/): sources, toolkit, flags, cache folder.

Both ways of building use it, so they compile the same thing with the same flags:
  - `pip install` (setup.py loads this file by its path, without importing the intl_ops package, and
    builds `intl_ops._C` from extension());
  - the JIT build, build(): torch.utils.cpp_extension.load into build_dir(), cached by ninja
    (intl_ops.backend_cuda.build() calls it and then registers the ops' shape functions).
torch is imported inside the functions only: this file must load where torch is missing (setup.py then
builds without the extension).

Where the sources are: csrc/ next to intl_ops/ in a source checkout; intl_ops/csrc/ in an installed
copy (package data, see pyproject.toml). The JIT cache: $INTL_OPS_CUDA_BUILD_DIR, else build/ of a
writable source checkout, else $XDG_CACHE_HOME/intl_ops (~/.cache/intl_ops): never the install folder.
Env: INTL_OPS_CUDA_ARCH (default "90a"; ";"-separated, >= 90: the kernels use thread-block clusters),
CUDA_HOME / CUDA_PATH (the toolkit root), INTL_OPS_CUDA_BUILD_DIR.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent  # intl_ops/
CHECKOUT = PACKAGE.parent  # the source tree, when this file is in one (else site-packages or the like)
SOURCE_FILES = ("intl_cuda.cpp", "intl_kernels.cu")  # compiled, in this order
HEADER_FILES = ("intl_cuda.h",)  # included: a change rebuilds the extension
JIT_NAME = "intl_ops_cuda"  # the JIT library's name (the pip-built one is the module intl_ops._C)


def in_checkout() -> bool:
    """True when this file runs from a source checkout (or an unpacked sdist), not an installed copy."""
    return (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "csrc").is_dir()


def csrc_dir() -> Path:
    """The CUDA sources: csrc/ of the checkout, or the copy installed as package data (intl_ops/csrc/)."""
    return CHECKOUT / "csrc" if in_checkout() else PACKAGE / "csrc"


def sources() -> list[Path]:
    return [csrc_dir() / name for name in SOURCE_FILES]


def headers() -> list[Path]:
    return [csrc_dir() / name for name in HEADER_FILES]


def cuda_arches() -> list[str]:
    """Target architectures, from INTL_OPS_CUDA_ARCH (default "90a"), e.g. "90a" or "90;100a"."""
    arches = [a.strip() for a in os.environ.get("INTL_OPS_CUDA_ARCH", "90a").replace(",", ";").split(";") if a.strip()]
    for a in arches:
        if not a.rstrip("af").isdigit() or int(a.rstrip("af")) < 90:
            raise ValueError(f"INTL_OPS_CUDA_ARCH entries must be compute capabilities >= 90 (thread-block "
                             f"clusters), like '90a', got {a!r}")
    return arches


def nvcc_flags() -> list[str]:
    # --resource-usage prints ptxas' registers / stack / spills per kernel (tools/cuda_check.py reads it).
    return ["-O3", "-std=c++17", "--resource-usage",
            *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in cuda_arches())]


def host_flags() -> list[str]:
    """g++ flags: pip's CUDA headers (cusparse.h etc., nvidia/cu*/include) searched only after the
    toolkit's own (-idirafter), for torch headers that want them when the toolkit lacks them."""
    flags = ["-O3"]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for inc in sorted(Path(root).glob("cu[0-9]*/include")):
            flags += ["-idirafter", str(inc)]
    return flags


def _is_toolkit(home: str | None) -> bool:
    return bool(home) and all((Path(home) / f).exists() for f in ("bin/nvcc", "include/cuda_runtime.h"))


def cuda_home() -> str | None:
    """The CUDA toolkit root (bin/nvcc and include/cuda_runtime.h): $CUDA_HOME / $CUDA_PATH, else
    /usr/local/cuda, else torch's guess from the nvcc on PATH; None if there is none."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if _is_toolkit(home):
            return home
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME if _is_toolkit(CUDA_HOME) else None


def toolkit_reason() -> str | None:
    """None if the extension can be compiled here, else why not (never asks for a GPU)."""
    try:
        import torch
    except ImportError:
        return "torch is not importable"
    if torch.version.cuda is None:
        return "this torch build has no CUDA (torch.version.cuda is None)"
    if cuda_home() is None:
        return "no CUDA toolkit found: set CUDA_HOME to a folder with bin/nvcc and include/cuda_runtime.h"
    missing = [p.name for p in sources() + headers() if not p.is_file()]
    if missing:
        return f"the CUDA sources are not installed: {', '.join(missing)} missing from {csrc_dir()}"
    return None


def build_dir() -> Path:
    """The JIT cache: $INTL_OPS_CUDA_BUILD_DIR, else build/ of a writable source checkout, else the
    user cache ($XDG_CACHE_HOME/intl_ops, default ~/.cache/intl_ops); one subfolder per torch and arch."""
    import torch

    base = os.environ.get("INTL_OPS_CUDA_BUILD_DIR")
    if not base:
        if in_checkout() and os.access(CHECKOUT, os.W_OK):
            base = CHECKOUT / "build"
        else:
            base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "intl_ops"
    tag = f"cuda_torch{torch.__version__}_sm{'-'.join(cuda_arches())}".replace("+", "_")
    return Path(base) / tag


def _use_toolkit():
    """torch.utils.cpp_extension, pointed at cuda_home() (torch guesses the wrong root from a bare nvcc)."""
    reason = toolkit_reason()
    if reason is not None:
        raise RuntimeError(f"cannot build the intl CUDA extension: {reason}")
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = cuda_home()
    return cpp_extension


def extension(name: str = "intl_ops._C"):
    """The setuptools extension that setup.py builds: build()'s sources and flags, paths relative to the
    checkout (setuptools wants relative sources)."""
    cpp_extension = _use_toolkit()
    return cpp_extension.CUDAExtension(
        name,
        [str(p.relative_to(CHECKOUT)) for p in sources()],
        include_dirs=[str(csrc_dir())],
        depends=[str(p.relative_to(CHECKOUT)) for p in headers()],
        extra_compile_args={"cxx": host_flags(), "nvcc": nvcc_flags()},
    )


def build(verbose: bool = False) -> str:
    """Compile csrc/ into build_dir() (or reuse the cached build) and load the library, which registers
    torch.ops.intl_cuda.*; returns the library's path. Takes ~1-3 minutes the first time."""
    cpp_extension = _use_toolkit()
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    bindir = os.path.dirname(sys.executable)  # ninja sits next to the interpreter of a non-activated venv
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    return cpp_extension.load(name=JIT_NAME, sources=[str(p) for p in sources()], extra_cflags=host_flags(),
                              extra_cuda_cflags=nvcc_flags(), extra_include_paths=[str(csrc_dir())],
                              build_directory=str(out), is_python_module=False, verbose=verbose)
