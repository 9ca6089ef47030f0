"""Output-saving LayerNorm and RMSNorm: backward recovers the normalised input from the output.

Saved for backward: the output y (the next linear layer keeps the same tensor, so it costs no
extra bytes) and one rstd per row (fp32; fp64 for fp64 input). Stock LayerNorm saves its input x
and a mean and an rstd per row; stock RMSNorm on CPU saves fp32 copies of x and of x * rstd.

The backward computes x_hat = (y - beta) / gamma element by element inside the kernel. That is
only possible where gamma_j carries x_hat_j through the rounding of y_j: feature j is
*unrecoverable* when |gamma_j| * R <= max(|beta_j|, tiny), R = 1 / (16 * eps(y.dtype)) and tiny
the smallest normal number of y.dtype (RMSNorm has beta_j = 0). `recover_check` chooses what
happens then (docs/norm.md, "When gamma does not allow recovery"):

  "clamp" (default) decides per call on the device and never synchronises with it. Where
      |gamma_j| <= eps * max(|beta_j|, tiny), which holds almost nothing of x_hat_j, the backward
      kernel divides by gamma_j clamped by magnitude to that bound (as apex's memory-efficient
      LayerNorm clamps): the gradients stay finite, and with gamma_j == 0 they are exact for
      every other feature. Each backward adds the number of unrecoverable features to a counter
      on the device; after each optimizer step (torch's global step hook) the counter is copied
      to the host without blocking, and the first non-zero count raises a RuntimeWarning.
      report_unrecoverable_features() reads it at once.
  "exact" checks on the host before every training forward (one device-to-host
      synchronisation per call, no cache) and, if any feature is unrecoverable, runs PyTorch's
      own op for that call, which keeps the input (exact, stock memory), with a one-time warning.
  "off" (or False) neither checks nor clamps: gamma_j == 0 makes the gradients non-finite.
"""
import numbers
import threading
import warnings

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _backend
from ._checks import check_feature_tensor, check_non_negative, check_norm_param

# the rule itself is stated once, beside the fallback kernels that apply it
from .reference import unrecoverable_features

RECOVER_CHECKS = ("clamp", "exact", "off")

_warned_ops = set()


# -- the count of unrecoverable features: device tallies, read after optimizer steps without blocking
_lock = threading.Lock()
_tallies = {}  # torch.device -> int64 scalar on it: features counted, not yet copied to the host
_in_flight = []  # (host int64 scalar, torch.Event or None for CPU): copies not yet read
_step_hook = None
_inexact_warned = False


def _count_unrecoverable(weight, bias, dtype):
    """Adds the number of unrecoverable features of one backward to its device's tally (no sync)."""
    bad = unrecoverable_features(weight, bias, dtype)
    tally = _tallies.get(bad.device)
    if tally is None:
        global _step_hook
        with _lock:
            tally = _tallies.get(bad.device)
            if tally is None:
                tally = _tallies[bad.device] = torch.zeros((), dtype=torch.int64, device=bad.device)
            if _step_hook is None:
                _step_hook = register_optimizer_step_post_hook(_after_optimizer_step)
    tally.add_(bad.sum())


def _collect(block):
    """Features counted since the last collection whose copies to the host are done.

    Each device's tally is copied to the host and zeroed, in stream order; on accelerators the
    copy does not block and is read at a later collection once its event has completed, or at
    once when `block`.
    """
    with _lock:
        for device, tally in _tallies.items():
            if device.type == "cpu":
                _in_flight.append((tally.clone(), None))
            else:
                host = tally.to("cpu", non_blocking=True)
                event = torch.Event(device=device)
                event.record(torch.accelerator.current_stream(device))
                _in_flight.append((host, event))
            tally.zero_()
        total, pending = 0, []
        for host, event in _in_flight:
            if event is not None and not block and not event.query():
                pending.append((host, event))
                continue
            if event is not None:
                event.synchronize()
            total += int(host)
        _in_flight[:] = pending
    return total


def _warn_inexact(count):
    global _inexact_warned
    if count == 0 or _inexact_warned:
        return
    _inexact_warned = True
    warnings.warn(
        f"tempo_ds layer_norm / rms_norm: {count} feature(s) had gamma zero or too small (against "
        "beta, or against the smallest normal number of the output dtype) to recover the input from "
        "the output exactly; their gradients are approximate (gamma clamped by magnitude where it "
        "is below one step of the output, which keeps every gradient finite and those of the other "
        "features exact; docs/norm.md). Pass recover_check='exact' to keep the input for such "
        "calls instead. Counted over recent backward calls; further counts "
        "are not reported.",
        RuntimeWarning, stacklevel=3)


def _after_optimizer_step(optimizer, args, kwargs):
    _warn_inexact(_collect(block=False))


def report_unrecoverable_features():
    """Waits for the device and returns how many unrecoverable features the backward met
    (summed over backward calls) since the last report or optimizer step; warns as the step hook
    does. For loops that update parameters without a torch.optim optimizer."""
    count = _collect(block=True)
    _warn_inexact(count)
    return count


def recover_mode(recover_check):
    """"clamp", "exact" or "off" for a recover_check value. True is "exact" and False "off": what
    they meant before the default became "clamp", so a caller who asked for the check keeps it."""
    if recover_check is True:
        return "exact"
    if recover_check is False:
        return "off"
    if recover_check not in RECOVER_CHECKS:
        raise ValueError(f"recover_check must be one of {', '.join(map(repr, RECOVER_CHECKS))} "
                         f"(or True / False), got {recover_check!r}")
    return recover_check


def rms_norm_eps(eps, dtype):
    """torch.nn.RMSNorm's eps: None means the machine epsilon of the math type (fp32 for 16-bit)."""
    if eps is not None:
        return float(eps)
    math_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return torch.finfo(math_dtype).eps


def _contiguous(p):
    return None if p is None else p.contiguous()


class LayerNormFunction(torch.autograd.Function):
    """LayerNorm over the last dimension whose backward recovers x_hat from (y, gamma, beta)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, clamp_gamma):
        kernels = _backend.ops("core", x.device)
        weight, bias = _contiguous(weight), _contiguous(bias)
        # y has x's shape (the kernels read [..., N] as rows): returned as is, not as a view
        y, rstd = kernels.layer_norm_fwd(x.contiguous(), weight, bias, eps)
        ctx.save_for_backward(y, rstd, weight, bias)
        ctx.clamp_gamma = clamp_gamma
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        y, rstd, weight, bias = ctx.saved_tensors
        kernels = _backend.ops("core", y.device)
        dx, dweight, dbias = kernels.layer_norm_bwd(dy.contiguous(), y, rstd, weight, bias, ctx.clamp_gamma)
        if ctx.clamp_gamma and (weight is not None or bias is not None):
            _count_unrecoverable(weight, bias, y.dtype)
        return dx, dweight, dbias, None, None


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last dimension whose backward recovers x_hat = y / gamma."""

    @staticmethod
    def forward(ctx, x, weight, eps, clamp_gamma):
        kernels = _backend.ops("core", x.device)
        weight = _contiguous(weight)
        y, rstd = kernels.rms_norm_fwd(x.contiguous(), weight, eps)
        ctx.save_for_backward(y, rstd, weight)
        ctx.clamp_gamma = clamp_gamma
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        y, rstd, weight = ctx.saved_tensors
        kernels = _backend.ops("core", y.device)
        dx, dweight = kernels.rms_norm_bwd(dy.contiguous(), y, rstd, weight, ctx.clamp_gamma)
        if ctx.clamp_gamma and weight is not None:
            _count_unrecoverable(weight, None, y.dtype)
        return dx, dweight, None, None


def _needs_backward(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _warn_fallback(owner, op, mask, dtype):
    """Warn once per module (owner) or once per process for the functional op (owner None)."""
    if owner is not None:
        if getattr(owner, "_tempo_fallback_warned", False):
            return
        owner._tempo_fallback_warned = True
    else:
        if op in _warned_ops:
            return
        _warned_ops.add(op)
    count = int(mask.sum())
    scope = "module" if owner is not None else "op"
    warnings.warn(
        f"tempo_ds {op}: {count} feature(s) have gamma zero or too small (against beta, or "
        f"against the smallest normal {dtype}) to recover the input from the output; this call "
        f"keeps the input (stock PyTorch memory and math). Further fallbacks of this {scope} are "
        "silent.",
        RuntimeWarning, stacklevel=4)


def _native(fn, x, params):
    """PyTorch's own op; mixed precision (fp32 params, 16-bit x) runs in fp32 and casts back, as
    not every device's native kernel accepts mixed dtypes."""
    if all(p is None or p.dtype == x.dtype for p in params):
        return fn(x, *params)
    return fn(x.float(), *(None if p is None else p.float() for p in params)).to(x.dtype)


def _exact_fallback(op, x, weight, bias, owner):
    """recover_check="exact": True when this training call must keep the input (checked on the
    host: one device-to-host synchronisation per call, by design, with no cache to go stale)."""
    if (weight is None and bias is None) or not _needs_backward(x, weight, bias):
        return False
    bad = unrecoverable_features(weight, bias, x.dtype)
    if not bool(bad.any()):
        return False
    _warn_fallback(owner, op, bad, x.dtype)
    return True


def layer_norm_impl(x, weight, bias, eps, recover_check, owner=None):
    """layer_norm with the fallback warning attributed to `owner` (a module) or to the op."""
    check_feature_tensor("x", x)
    check_norm_param("weight", weight, x)
    check_norm_param("bias", bias, x, like=weight)
    check_non_negative("eps", eps)
    mode = recover_mode(recover_check)
    if mode == "exact" and _exact_fallback("layer_norm", x, weight, bias, owner):
        features = x.shape[-1]
        return _native(lambda t, w, b: F.layer_norm(t, (features,), w, b, eps), x, (weight, bias))
    return LayerNormFunction.apply(x, weight, bias, float(eps), mode != "off")


def rms_norm_impl(x, weight, eps, recover_check, owner=None):
    """rms_norm with the fallback warning attributed to `owner` (a module) or to the op."""
    check_feature_tensor("x", x)
    check_norm_param("weight", weight, x)
    if eps is not None:
        check_non_negative("eps", eps)
    eps = rms_norm_eps(eps, x.dtype)
    mode = recover_mode(recover_check)
    if mode == "exact" and _exact_fallback("rms_norm", x, weight, None, owner):
        features = x.shape[-1]
        return _native(lambda t, w: F.rms_norm(t, (features,), w, eps), x, (weight,))
    return RMSNormFunction.apply(x, weight, eps, mode != "off")


def feature_size(normalized_shape, where):
    """N of a normalized_shape that names one (the last) dimension: an int or a one-element
    sequence of ints. `where` names the caller in the ValueError raised otherwise."""
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        shape = (int(normalized_shape),)
    elif isinstance(normalized_shape, (tuple, list, torch.Size)) and all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in normalized_shape):
        shape = tuple(int(s) for s in normalized_shape)
    else:
        shape = None
    if shape is None or len(shape) != 1 or shape[0] < 1:
        raise ValueError(f"{where}: normalized_shape must be one positive size (these norms normalise "
                         f"over the last dimension only), got {normalized_shape!r}")
    return shape[0]


def _check_normalized_shape(op, normalized_shape, x):
    features = feature_size(normalized_shape, op)
    if features != x.shape[-1]:
        raise ValueError(f"{op}: normalized_shape must be the last dimension of x, ({x.shape[-1]},), "
                         f"got {normalized_shape!r}")


def _is_number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, torch.Tensor))


def _deprecated(old, new, stacklevel):
    warnings.warn(f"tempo_ds.ops.{old} is deprecated: call {new}, the form of torch.nn.functional "
                  "(normalized_shape = (x.shape[-1],))", DeprecationWarning, stacklevel=stacklevel + 1)


def _legacy_layer_norm_args(shape_slot, weight_slot, bias_slot, eps):
    """(weight, bias, eps) of the old call layer_norm(x, weight, bias=None, eps=1e-5). Its
    positional arguments arrive one slot to the right (weight in normalized_shape's, bias in
    weight's, eps in bias's); keyword ones in their own slot."""
    _deprecated("layer_norm(x, weight, bias, eps)", "layer_norm(x, normalized_shape, weight, bias, eps)", 3)
    if _is_number(bias_slot):
        return shape_slot, weight_slot, bias_slot
    if weight_slot is not None and bias_slot is not None:
        raise TypeError("layer_norm: the old form layer_norm(x, weight, bias, eps) got bias twice")
    return shape_slot, weight_slot if weight_slot is not None else bias_slot, eps


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, recover_check="clamp"):
    """LayerNorm over the last dimension of x that keeps its output, not its input, for backward.

    Called as torch.nn.functional.layer_norm. The old form layer_norm(x, weight, bias, eps)
    still works, with a DeprecationWarning.

    Args:
        x: float16/bfloat16/float32/float64 tensor of any shape and layout; normalised over its
            last dimension N.
        normalized_shape: N or (N,), the last dimension of x (one size only).
        weight, bias: gamma and beta, shape [N], or None. Their dtype is x's, or float32 next to
            16-bit x (mixed precision; y has x's dtype).
        eps: added to the variance.
        recover_check: "clamp" (default, no host sync), "exact" (one host sync per training
            call, PyTorch's op where gamma does not allow recovery) or "off"; True / False mean
            "clamp" / "off". See the module docstring.

    Saves for backward: the output y and one rstd per row (fp32; fp64 for fp64 x), plus the
    weight and bias themselves (parameters). Gradients are deterministic.
    """
    if normalized_shape is None or isinstance(normalized_shape, torch.Tensor):
        weight, bias, eps = _legacy_layer_norm_args(normalized_shape, weight, bias, eps)
    else:
        check_feature_tensor("x", x)
        _check_normalized_shape("layer_norm", normalized_shape, x)
    return layer_norm_impl(x, weight, bias, eps, recover_check)


def rms_norm(x, normalized_shape, weight=None, eps=None, *, recover_check="clamp"):
    """RMSNorm over the last dimension of x that keeps its output, not its input, for backward.

    Called as torch.nn.functional.rms_norm. The old form rms_norm(x, weight, eps) still works,
    with a DeprecationWarning.

    Args:
        x: float16/bfloat16/float32/float64 tensor of any shape and layout.
        normalized_shape: N or (N,), the last dimension of x (one size only).
        weight: gamma, shape [N], or None; x's dtype or float32 next to 16-bit x.
        eps: added to mean(x^2); None means torch.nn.RMSNorm's default, the machine epsilon of
            the math type (float32 for 16-bit x).
        recover_check: as in layer_norm (the rule with beta_j = 0: |gamma_j| * R <= tiny).

    Saves for backward: the output y and one rstd per row (fp32; fp64 for fp64 x).
    """
    if normalized_shape is None or isinstance(normalized_shape, torch.Tensor):
        _deprecated("rms_norm(x, weight, eps)", "rms_norm(x, normalized_shape, weight, eps)", 2)
        if weight is not None and not _is_number(weight):
            raise TypeError("rms_norm: old form rms_norm(x, weight, eps) got a tensor for eps")
        weight, eps = normalized_shape, (weight if weight is not None else eps)
    else:
        check_feature_tensor("x", x)
        _check_normalized_shape("rms_norm", normalized_shape, x)
    return rms_norm_impl(x, weight, eps, recover_check)
