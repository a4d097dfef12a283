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

# Builds and checks the CUDA extension (cached under build/; skipped without nvcc), then every test.
test: venv
	$(PYTHON) csrc/cuda_check.py
	$(PYTHON) -m pytest -q

bench: venv
	$(PYTHON) -m bench --quick

clean:
	rm -rf build dist *.egg-info runs

# CUDA backend (csrc/): build the extension once (cached under build/), fail on ptxas spills or stack
# frames, then its CPU-side tests (they reuse the cached build). Skips cleanly without nvcc.
.PHONY: cuda-check
cuda-check: venv
	$(PYTHON) csrc/cuda_check.py
	$(PYTHON) -m pytest -q tests/test_cuda.py
