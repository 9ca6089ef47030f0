"""Dropout and bias-dropout-add that keep a seed, not a mask.

Each call draws one 64-bit seed from the current torch generator of the input's device
(`torch.randint` into a one-element int64 tensor on that device: no host sync on GPU) and the
kernels derive the keep mask of element i from Philox4x32-10(counter = i // 4, key = seed)
(csrc/includes/tempo/philox.h). Backward regenerates the mask from the same seed. Because the
seed comes from torch's generator:
  - torch.manual_seed makes runs repeatable;
  - Megatron's tensor-parallel RNG tracker (`get_cuda_rng_tracker().fork()`) swaps that generator's
    state, so forked regions draw their seeds from the model-parallel stream;
  - torch.utils.checkpoint and Megatron's recomputation restore the RNG state before recomputing,
    so the recomputed forward draws the same seed and regenerates the same mask.
The CPU build, the CUDA build and the PyTorch fallback draw identical masks for a given seed.

RNG streams versus stock: with p = 0 or in eval mode nothing is drawn, as with torch's dropout,
so such a model leaves the generator exactly where stock code does. In training with p > 0 each
call advances the generator by one 64-bit draw, where torch's dropout advances it by an amount
depending on the tensor size (CPU) or a Philox offset increment (CUDA): the masks differ from
stock ones (they come from another generator) and later random numbers differ as well, but both
are a deterministic function of the seed.
"""
import contextlib

import torch
from torch.autograd.function import once_differentiable

from . import _backend
from ._checks import check_float_tensor, check_like, check_probability

_INT64_MIN, _INT64_END = -(2 ** 63), 2 ** 63 - 1

# Debug hooks: callables (op_name, keep_mask) run after each forward that draws a mask.
_mask_hooks = []


def draw_seed(device):
    """One int64 drawn from the current torch generator of `device`, as a tensor on `device`."""
    return torch.randint(_INT64_MIN, _INT64_END, (1,), dtype=torch.int64, device=device)


@contextlib.contextmanager
def dropout_mask_hook(hook):
    """Call `hook(op_name, keep_mask)` after every Tempo dropout forward in the block.

    keep_mask is a bool tensor shaped like the dropped tensor (True = kept). It is regenerated from
    the seed by the op's own kernels only while a hook is installed (debugging and tests), so it
    costs nothing otherwise.
    """
    _mask_hooks.append(hook)
    try:
        yield hook
    finally:
        _mask_hooks.remove(hook)


@contextlib.contextmanager
def record_dropout_masks():
    """Collect (op_name, keep_mask) of every Tempo dropout forward in the block into a list."""
    records = []
    with dropout_mask_hook(lambda name, mask: records.append((name, mask))):
        yield records


def report_mask(op_name, kernels, seed, shape, p):
    if not _mask_hooks:
        return
    n = 1
    for d in shape:
        n *= d
    mask = kernels.dropout_mask(seed, n, p).view(shape)
    for hook in list(_mask_hooks):
        hook(op_name, mask)


def _apply_mask(kernels, t, seed, p):
    """t * keep / (1 - p) with the mask of `seed`: dropout's forward, and the backward of every
    op here, whose gradient is the same mask and scale applied to the incoming gradient."""
    return kernels.dropout_fwd(t.contiguous(), seed, p)  # t's shape, not a view


def _keep_seed(ctx, op_name, kernels, seed, shape, p):
    """What both dropout Functions keep for backward: the seed (and p), nothing of the mask."""
    ctx.p = p
    ctx.save_for_backward(seed)
    report_mask(op_name, kernels, seed, shape, p)


def _masked_grad(ctx, grad):
    """grad * keep / (1 - p), the keep mask regenerated from the seed _keep_seed saved."""
    (seed,) = ctx.saved_tensors
    return _apply_mask(_backend.ops("dropout", grad.device), grad, seed, ctx.p)


class DropoutFunction(torch.autograd.Function):
    """x * keep / (1 - p) with the keep mask regenerated from a seed in backward."""

    @staticmethod
    def forward(ctx, x, p):
        kernels = _backend.ops("dropout", x.device)
        seed = draw_seed(x.device)
        y = _apply_mask(kernels, x, seed, p)
        _keep_seed(ctx, "dropout", kernels, seed, x.shape, p)
        return y

    @staticmethod
    @once_differentiable  # the kernel applying the mask is not differentiable: raise on double backward
    def backward(ctx, dy):
        return _masked_grad(ctx, dy), None


class BiasDropoutAddFunction(torch.autograd.Function):
    """residual + dropout(x + bias) in one kernel, keeping only the seed."""

    @staticmethod
    def forward(ctx, x, bias, residual, p):
        kernels = _backend.ops("dropout", x.device)
        seed = draw_seed(x.device)
        # x's shape, not a view (bias is [h], checked by bias_dropout_add)
        out = kernels.bias_dropout_add_fwd(x.contiguous(), None if bias is None else bias.contiguous(),
                                           residual.contiguous(), seed, p)
        ctx.bias_shape = bias.shape if bias is not None else None
        _keep_seed(ctx, "bias_dropout_add", kernels, seed, x.shape, p)
        return out

    @staticmethod
    @once_differentiable  # the kernel applying the mask is not differentiable: raise on double backward
    def backward(ctx, grad):
        grad_x = _masked_grad(ctx, grad)
        grad_bias = None
        if ctx.bias_shape is not None and ctx.needs_input_grad[1]:
            grad_bias = grad_x.view(-1, *ctx.bias_shape).sum(dim=0, dtype=torch.float32).to(grad.dtype)
        return grad_x, grad_bias, grad, None


def dropout(x, p=0.5, training=True, inplace=False):
    """Dropout that keeps an 8-byte seed for backward instead of a mask. Takes the arguments of
    torch.nn.functional.dropout(input, p, training, inplace), positionally or by keyword.

    Args:
        x: float tensor of any shape and layout.
        p: probability of zeroing an element, in [0, 1). Kept elements are scaled by 1 / (1 - p).
        training: False (or p == 0) returns x itself and draws no random number.
        inplace: must be False. True raises a ValueError: the kernel writes a new tensor, so an
            in-place call could only copy back into x, and x is often a tensor that a Tempo op
            keeps for backward (GELU and the norms keep their outputs), which backward would then
            refuse as modified. A caller that ignores the return value of an in-place call would
            silently train without dropout under a warning-only fallback; an error costs one edit.

    Saves for backward: one int64 seed (8 bytes). Stock dropout saves a 1-byte mask per element.

    Differentiable once: a double backward raises a RuntimeError rather than returning a wrong
    second derivative.
    """
    check_float_tensor("x", x)
    check_probability("p", p)
    if inplace:
        raise ValueError("inplace=True is not supported by tempo_ds.ops.dropout (it would overwrite a "
                         "tensor that Tempo ops may keep for backward); pass inplace=False and use "
                         "the returned tensor")
    if not training or p == 0.0:
        return x
    return DropoutFunction.apply(x, float(p))


def bias_dropout_add(x, bias, residual, p, training=True):
    """residual + dropout(x + bias), fused (Megatron's bias_dropout_add).

    Args:
        x: float tensor [..., h], at least 1-D.
        bias: None or a [h] tensor of x's dtype and device, broadcast over x's last dimension.
        residual: tensor of x's shape, dtype and device.
        p: dropout probability in [0, 1).
        training: False (or p == 0) computes residual + x + bias without drawing a random number.

    Saves for backward: one int64 seed (8 bytes). Stock bias-dropout-add saves a 1-byte mask per
    element.

    Differentiable once: a double backward raises a RuntimeError rather than returning a wrong
    second derivative.

    Raises: TypeError for a non-float x, residual or bias, or one of another dtype than x;
    ValueError for a wrong shape or device, or p outside [0, 1).
    """
    check_float_tensor("x", x)
    check_float_tensor("residual", residual)
    check_probability("p", p)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    check_like("residual", residual, "x", x)
    if bias is not None:
        check_float_tensor("bias", bias)
        # the shape itself, not the element count: a [h, 1] bias has h elements but broadcasts
        # differently (the eval path, a plain sum, would then fail or silently broadcast)
        if x.dim() == 0 or bias.shape != x.shape[-1:]:
            raise ValueError(f"bias must have shape ({x.shape[-1] if x.dim() else '?'},) (the last dimension "
                             f"of x), got {tuple(bias.shape)}")
        check_like("bias", bias, "x", x)
    if not training or p == 0.0:
        return residual + (x + bias if bias is not None else x)
    return BiasDropoutAddFunction.apply(x, bias, residual, float(p))
