# Two entry points for a fresh machine: `make demo` and `make test` (a CPU venv in .venv).
# GPU targets use the Python that already has a CUDA torch (PYTHON=...), never the venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build from this machine's disk; on a GPU machine see README ("GPU").
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# `make wheelhouse`: wheels for an offline GPU node (README, "Offline GPU nodes").
WHEEL_PYTHON ?= 3.12
NODE_PACKAGES ?=

.PHONY: demo test test-gpu gpu-check cuda-python nerfacc-build wheelhouse install slurm-packages chromium gpu-rehearsal

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,browser,gsplat]"
	$(BIN)/python -m pip install -q --no-deps clip-anytorch==2.6.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python train.py experiment=toy

# two workers, a test file each at a time (module fixtures stay whole), in tests/conftest.py's order: the SLURM
# tests (which mostly wait on the local cluster) first, then the longest files
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# Debian's SLURM + munge for the tests marked `slurm` (root and apt-get; else one line says why not)
slurm-packages:
	bash scripts/install_slurm.sh

# Debian's Chromium for the tests marked `browser` (the gallery page; root and apt-get; else one line says why not)
chromium:
	bash scripts/install_chromium.sh

# Fails (no false green) when $(PYTHON)'s torch sees no CUDA device.
cuda-python:
	@$(PYTHON) -c "import sys, torch; sys.exit(0) if torch.cuda.is_available() else sys.exit('$(PYTHON): torch ' + torch.__version__ + ' sees no CUDA device: run with PYTHON=<the python of your CUDA torch>')"

test-gpu: cuda-python
	$(PYTHON) -m pytest -q -m gpu

gpu-check: cuda-python
	$(PYTHON) scripts/gpu_check.py

nerfacc-build: cuda-python
	$(PYTHON) -m perpneg3d.renderer.nerfacc_cuda --build

wheelhouse: $(STAMP)
	$(BIN)/python scripts/make_wheelhouse.py --python-version $(WHEEL_PYTHON) --dest wheelhouse \
		$(if $(NODE_PACKAGES),--node-packages $(NODE_PACKAGES))

# The GPU node's first contact rehearsed on this CPU machine: a node-shaped venv, the wheelhouse, the one GPU
# command (CPU mode), nerfacc's kernels built for sm_90 with pip's CUDA compiler, the CPU tests (README, "GPU").
gpu-rehearsal: $(STAMP)
	$(BIN)/python scripts/gpu_rehearsal.py --python-version $(WHEEL_PYTHON) $(if $(NODE_PACKAGES),--node-packages $(NODE_PACKAGES))
