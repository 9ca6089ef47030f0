# Set-up and test entry points; the README's two commands and .ci/run use these.
PYTHON ?= python
# torch guesses /usr/local from the nvcc wrapper in /usr/local/bin; the toolkit with headers is here
export CUDA_HOME ?= /usr/local/cuda
# the CUDA ops are compiled for Hopper (H100/H200) unless told otherwise
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2

.PHONY: install install-test test test-compat test-gpu run bench report

# The compatibility job: the Megatron-facing tests against the newest megatron-core we support
# (tempo_ds.megatron.compat.TESTED; `make test` covers 0.16.1), in a venv of its own that takes
# torch, deepspeed and tempo_ds (editable) from the main environment. 0.17+ declares Python >= 3.12;
# on 3.11 it builds from its sdist (a small C++ helper; pip fetches pybind11 for the build).
MCORE_COMPAT ?= 0.19.2
COMPAT_VENV ?= .venv-mc019
COMPAT_TESTS ?= tests/test_compat.py tests/test_megatron_cpu.py tests/test_megatron_specs.py \
	tests/test_megatron_dropin.py tests/test_megatron_tp.py tests/test_deepspeed_train.py

install:
	$(PYTHON) -m pip install -e .

# The CUDA build of torch (from local disk on these machines) compiles the CUDA ops in CI too.
install-test:
	$(PYTHON) -m pip install "torch==2.14.1"
	$(PYTHON) -m pip install -e ".[test]"

test: install-test
	$(PYTHON) -m pytest -q --durations=25

$(COMPAT_VENV)/.megatron-core-$(MCORE_COMPAT):
	$(PYTHON) -m venv --system-site-packages $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --no-deps --ignore-requires-python \
		--no-binary megatron-core "megatron-core==$(MCORE_COMPAT)"
	touch $@

# After `make test` (it needs the main environment that target installs).
test-compat: $(COMPAT_VENV)/.megatron-core-$(MCORE_COMPAT)
	$(COMPAT_VENV)/bin/python -c "import megatron.core as m; assert m.__version__.split('+')[0] == '$(MCORE_COMPAT)', (m.__version__, m.__file__)"
	$(COMPAT_VENV)/bin/python -m pytest -q $(COMPAT_TESTS)

# On a GPU machine: the GPU tests (marked "gpu"; the rest is the CPU suite of `make test`).
test-gpu:
	$(PYTHON) -m pytest -q -m gpu

run: install
	bash launch/train_gpt2.sh

bench:
	$(PYTHON) -m tempo_ds.bench ops

report:
	$(PYTHON) -m tempo_ds.report --load
