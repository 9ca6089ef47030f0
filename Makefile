# Set-up and test entry points; the README's two commands and .ci/run use these.
PYTHON ?= python
# torch guesses /usr/local from the nvcc wrapper in /usr/local/bin; the toolkit with headers is here
export CUDA_HOME ?= /usr/local/cuda
# the CUDA ops are compiled for Hopper (H100/H200) unless told otherwise
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2

.PHONY: install install-test test test-gpu run bench report

install:
	$(PYTHON) -m pip install -e .

# The CUDA build of torch (from local disk on these machines) compiles the CUDA ops in CI too.
install-test:
	$(PYTHON) -m pip install "torch==2.14.1"
	$(PYTHON) -m pip install -e ".[test]"

test: install-test
	$(PYTHON) -m pytest -q

# On a GPU machine: the GPU tests (marked "gpu"; the rest is the CPU suite of `make test`).
test-gpu:
	$(PYTHON) -m pytest -q -m gpu

run: install
	bash launch/train_gpt2.sh

bench:
	$(PYTHON) -m tempo_ds.bench ops

report:
	$(PYTHON) -m tempo_ds.report --load
