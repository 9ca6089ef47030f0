"""Argument checks shared by the functional API: errors name the argument at fault.

Convention (PyTorch's): TypeError for a wrong type or dtype, ValueError for a wrong value, shape
or device.
"""
import contextlib
import functools

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# the dtypes autocast converts (it leaves float64 alone, as it leaves integer tensors)
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def check_float_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_probability(name, p):
    if not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {p!r}")


def check_non_negative(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) >= 0.0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def check_feature_tensor(name, x):
    """x: a float tensor with at least one dimension and a non-empty last dimension."""
    check_float_tensor(name, x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape {tuple(x.shape)}")


def check_norm_param(name, p, x, like=None):
    """A norm's gamma or beta: None, or [x.shape[-1]] on x's device with x's dtype or float32 next
    to 16-bit x (mixed precision); `like`, when given, is the other parameter, whose dtype p shares."""
    if p is None:
        return
    check_float_tensor(name, p)
    features = x.shape[-1]
    if p.shape != (features,):
        raise ValueError(f"{name} must have shape ({features},) (the last dimension of x), "
                         f"got {tuple(p.shape)}")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
    mixed = p.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)
    if p.dtype != x.dtype and not mixed:
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}), or float32 next to 16-bit x, "
                        f"got {p.dtype}")
    if like is not None and p.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of weight ({like.dtype}), got {p.dtype}")


def check_like(name, t, ref_name, ref):
    """t on ref's device (ValueError) with ref's dtype (TypeError)."""
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def _autocast_on(device_type):
    # is_autocast_enabled raises for device types autocast does not know (meta)
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_inputs(device_type, *tensors):
    """The tensors as an autocast "lower precision" op (matmul, SDPA) sees them: when autocast is
    on for device_type, float16/bfloat16/float32 tensors are converted to its dtype (float64 and
    None pass through); otherwise all are returned as they are. The conversion is an ordinary
    autograd op, so gradients come back in each input's own dtype, as with stock ops."""
    if not _autocast_on(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.dtype in _AUTOCAST_ELIGIBLE else t for t in tensors)


def autocast_off(device_type):
    """A context that disables autocast on device_type. An autograd.Function whose forward and
    backward both run in it computes in its inputs' dtypes in both directions: under autocast
    the forward's matmuls would otherwise run in the autocast dtype while the backward, run in
    whatever autocast state the caller of .backward() has (usually none), recomputes them in the
    input dtype, and the two disagree."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def without_autocast(fn):
    """Decorator of an autograd.Function's forward or backward (ctx, first tensor, ...): runs it
    inside autocast_off for the first tensor's device type."""
    @functools.wraps(fn)
    def run(ctx, first, *args):
        with autocast_off(first.device.type):
            return fn(ctx, first, *args)
    return run
