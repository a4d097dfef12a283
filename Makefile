# The two commands of a fresh machine: `make train` and `make test` (each sets up .venv first).
PY      ?= python3.11
VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: venv train test bench clean

venv: $(STAMP)
$(STAMP): requirements.txt pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements.txt
	INTL_OPS_BUILD_CUDA=0 $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

# INTL pretraining on the bundled digits images (CPU is enough), then kNN / linear-probe accuracy.
train: venv
	$(PYTHON) train/pretrain.py --dataset digits

# Builds and checks the CUDA extension (cached under build/; skipped without nvcc), then every test (the
# gpu_check.sh dry run among them: tests/test_gpu_check.py), then the device-versions tier (test-device).
test: venv
	$(PYTHON) tools/cuda_check.py
	$(PYTHON) -m pytest -q
	$(MAKE) --no-print-directory test-device

bench: venv
	$(PYTHON) -m bench --quick

clean:
	rm -rf build dist *.egg-info runs

# CUDA backend (csrc/): build the extension once (cached under build/), fail on ptxas spills or stack
# frames, then its CPU-side tests (they reuse the cached build) and the install test (an installed copy
# carries csrc/ and JIT-builds into the user cache). Skips cleanly without nvcc.
.PHONY: cuda-check
cuda-check: venv
	$(PYTHON) tools/cuda_check.py
	$(PYTHON) -m pytest -q tests/test_cuda.py tests/test_install.py

# Device-versions tier: the GPU machine's torch 2.11 / triton 3.6 (requirements-device.txt) in .venv-device,
# no GPU needed: the interpreter and custom-op tests, the CUDA extension built against torch 2.11's headers
# (its own cache, build/device/), and bench/aot_compile.py: every Triton launch configuration of the triton
# backend compiled for sm_90, failing on compile errors and register spills.
DEV_VENV   := .venv-device
DEV_PYTHON := $(DEV_VENV)/bin/python
DEV_STAMP  := $(DEV_VENV)/.installed

.PHONY: venv-device test-device
venv-device: $(DEV_STAMP)
$(DEV_STAMP): requirements-device.txt pyproject.toml
	test -x $(DEV_PYTHON) || $(PY) -m venv $(DEV_VENV)
	$(DEV_PYTHON) -m pip install -q -r requirements-device.txt
	INTL_OPS_BUILD_CUDA=0 $(DEV_PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(DEV_STAMP)

test-device: venv-device
	$(DEV_PYTHON) -m pytest -q -W 'ignore:Conversion of an array:DeprecationWarning' tests/test_triton.py tests/test_ops.py
	INTL_OPS_CUDA_BUILD_DIR=$(CURDIR)/build/device $(DEV_PYTHON) tools/cuda_check.py
	$(DEV_PYTHON) bench/aot_compile.py --unaligned

# The lent-GPU script (bench/gpu_check.sh) on this CPU machine: every GPU step's CPU / interpreter twin,
# results in bench/out/<date>/{gpu_check.tar.gz,summary.md} (or $OUT), < 3 minutes.
.PHONY: gpu-dry-run
gpu-dry-run: venv
	PYTHON=$(PYTHON) bash bench/gpu_check.sh --dry-run

# torchvision (and pillow) for the lent GPU machine (python 3.12, torch 2.11 -> torchvision 0.26), which has none and
# cannot install: the device call carries bench/device_wheels and gpu_check.sh unpacks the wheel there.
.PHONY: device-wheels
device-wheels:
	mkdir -p bench/device_wheels
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	    --platform manylinux_2_28_x86_64 -d bench/device_wheels torchvision==0.26.0 pillow
