"""Builds intl_ops; the CUDA extension intl_ops._C (csrc/) is added when a CUDA toolkit is found.

The sources, toolkit, flags and target architectures come from intl_ops/cuda_build.py, the same
definition as the JIT build (intl_ops.backend_cuda.build()), loaded by its path so that building never
imports the intl_ops package. The toolkit is detected from torch.version.cuda and CUDA_HOME (never from
a visible GPU), so the extension also builds on machines without one. Environment:
  INTL_OPS_BUILD_CUDA=0   build without the extension (the csrc/ sources are installed anyway, so the
                          cuda backend can be JIT-built later: intl_ops.backend_cuda.build() or INTL_OPS_JIT=1)
  INTL_OPS_CUDA_ARCH      target architectures, default "90a" (";"-separated, >= 90: thread-block clusters)
  CUDA_HOME               the toolkit root (default: /usr/local/cuda, else torch's guess)
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def load_cuda_build():
    spec = importlib.util.spec_from_file_location("intl_ops_cuda_build", ROOT / "intl_ops" / "cuda_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extension():
    """(ext_modules, cmdclass) of setup(): empty when the extension is not wanted or cannot be built."""
    if os.environ.get("INTL_OPS_BUILD_CUDA", "1") == "0":
        return [], {}
    cuda_build = load_cuda_build()
    reason = cuda_build.toolkit_reason()
    if reason is not None:
        print(f"intl_ops: building without the CUDA extension: {reason}")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension

    return [cuda_build.extension("intl_ops._C")], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
