# The README's two commands: `make test` and `make bench` (plus build, bench-publish, cuda-check, emu-check,
# ptx-check, test-torch).
# Python: the current python3 when it already imports torch (the GPU machine, itself a venv, no network);
# otherwise a local .venv with torch==2.13.0 (the CPU wheel on this machine's disk) and the test tools.
SYSTEM_PY := python3
HAVE_TORCH := $(shell $(SYSTEM_PY) -c "import torch" >/dev/null 2>&1 && echo yes)
ifeq ($(HAVE_TORCH),yes)
PY := $(SYSTEM_PY)
ENV_STAMP :=
else
PY := .venv/bin/python
ENV_STAMP := .venv/.installed
endif
export MAX_JOBS ?= 2
PYTEST_ARGS ?=

.PHONY: test test-fast bench bench-publish build clean cuda-check emu-check ptx-check test-torch

test: build
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# The developer's lane: the suite without the tests marked slow (torch.compile, subprocesses, the model zoo).
test-fast: build
	$(PY) -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

# Results go to benchmarks/results/local/ (not tracked); bench-publish replaces the committed benchmarks/results/.
bench: build
	PYTHONUNBUFFERED=1 $(PY) -m benchmarks $(BENCH_ARGS)

bench-publish: build
	PYTHONUNBUFFERED=1 $(PY) -m benchmarks --publish $(BENCH_ARGS)

build: $(ENV_STAMP)
	$(PY) setup.py -q build_ext --inplace

.venv/.installed:
	$(SYSTEM_PY) -m venv --system-site-packages .venv
	.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q numpy pytest pybind11 ninja setuptools wheel expecttest scikit-learn matplotlib onnx onnxscript onnxruntime
	# real model code for the convert() tests (tests/real_models.py); --no-deps: never another torch
	.venv/bin/pip install -q --no-deps torchvision==0.28.0 timm==1.0.31
	touch $@

# The suite against another torch release (the oldest one pyproject.toml admits before a release): a venv with
# that torch (downloaded once into TORCH_CACHE, ~3 GB), a build of a copy of the checkout in build/torch-<version>/.
test-torch:
	@test -n "$(TORCH)" || { echo "usage: make test-torch TORCH=2.7.1"; exit 2; }
	.ci/test_torch.sh $(TORCH) $(PYTEST_ARGS)

cuda-check:
	.ci/cuda_compile_check.sh

# The CUDA kernels run on a CPU emulation of CUDA, plain and under TSan / ASan+UBSan (g++ only, no GPU, no torch).
emu-check:
	tests/cuda_emulation/emu_check.sh

# The CUDA kernels as nvcc compiles them, run as PTX on a GPU simulator (BNFUSED_SIM_DIR, default
# ../shared/gpgpu-sim; no GPU, no torch library). PTX_CHECK_ARGS=--if-present: skip with one line without it.
ptx-check:
	tests/ptx_sim/ptx_check.sh $(PTX_CHECK_ARGS)

clean:
	rm -rf build bnfused/_C*.so .cuda_check .emu_check .ptx_check
