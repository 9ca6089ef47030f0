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


# -- each patch is checked against its target before anything is installed ------------------------
def test_every_patch_matches_its_target_here():
    import inspect

    resolved = cpu.check_patches()
    assert len(resolved) == len(cpu.PATCHES)
    for patch in cpu.PATCHES:
        # the replacement can be called the way the target is
        params = tuple(inspect.signature(patch.replacement).parameters)
        assert params == patch.params, patch.target


def _assert_refused(monkeypatch, extra, match):
    """cpu.PATCHES plus the row `extra` is refused, naming the target and the installed version,
    and a cpu_patches() entered with it installs none of the other rows."""
    from tempo_ds.megatron import compat

    rows, before = cpu.PATCHES, _patched_attributes()
    monkeypatch.setattr(cpu, "PATCHES", rows + (extra,))
    with pytest.raises(cpu.PatchTargetError, match=match) as info:
        cpu.check_patches()
    assert f"megatron-core {compat.version()}" in str(info.value)
    if not torch.cuda.is_available():
        with pytest.raises(cpu.PatchTargetError, match=match):
            with cpu_patches():
                pass
        assert not is_cpu_enabled()
        monkeypatch.setattr(cpu, "PATCHES", rows)
        assert _patched_attributes() == before


def test_patch_whose_target_is_missing_fails_loudly(monkeypatch):
    missing = cpu.Patch("megatron.core.tensor_parallel.random", "_get_cuda_rng_state_v2", lambda: None,
                        "a target that moved", params=())
    _assert_refused(monkeypatch, missing,
                    r"megatron\.core\.tensor_parallel\.random\._get_cuda_rng_state_v2 cannot be found")


def test_patch_whose_module_is_missing_fails_loudly(monkeypatch):
    moved = cpu.Patch("megatron.core.no_such_module", "fn", lambda: None, "a module that moved", params=())
    _assert_refused(monkeypatch, moved, r"megatron\.core\.no_such_module\.fn cannot be found")


def test_patch_whose_target_signature_changed_fails_loudly(monkeypatch):
    from megatron.core.tensor_parallel import random as mrandom

    monkeypatch.setattr(mrandom, "_get_cuda_rng_state", lambda device="cuda", clone=False: None)
    with pytest.raises(cpu.PatchTargetError, match=r"_get_cuda_rng_state takes \(device, clone\), "
                                                   r"not \(device, clone, graph_safe\)"):
        cpu.check_patches()


def test_patch_whose_target_source_changed_fails_loudly(monkeypatch):
    from megatron.core.tensor_parallel import random as mrandom

    def add(self, name, seed):
        raise AssertionError("a body the replacement was not written for")

    monkeypatch.setattr(mrandom.CudaRNGStatesTracker, "add", add)
    with pytest.raises(cpu.PatchTargetError, match=r"CudaRNGStatesTracker\.add has changed"):
        cpu.check_patches()


def test_every_megatron_patch_was_checked_against_every_tested_release():
    from tempo_ds.megatron import compat

    for patch in cpu.PATCHES:
        if patch.module.startswith("megatron."):
            assert set(patch.sources) == set(compat.TESTED), patch.target
