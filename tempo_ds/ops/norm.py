"""Output-saving LayerNorm and RMSNorm: backward recovers the normalised input from the output.

Saved for backward: the output y (the next linear layer keeps the same tensor, so it costs no
extra bytes) and one rstd per row (fp32; fp64 for fp64 input). Stock LayerNorm saves its input x
and a mean and an rstd per row; stock RMSNorm on CPU saves fp32 copies of x and of x * rstd.

The backward computes x_hat = (y - beta) / gamma element by element inside the kernel. That is
only possible where gamma_j carries x_hat_j through the rounding of y_j: feature j is
*unrecoverable* when |gamma_j| * R <= max(|beta_j|, tiny), R = 1 / (16 * eps(y.dtype)) and tiny
the smallest normal number of y.dtype (below it y_j is subnormal and keeps fewer bits; RMSNorm
has beta_j = 0). Before a forward that will need a backward, the op checks this on the
host; if any feature is unrecoverable, that call keeps the input instead and runs PyTorch's
native op (exact, stock memory), with a one-time warning.

The check costs one device-to-host synchronisation (0.15 ms on an H100, more than the kernel of
a 65536 x 4096 bf16 forward). Its verdict is therefore kept per parameter tensor and reused while
gamma and beta cannot have changed: the same tensors, storage and version counters, the same
output dtype, and no optimizer step since (any torch.optim optimizer, counted through torch's
global step hook). In training that is one check per norm per optimizer step, whatever the
micro-batch count and activation recomputation. An in-place edit through `.data` bypasses the
version counter; pass recover_check=False (or set the module attribute) to skip the check
altogether when gamma is known to stay away from zero. Without a valid check, gamma_j == 0 makes
the gradients non-finite, but gamma_j small against beta_j gives finite, inaccurate ones.
"""
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _backend
from ._checks import check_feature_tensor, check_non_negative, check_norm_param

# kNormRecoverMargin of csrc/includes/tempo/norm.h.
RECOVER_MARGIN = 16.0

_warned_ops = set()


def recover_bound(dtype):
    """R of the recoverability rule for an output of `dtype`: 1 / (16 * eps(dtype))."""
    return 1.0 / (RECOVER_MARGIN * torch.finfo(dtype).eps)


def recover_floor(dtype):
    """The floor under |beta_j| in the recoverability rule: the smallest normal number of `dtype`.

    Subnormal outputs are spaced tiny * eps apart whatever their size, so with beta_j = 0 a
    gamma_j below tiny / R gives y_j values whose rounding costs x_hat_j more than the rule's
    1/16 (fp16: |gamma_j| <= 9.5e-7; bf16 and fp32 only for subnormal gamma_j).
    """
    return torch.finfo(dtype).tiny


def unrecoverable_features(weight, bias, dtype):
    """Bool mask [N] of the features whose x_hat cannot be recovered from an output of `dtype`.

    weight or bias may be None (gamma = 1, beta = 0). NaN parameters count as recoverable, so
    that NaN reaches the gradients instead of being hidden by the fallback.
    """
    ref = weight if weight is not None else bias
    acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
    gamma = weight.detach().to(acc).abs() if weight is not None else torch.ones_like(bias, dtype=acc)
    floor = recover_floor(dtype)
    beta = bias.detach().to(acc).abs().clamp(min=floor) if bias is not None else floor
    # gamma == 0 is caught here too (0 <= floor); NaN compares False
    return gamma * recover_bound(dtype) <= beta


# Attribute of gamma (or of beta when there is no gamma) holding (state, mask of unrecoverable
# features or None, weak reference to beta): it dies with the tensor, and beta is compared by
# identity (an id alone could be reused).
_VERDICT_ATTR = "_tempo_recover_verdict"
_optimizer_steps = 0
_step_hook = None


def _count_optimizer_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


def _tensor_state(t):
    return None if t is None else (id(t), t.data_ptr(), t._version)


def checked_unrecoverable(weight, bias, dtype):
    """Mask of unrecoverable features, or None when every feature is recoverable.

    Runs unrecoverable_features and its one device-to-host synchronisation only when no verdict
    is kept for these parameters in their current state (see the module docstring).
    """
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)
    key = weight if weight is not None else bias
    state = (_tensor_state(weight), _tensor_state(bias), dtype, _optimizer_steps)
    kept = getattr(key, _VERDICT_ATTR, None)
    if kept is not None and kept[0] == state and (bias is None or kept[2]() is bias):
        return kept[1]
    bad = unrecoverable_features(weight, bias, dtype)
    verdict = bad if bool(bad.any()) else None  # the device-to-host synchronisation
    try:
        setattr(key, _VERDICT_ATTR, (state, verdict, None if bias is None else weakref.ref(bias)))
    except (AttributeError, TypeError):
        pass  # a tensor type that takes no attributes is checked on every call
    return verdict


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
    def forward(ctx, x, weight, bias, eps):
        kernels = _backend.ops("core", x.device)
        weight, bias = _contiguous(weight), _contiguous(bias)
        # y has x's shape (the kernels read [..., N] as rows): returned as is, not as a view
        y, rstd = kernels.layer_norm_fwd(x.contiguous(), weight, bias, eps)
        ctx.save_for_backward(y, rstd, weight, bias)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        y, rstd, weight, bias = ctx.saved_tensors
        kernels = _backend.ops("core", y.device)
        dx, dweight, dbias = kernels.layer_norm_bwd(dy.contiguous(), y, rstd, weight, bias)
        return dx, dweight, dbias, None


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last dimension whose backward recovers x_hat = y / gamma."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        kernels = _backend.ops("core", x.device)
        weight = _contiguous(weight)
        y, rstd = kernels.rms_norm_fwd(x.contiguous(), weight, eps)
        ctx.save_for_backward(y, rstd, weight)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        y, rstd, weight = ctx.saved_tensors
        kernels = _backend.ops("core", y.device)
        dx, dweight = kernels.rms_norm_bwd(dy.contiguous(), y, rstd, weight)
        return dx, dweight, None


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


def layer_norm_impl(x, weight, bias, eps, recover_check, owner=None):
    """layer_norm with the fallback warning attributed to `owner` (a module) or to the op."""
    check_feature_tensor("x", x)
    check_norm_param("weight", weight, x)
    check_norm_param("bias", bias, x, like=weight)
    check_non_negative("eps", eps)
    features = x.shape[-1]
    if recover_check and (weight is not None or bias is not None) and _needs_backward(x, weight, bias):
        bad = checked_unrecoverable(weight, bias, x.dtype)
        if bad is not None:
            _warn_fallback(owner, "layer_norm", bad, x.dtype)
            return _native(lambda t, w, b: F.layer_norm(t, (features,), w, b, eps), x, (weight, bias))
    return LayerNormFunction.apply(x, weight, bias, float(eps))


def rms_norm_impl(x, weight, eps, recover_check, owner=None):
    """rms_norm with the fallback warning attributed to `owner` (a module) or to the op."""
    check_feature_tensor("x", x)
    check_norm_param("weight", weight, x)
    if eps is not None:
        check_non_negative("eps", eps)
    eps = rms_norm_eps(eps, x.dtype)
    features = x.shape[-1]
    if recover_check and weight is not None and _needs_backward(x, weight):
        bad = checked_unrecoverable(weight, None, x.dtype)
        if bad is not None:
            _warn_fallback(owner, "rms_norm", bad, x.dtype)
            return _native(lambda t, w: F.rms_norm(t, (features,), w, eps), x, (weight,))
    return RMSNormFunction.apply(x, weight, eps)


def layer_norm(x, weight=None, bias=None, eps=1e-5, recover_check=True):
    """LayerNorm over the last dimension of x that keeps its output, not its input, for backward.

    Args:
        x: float16/bfloat16/float32/float64 tensor of any shape and layout; normalised over its
            last dimension N.
        weight, bias: gamma and beta, shape [N], or None. Their dtype is x's, or float32 next to
            16-bit x (mixed precision; y has x's dtype).
        eps: added to the variance.
        recover_check: check on the host that every feature can be recovered from the output,
            and fall back to stock PyTorch for this call if not. The check synchronises with the
            device once per parameter state (at most once per optimizer step).

    Saves for backward: the output y and one rstd per row (fp32; fp64 for fp64 x), plus the
    weight and bias themselves (parameters). Gradients are deterministic.
    """
    return layer_norm_impl(x, weight, bias, eps, recover_check)


def rms_norm(x, weight=None, eps=None, recover_check=True):
    """RMSNorm over the last dimension of x that keeps its output, not its input, for backward.

    Args:
        x: float16/bfloat16/float32/float64 tensor of any shape and layout.
        weight: gamma, shape [N], or None; x's dtype or float32 next to 16-bit x.
        eps: added to mean(x^2); None means torch.nn.RMSNorm's default, the machine epsilon of
            the math type (float32 for 16-bit x).
        recover_check: as in layer_norm (the rule with beta_j = 0: |gamma_j| * R <= tiny).

    Saves for backward: the output y and one rstd per row (fp32; fp64 for fp64 x).
    """
    return rms_norm_impl(x, weight, eps, recover_check)
