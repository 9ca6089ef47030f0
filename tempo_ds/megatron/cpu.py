"""One switch that lets megatron-core GPT and BERT models run on a machine without CUDA.

    from tempo_ds.megatron import enable_cpu
    undo = enable_cpu()      # a no-op (returns a no-op handle) when torch.cuda.is_available()
    ...                      # build and train a GPTModel / BertModel on CPU with gloo
    undo()                   # or disable_cpu()

megatron-core 0.16.1 is CUDA-only in a handful of places that a small CPU model meets. Each row of
PATCHES below names one of them, the replacement, and why; nothing in megatron's files is edited.
The replacements are installed on the modules where the callers look them up at call time, so a
later `from ... import` of the caller cannot bypass them, and every one is undone by the handle.

The RNG rows matter beyond "it runs": Megatron forks its RNG tracker around model-parallel dropout
and restores all RNG states when it recomputes a checkpointed block. On CPU the generator that
dropout draws from is torch's default CPU generator, so the tracker must save, seed and restore
*that* generator. Tempo dropout draws its Philox seed from the same generator, which is why masks
regenerated under recomputation are the masks of the first forward.

What still has to come from the config (these are not CUDA calls but CUDA-only fusions):
`gradient_accumulation_fusion=False` and `masked_softmax_fusion=False` (no apex / Megatron
extension is installed here, and on GPU machines without them the same holds).
"""
import functools
import logging
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["enable_cpu", "disable_cpu", "is_cpu_enabled", "CpuPatchHandle", "PATCHES"]

_CPU = torch.device("cpu")


def _cpu_current_device():
    return _CPU


def _get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _tracker_add(self, name, seed):
    # CudaRNGStatesTracker.add, with the CPU generator in place of torch.cuda's.
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    self._is_initialized = True
    self.seeds_.add(seed)
    orig = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig)


@functools.lru_cache(maxsize=None)
def _cpu_default_causal_mask(sq):
    return torch.triu(torch.ones(sq, sq, device=_CPU), diagonal=1).bool()


@dataclass(frozen=True)
class Patch:
    """Replace `module.attr` (module given by import path; attr may be `Class.method`)."""
    module: str
    attr: str
    replacement: Callable
    why: str


PATCHES = (
    Patch("torch.cuda", "current_device", _cpu_current_device,
          "megatron allocates buffers with device=torch.cuda.current_device(): the attention "
          "GlobalMemoryBuffer, sequence-parallel all-gather/reduce-scatter outputs, rotary "
          "inv_freq, weights when use_cpu_initialization=False. Only consulted when CUDA is "
          "absent, where the stock function raises."),
    Patch("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", _get_rng_state,
          "the RNG tracker's fork() and checkpoint recomputation read the device generator's "
          "state; on CPU that generator is torch's default CPU generator."),
    Patch("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", _set_rng_state,
          "the matching restore of the state read above."),
    Patch("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.add", _tracker_add,
          "add() (called by model_parallel_cuda_manual_seed) seeds a named state through "
          "torch.cuda.manual_seed / torch.cuda.get_rng_state directly."),
    Patch("megatron.core.fusions.fused_softmax", "get_default_causal_mask", _cpu_default_causal_mask,
          "with attention_mask=None the local attention builds its causal mask on 'cuda'."),
)

# Inside tracker.fork() Megatron warns when the CPU generator moved, because on GPU that means a
# CPU random op ran in a GPU-RNG region. On CPU the tracker *is* the CPU generator, so every
# dropout inside fork() would log this message; the filter drops exactly that message.
_RNG_LOGGER = "megatron.core.tensor_parallel.random"
_RNG_MESSAGE = "CPU RNG state changed within GPU RNG context"


class _DropForkWarning(logging.Filter):
    def filter(self, record):
        return record.getMessage() != _RNG_MESSAGE


def _resolve(patch):
    import importlib
    owner = importlib.import_module(patch.module)
    *path, name = patch.attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


class CpuPatchHandle:
    """Undoes what enable_cpu() installed; calling it twice is harmless."""

    def __init__(self, originals=(), log_filter=None):
        self._originals = list(originals)
        self._log_filter = log_filter

    @property
    def active(self):
        return bool(self._originals)

    def __call__(self):
        global _ACTIVE
        for owner, name, original in reversed(self._originals):
            setattr(owner, name, original)
        self._originals.clear()
        if self._log_filter is not None:
            logging.getLogger(_RNG_LOGGER).removeFilter(self._log_filter)
            self._log_filter = None
        if _ACTIVE is self:
            _ACTIVE = None

    undo = __call__

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self()
        return False


_ACTIVE = None


def enable_cpu():
    """Make megatron-core GPT/BERT models runnable on CPU (smoke runs, CI).

    Does nothing when torch.cuda.is_available(): the returned handle is then inactive. Calling it
    again while enabled returns the active handle. Returns a CpuPatchHandle; call it (or
    disable_cpu()) to restore every patched attribute.
    """
    global _ACTIVE
    if torch.cuda.is_available():
        return CpuPatchHandle()
    if _ACTIVE is not None:
        return _ACTIVE
    originals = []
    for patch in PATCHES:
        owner, name = _resolve(patch)
        # getattr on the class would bind methods; keep the raw attribute for an exact restore.
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        originals.append((owner, name, original))
        setattr(owner, name, patch.replacement)
    log_filter = _DropForkWarning()
    logging.getLogger(_RNG_LOGGER).addFilter(log_filter)
    _ACTIVE = CpuPatchHandle(originals, log_filter)
    return _ACTIVE


def disable_cpu():
    """Undo enable_cpu() (a no-op if it is not enabled)."""
    if _ACTIVE is not None:
        _ACTIVE()


def is_cpu_enabled():
    """True while enable_cpu()'s patches are installed."""
    return _ACTIVE is not None
