"""Finds the compiled kernels of an op family for a device, building them on first use.

`TEMPO_DS_OPS` chooses:
  auto  (default) build/load the op; if that fails, or the device type has no kernels (meta,
        mps, xpu, ...), warn once per family and device type and use the PyTorch implementation
        of the same saving contract (tempo_ds.ops.reference);
  built require the compiled op: a build failure or a device type without kernels raises;
  torch always use the PyTorch implementation (tests use it to compare the two).
"""
import os
import threading
import warnings
from types import SimpleNamespace

from ..op_builder import FAMILIES
from . import reference as ref
from . import reference_dropout as ref_dropout
from . import reference_loss as ref_loss

_MODES = ("auto", "built", "torch")
_lock = threading.Lock()
_cache = {}


class Fallback(SimpleNamespace):
    """A kernel module made of the PyTorch references (tempo_ds.ops.reference*)."""


# The PyTorch implementation of each op family, attribute for attribute the compiled module's.
FALLBACKS = {
    "core": Fallback(gelu_fwd=ref.gelu_fwd, gelu_bwd=ref.gelu_bwd, gelu_bwd_table=ref.gelu_bwd_table,
                     bias_gelu_fwd=ref.bias_gelu_fwd,
                     layer_norm_fwd=ref.layer_norm_fwd, layer_norm_bwd=ref.layer_norm_bwd,
                     rms_norm_fwd=ref.rms_norm_fwd, rms_norm_bwd=ref.rms_norm_bwd),
    "dropout": Fallback(dropout_fwd=ref_dropout.dropout_fwd, dropout_mask=ref_dropout.dropout_mask,
                        dropout_mask_block=ref_dropout.dropout_mask_block,
                        bias_dropout_add_fwd=ref_dropout.bias_dropout_add_fwd,
                        softmax_dropout_fwd=ref_dropout.softmax_dropout_fwd,
                        softmax_dropout_regen=ref_dropout.softmax_dropout_regen,
                        softmax_dropout_bwd=ref_dropout.softmax_dropout_bwd),
    "loss": Fallback(cross_entropy_fwd=ref_loss.cross_entropy_fwd, cross_entropy_bwd=ref_loss.cross_entropy_bwd),
}


def mode():
    value = os.environ.get("TEMPO_DS_OPS", "auto")
    if value not in _MODES:
        raise ValueError(f"TEMPO_DS_OPS={value!r}: expected one of {', '.join(_MODES)}")
    return value


def builder_for(family, device_type):
    """The op builder class of `family` for a device type ('cpu' or 'cuda')."""
    try:
        cpu_cls, cuda_cls = FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown op family {family!r}; known: {sorted(FAMILIES)}") from None
    if device_type == "cpu":
        return cpu_cls
    if device_type == "cuda":
        return cuda_cls
    raise NotImplementedError(f"tempo_ds has no {family!r} kernels for device type {device_type!r}")


def ops(family, device):
    """The module with `family`'s kernels for `device` (compiled, or the PyTorch fallback)."""
    device_type = device.type if hasattr(device, "type") else str(device)
    chosen = mode()
    key = (family, device_type, chosen)
    module = _cache.get(key)
    if module is not None:
        return module
    with _lock:
        if key in _cache:
            return _cache[key]
        if family not in FAMILIES:  # a caller's mistake, not a build failure: raise in every mode
            raise ValueError(f"unknown op family {family!r}; known: {sorted(FAMILIES)}")
        if chosen == "torch":
            module = FALLBACKS[family]
        else:
            name = f"{family!r} for device type {device_type!r}"
            try:
                # inside the try: a device type with no kernels (meta, mps, xpu) is a build failure
                # like a missing compiler, so auto mode falls back as the module docstring promises
                builder = builder_for(family, device_type)()
                name = builder.NAME
                module = builder.load(verbose=False)
            except Exception as err:  # a compiler error, missing toolkit, unsupported device type, ...
                if chosen == "built":
                    raise
                warnings.warn(
                    f"tempo_ds: could not build op {name} ({type(err).__name__}: "
                    f"{str(err).strip().splitlines()[-1] if str(err).strip() else err}); using the "
                    "PyTorch implementation with the same saving contract, which is slower",
                    RuntimeWarning, stacklevel=3)
                module = FALLBACKS[family]
        _cache[key] = module
        return module


def is_compiled(module):
    """True when `module` is a compiled extension rather than the PyTorch fallback."""
    return not isinstance(module, Fallback)


def loaded_modules():
    """Every kernel module loaded so far (compiled or fallback)."""
    return list(_cache.values())
