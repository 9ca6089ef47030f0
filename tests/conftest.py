import os

import pytest
import torch

# The test suite compiles the ops through our DeepSpeed op builders: fail loudly instead of
# silently testing the PyTorch fallback (tests that want the fallback set TEMPO_DS_OPS=torch).
os.environ.setdefault("TEMPO_DS_OPS", "built")

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def megatron_world():
    """tempo_ds.workload.distributed() for one test module: a one-process gloo group, megatron's
    parallel state and RNG tracker, and (without CUDA) the CPU patches, all undone when the
    module's tests are done. Yields the device."""
    pytest.importorskip("megatron.core")
    from tempo_ds import workload
    with workload.distributed() as device:
        yield device


@pytest.fixture
def poison():
    """Compiled kernels fill their fresh outputs with NaN while the test runs, so a kernel that
    forgets to write an element fails (the PyTorch fallback has no uninitialised outputs)."""
    from tempo_ds.op_builder import FAMILIES
    from tempo_ds.ops import _backend
    # Load every family on every device here: a module loaded later, inside the test, would run
    # unpoisoned (each compiled module keeps its own flag).
    loaded = [_backend.ops(family, device) for family in FAMILIES for device in DEVICES]
    modules = [m for m in loaded if hasattr(m, "set_poison")]
    assert modules or _backend.mode() == "torch", "no compiled kernel module to poison"
    for m in modules:
        m.set_poison(True)
    yield
    for m in modules:
        m.set_poison(False)
