"""Installing intl_ops as a user does (`pip install --no-build-isolation .`), and the one build definition.

The installed copy must stand alone: imported from another folder with only the install on PYTHONPATH,
it has intl_ops.kernels (and no top-level `kernels`), the csrc/ sources as package data where
intl_ops.cuda_build finds them, a JIT cache in the user's cache folder (never the install folder), and
runs on CPU. The install is built without the CUDA extension (INTL_OPS_BUILD_CUDA=0): fast, no nvcc.
setup.py and the JIT build take their sources and flags from the same functions (intl_ops/cuda_build.py).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What pyproject.toml installs from. The tree is copied first: setuptools writes build/ and *.egg-info next
# to setup.py, and files left in build/lib by an earlier install would end up in the wheel.
INSTALL_TREE = ("pyproject.toml", "setup.py", "README.md", "intl_ops", "kernels", "csrc")

# Run by the installed copy: what it finds, as JSON (HOME and XDG_CACHE_HOME are the test's folders).
PROBE = r"""
import json, os, sys
import torch
import intl_ops
import intl_ops.kernels._common
from intl_ops import backend_cuda, cuda_build

y = intl_ops.iternorm(torch.randn(8, 5))
facts = {
    "intl_ops": intl_ops.__file__,
    "kernels": intl_ops.kernels._common.__file__,
    "in_checkout": cuda_build.in_checkout(),
    "csrc": str(cuda_build.csrc_dir()),
    "files": [str(p) for p in cuda_build.sources() + cuda_build.headers()],
    "toolkit_reason": cuda_build.toolkit_reason(),
    "build_dir_xdg": str(backend_cuda.build_dir()),
    "y": [list(y.shape), bool(torch.isfinite(y).all())],
    "cuda_loaded": backend_cuda._loaded,
}
os.environ.pop("XDG_CACHE_HOME")
facts["build_dir_home"] = str(cuda_build.build_dir())
os.environ["INTL_OPS_CUDA_BUILD_DIR"] = sys.argv[1]
facts["build_dir_env"] = str(cuda_build.build_dir())
print(json.dumps(facts))
"""


def _under(path, folder) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install --no-build-isolation --no-deps --target <target> .` of a copy of this tree."""
    src = tmp_path_factory.mktemp("src")
    for name in INSTALL_TREE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(ROOT / name, src / name)
    target = tmp_path_factory.mktemp("target")
    env = {**os.environ, "INTL_OPS_BUILD_CUDA": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--target", str(target), "."]
    proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


def test_installed_copy_stands_alone(installed, tmp_path):
    target = installed
    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTL_OPS_")}
    env.update(PYTHONPATH=str(target), HOME=str(home), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "chosen")], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout.strip().splitlines()[-1])

    assert _under(facts["intl_ops"], target), facts["intl_ops"]
    assert _under(facts["kernels"], target / "intl_ops" / "kernels"), facts["kernels"]
    assert not (target / "kernels").exists(), "a top-level `kernels` package was installed"
    assert not list((target / "intl_ops").glob("_C*")), "built the CUDA extension despite INTL_OPS_BUILD_CUDA=0"
    assert facts["y"] == [[8, 5], True]
    assert facts["cuda_loaded"] is None

    # the CUDA sources, as package data, found by the build module
    assert facts["in_checkout"] is False
    assert Path(facts["csrc"]) == target / "intl_ops" / "csrc"
    names = sorted(Path(f).name for f in facts["files"])
    assert names == ["intl_cuda.cpp", "intl_cuda.h", "intl_kernels.cu"]
    for f in facts["files"]:
        assert Path(f).is_file() and Path(f).read_bytes() == (ROOT / "csrc" / Path(f).name).read_bytes(), f
    assert "not installed" not in (facts["toolkit_reason"] or ""), facts["toolkit_reason"]

    # the JIT cache: the user's cache folder, never the install
    assert _under(facts["build_dir_xdg"], tmp_path / "xdg" / "intl_ops"), facts["build_dir_xdg"]
    assert _under(facts["build_dir_home"], home / ".cache" / "intl_ops"), facts["build_dir_home"]
    assert _under(facts["build_dir_env"], tmp_path / "chosen"), facts["build_dir_env"]
    for key in ("build_dir_xdg", "build_dir_home", "build_dir_env"):
        assert not _under(facts[key], target) and "site-packages" not in Path(facts[key]).parts, facts[key]


def test_build_module_loads_without_the_package():
    """setup.py loads intl_ops/cuda_build.py by its path: that imports neither intl_ops nor torch."""
    code = ("import importlib.util, sys; "
            "spec = importlib.util.spec_from_file_location('cuda_build', sys.argv[1]); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('intl_ops', 'torch')))")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "intl_ops" / "cuda_build.py")], cwd=ROOT / "tests",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_setup_and_jit_share_sources_and_flags(monkeypatch):
    """The extension setup.py builds has the JIT build's sources and flags (arch check, --resource-usage)."""
    from intl_ops import cuda_build

    reason = cuda_build.toolkit_reason()
    if reason is not None:
        pytest.skip(f"no CUDA toolkit: {reason}")
    ext = cuda_build.extension()
    assert ext.name == "intl_ops._C"
    assert [ROOT / s for s in ext.sources] == cuda_build.sources()  # relative to the checkout, as setuptools wants
    assert ext.extra_compile_args == {"cxx": cuda_build.host_flags(), "nvcc": cuda_build.nvcc_flags()}
    assert "--resource-usage" in ext.extra_compile_args["nvcc"]
    assert "-gencode=arch=compute_90a,code=sm_90a" in ext.extra_compile_args["nvcc"] or "INTL_OPS_CUDA_ARCH" in os.environ
    monkeypatch.setenv("INTL_OPS_CUDA_ARCH", "80")
    with pytest.raises(ValueError, match="INTL_OPS_CUDA_ARCH entries must be compute capabilities >= 90"):
        cuda_build.extension()


def test_checkout_layout():
    """In this checkout: the sources are csrc/ here and the JIT cache is build/ here (unless overridden)."""
    from intl_ops import cuda_build

    assert cuda_build.in_checkout()
    assert cuda_build.csrc_dir() == ROOT / "csrc"
    assert all(p.is_file() for p in cuda_build.sources() + cuda_build.headers())
    if "INTL_OPS_CUDA_BUILD_DIR" not in os.environ and os.access(ROOT, os.W_OK):
        assert cuda_build.build_dir().parent == ROOT / "build"
