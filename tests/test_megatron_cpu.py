"""The CPU switch (tempo_ds.megatron.cpu_patches) and the process-group context
(tempo_ds.workload.distributed): both are scoped, nest, and leave nothing behind. This module
holds no process group of its own, so it sees the state a test finds when no context is open."""
import pytest
import torch

from tempo_ds import workload
from tempo_ds.megatron import cpu, cpu_patches, is_cpu_enabled

from . import megatron_utils as mu

pytest.importorskip("megatron.core")


def _patched_attributes():
    out = []
    for patch in cpu.PATCHES:
        owner, name = cpu._resolve(patch)
        out.append(owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name))
    return out


def _replacements():
    return [p.replacement for p in cpu.PATCHES]


def test_cpu_patches_are_a_no_op_when_cuda_is_present(monkeypatch):
    before = _patched_attributes()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with cpu_patches() as active:
        assert not active
        assert _patched_attributes() == before
    assert _patched_attributes() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="cpu_patches patches nothing with CUDA")
def test_cpu_patches_are_reversible_and_nest():
    from megatron.core.tensor_parallel import random as mrandom

    assert not is_cpu_enabled(), "a test left the CPU patches on"
    before = _patched_attributes()
    with cpu_patches() as active:
        assert active and is_cpu_enabled()
        assert _patched_attributes() == _replacements()
        with cpu_patches():
            pass
        # leaving the inner block does not undo the outer one
        assert is_cpu_enabled() and _patched_attributes() == _replacements()
    assert not is_cpu_enabled()
    assert _patched_attributes() == before
    assert all(a is not p.replacement for a, p in zip(_patched_attributes(), cpu.PATCHES))
    with pytest.raises(RuntimeError):
        mrandom._get_cuda_rng_state()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on GPU the tracker forks the CUDA generator")
def test_rng_tracker_forks_the_cpu_generator():
    from megatron.core.tensor_parallel import random as mrandom

    with workload.distributed():
        # The tracker's fork draws from its own stream and leaves the default stream where it was.
        mu.reseed(1)
        outside = torch.rand(3)
        mu.reseed(1)
        with mrandom.get_cuda_rng_tracker().fork():
            inside = torch.rand(3)
        after = torch.rand(3)
    assert torch.equal(after, outside) and not torch.equal(inside, outside)


def test_distributed_undoes_what_it_made():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    had_group, had_state = dist.is_initialized(), ps.model_parallel_is_initialized()
    with workload.distributed() as device:
        assert dist.is_initialized() and ps.model_parallel_is_initialized()
        assert is_cpu_enabled() == (device.type == "cpu")
        # nested: reuses the group and the state, and leaves them to the outer block
        with workload.distributed():
            pass
        assert dist.is_initialized() and ps.model_parallel_is_initialized()
        with pytest.raises(ValueError, match="tp=2"):
            with workload.distributed(tp=2):
                pass
    assert dist.is_initialized() == had_group
    assert ps.model_parallel_is_initialized() == had_state
    assert not is_cpu_enabled()
