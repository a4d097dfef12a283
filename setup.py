"""Builds intl_ops; the CUDA extension intl_ops._C (csrc/) is added when a CUDA toolkit is found.

The toolkit is detected from torch.version.cuda and CUDA_HOME (never from a visible GPU), so the
extension also builds on machines without one. Environment:
  INTL_OPS_BUILD_CUDA=0   build without the extension (the cuda backend can then be JIT-built:
                          intl_ops.backend_cuda.build() or INTL_OPS_JIT=1)
  INTL_OPS_CUDA_ARCH      target architectures, default "90a" (";"-separated, >= 90: thread-block clusters)
  CUDA_HOME               the toolkit root (default: /usr/local/cuda, else torch's guess)
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _toolkit(cpp_extension):
    """The CUDA toolkit root with nvcc and the runtime headers, or None."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda", cpp_extension.CUDA_HOME):
        if home and (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
            return home
    return None


def cuda_extension():
    if os.environ.get("INTL_OPS_BUILD_CUDA", "1") == "0":
        return None, {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("intl_ops: torch is not importable at build time: building without the CUDA extension")
        return None, {}
    home = _toolkit(cpp_extension)
    if torch.version.cuda is None or home is None:
        print("intl_ops: no CUDA toolkit or a CPU-only torch: building without the CUDA extension")
        return None, {}
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = home  # torch guesses the wrong root from a bare nvcc
    arches = [a.strip() for a in os.environ.get("INTL_OPS_CUDA_ARCH", "90a").replace(",", ";").split(";") if a.strip()]
    host = ["-O3"]
    spec = importlib.util.find_spec("nvidia")  # pip's CUDA headers (cusparse.h ...), after the toolkit's own
    for root in (spec.submodule_search_locations or []) if spec else []:
        for inc in sorted(Path(root).glob("cu[0-9]*/include")):
            host += ["-idirafter", str(inc)]
    ext = cpp_extension.CUDAExtension(
        "intl_ops._C",
        ["csrc/intl_ops.cpp", "csrc/intl_kernels.cu"],
        include_dirs=[str(ROOT / "csrc")],
        depends=["csrc/intl_cuda.h"],  # rebuilt when it changes; shipped in the sdist
        extra_compile_args={
            "cxx": host,
            "nvcc": ["-O3", "-std=c++17", *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in arches)],
        },
    )
    return ext, {"build_ext": cpp_extension.BuildExtension}


ext, cmdclass = cuda_extension()
setup(ext_modules=[ext] if ext is not None else [], cmdclass=cmdclass)
