"""One switch that lets megatron-core GPT and BERT models run on a machine without CUDA.

    from tempo_ds.megatron import cpu_patches
    with cpu_patches():      # patches nothing when torch.cuda.is_available()
        ...                  # build and train a GPTModel / BertModel on CPU with gloo
    # every patched attribute is back here (tempo_ds.workload.distributed() enters this for you)

megatron-core is CUDA-only in a handful of places that a small CPU model meets. Each row of
PATCHES below names one of them, the replacement, and why; nothing in megatron's files is edited.
The replacements are installed on the modules where the callers look them up at call time, so a
later `from ... import` of the caller cannot bypass them, and every one is undone when the
last open context is left.

Each row also records what its target looks like in the megatron-core releases it was checked
against (tempo_ds.megatron.compat.TESTED): the target's parameter names and a digest of its
source. Before anything is installed, check_patches() resolves every target and compares; a target
that moved, or whose signature or source changed, raises PatchTargetError naming the target and
the installed version, instead of a replacement running against code it was not written for. A
release outside compat.SUPPORTED is warned about once; its targets are checked all the same.

The RNG rows matter beyond "it runs": Megatron forks its RNG tracker around model-parallel dropout
and restores all RNG states when it recomputes a checkpointed block. On CPU the generator that
dropout draws from is torch's default CPU generator, so the tracker must save, seed and restore
*that* generator. Tempo dropout draws its Philox seed from the same generator, which is why masks
regenerated under recomputation are the masks of the first forward.

What still has to come from the config (these are not CUDA calls but CUDA-only fusions):
`gradient_accumulation_fusion=False` and `masked_softmax_fusion=False` (no apex / Megatron
extension is installed here, and on GPU machines without them the same holds).
"""
import contextlib
import functools
import hashlib
import importlib
import inspect
import logging
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import compat

__all__ = ["cpu_patches", "check_patches", "is_cpu_enabled", "PATCHES", "Patch", "PatchTargetError"]

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
    """Replace `module.attr` (module given by import path; attr may be `Class.method`).

    params: the target's parameter names, which the replacement takes too.
    sources: {megatron-core release: source_digest of the target there}, one entry for each release
        in compat.TESTED that the replacement was checked against; empty for a target outside
        megatron-core (torch's), whose signature alone is checked.
    """
    module: str
    attr: str
    replacement: Callable
    why: str
    params: tuple
    sources: dict = field(default_factory=dict)

    @property
    def target(self):
        return f"{self.module}.{self.attr}"


class PatchTargetError(RuntimeError):
    """A cpu_patches() target is missing or differs from what its replacement was written for."""


# The digests were taken from each release in compat.TESTED (the same source in both today).
PATCHES = (
    Patch("torch.cuda", "current_device", _cpu_current_device,
          "megatron allocates buffers with device=torch.cuda.current_device(): the attention "
          "GlobalMemoryBuffer, sequence-parallel all-gather/reduce-scatter outputs, rotary "
          "inv_freq, weights when use_cpu_initialization=False. Only consulted when CUDA is "
          "absent, where the stock function raises.",
          params=()),
    Patch("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", _get_rng_state,
          "the RNG tracker's fork() and checkpoint recomputation read the device generator's "
          "state; on CPU that generator is torch's default CPU generator.",
          params=("device", "clone", "graph_safe"),
          sources={"0.16.1": "aa26caaa069c5c4f", "0.19.2": "aa26caaa069c5c4f"}),
    Patch("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", _set_rng_state,
          "the matching restore of the state read above.",
          params=("new_state", "device", "graph_safe"),
          sources={"0.16.1": "b179c9d95438b61c", "0.19.2": "b179c9d95438b61c"}),
    Patch("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.add", _tracker_add,
          "add() (called by model_parallel_cuda_manual_seed) seeds a named state through "
          "torch.cuda.manual_seed / torch.cuda.get_rng_state directly.",
          params=("self", "name", "seed"),
          sources={"0.16.1": "d35a96add31a27a0", "0.19.2": "d35a96add31a27a0"}),
    Patch("megatron.core.fusions.fused_softmax", "get_default_causal_mask", _cpu_default_causal_mask,
          "with attention_mask=None the local attention builds its causal mask on 'cuda'.",
          params=("sq",),
          sources={"0.16.1": "4638b2c6665fc284", "0.19.2": "4638b2c6665fc284"}),
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
    owner = importlib.import_module(patch.module)
    *path, name = patch.attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def source_digest(func):
    """First 16 hex digits of the sha256 of `func`'s source (decorators unwrapped, dedented)."""
    source = textwrap.dedent(inspect.getsource(inspect.unwrap(func)))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _installed(patch):
    if patch.module.split(".")[0] == "megatron":
        return f"megatron-core {compat.version()}"
    return f"torch {torch.__version__}"


def _fail(patch, problem):
    raise PatchTargetError(
        f"cpu_patches: {patch.target} {problem} in {_installed(patch)}; the patch was written for "
        f"megatron-core {' and '.join(compat.TESTED)} (supported {compat.SUPPORTED}, "
        "tempo_ds.megatron.compat). Update the row of tempo_ds.megatron.cpu.PATCHES for this release.")


def _check(patch):
    """The target of `patch`, resolved and compared with the row; raises PatchTargetError."""
    try:
        owner, name = _resolve(patch)
    except (ImportError, AttributeError) as err:
        _fail(patch, f"cannot be found ({type(err).__name__}: {err})")
    # a method must be the class's own (it is restored into the class's __dict__)
    if name not in (owner.__dict__ if isinstance(owner, type) else dir(owner)):
        _fail(patch, "cannot be found")
    target = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    params = tuple(inspect.signature(target).parameters)
    if params != patch.params:
        _fail(patch, f"takes ({', '.join(params)}), not ({', '.join(patch.params)})")
    if patch.sources:
        # a tested release must have exactly its recorded source; any other release one of them
        digest, release = source_digest(target), str(compat.version())
        known = [patch.sources[release]] if release in patch.sources else list(patch.sources.values())
        if digest not in known:
            checked = ", ".join(f"{v}: {d}" for v, d in patch.sources.items())
            _fail(patch, f"has changed (source digest {digest}; checked {checked})")
    return owner, name


_WARNED_RANGE = False


def check_patches():
    """Resolve every row of PATCHES and compare its target with the row (see the module docstring).

    Returns [(owner, name)] in PATCHES order. Raises PatchTargetError, naming the target and the
    installed version, for the first target that is missing or changed. Warns once per process
    when the installed megatron-core lies outside compat.SUPPORTED.
    """
    global _WARNED_RANGE
    if not _WARNED_RANGE and not compat.is_supported():
        _WARNED_RANGE = True
        warnings.warn(f"megatron-core {compat.version()} is outside the releases tempo_ds supports "
                      f"({compat.SUPPORTED}); cpu_patches() checked its targets, but nothing else was")
    return [_check(patch) for patch in PATCHES]


_DEPTH = 0          # how many cpu_patches() contexts are open in this process
_ORIGINALS = []     # (owner, name, original attribute) while _DEPTH > 0
_LOG_FILTER = None


def _install():
    global _LOG_FILTER
    # every target is checked before the first is replaced: a failure leaves nothing installed
    for patch, (owner, name) in zip(PATCHES, check_patches()):
        # getattr on the class would bind methods; keep the raw attribute for an exact restore.
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        _ORIGINALS.append((owner, name, original))
        setattr(owner, name, patch.replacement)
    _LOG_FILTER = _DropForkWarning()
    logging.getLogger(_RNG_LOGGER).addFilter(_LOG_FILTER)


def _uninstall():
    global _LOG_FILTER
    while _ORIGINALS:
        owner, name, original = _ORIGINALS.pop()
        setattr(owner, name, original)
    logging.getLogger(_RNG_LOGGER).removeFilter(_LOG_FILTER)
    _LOG_FILTER = None


@contextlib.contextmanager
def cpu_patches():
    """Make megatron-core GPT/BERT models runnable on CPU inside the `with` block.

    Yields True when the patches are in force, False when torch.cuda.is_available() (nothing is
    patched then). Contexts nest: the first one entered installs every row of PATCHES, the last
    one left restores the original attributes, so an inner block never undoes an outer one.
    """
    global _DEPTH
    if torch.cuda.is_available():
        yield False
        return
    if _DEPTH == 0:
        _install()
    _DEPTH += 1
    try:
        yield True
    finally:
        _DEPTH -= 1
        if _DEPTH == 0:
            _uninstall()


def is_cpu_enabled():
    """True while some cpu_patches() context is open (the patches are installed)."""
    return _DEPTH > 0
