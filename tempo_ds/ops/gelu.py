"""In-place GELU: the backward needs only the output and one branch bit per element.

Saved for backward: y (the output; the next linear layer keeps the same tensor, so it costs no
extra bytes) and ceil(n/8) bytes of packed branch bits. Stock GELU saves its input x instead.
"""
import torch

from . import _backend
from ._checks import check_choice, check_float_tensor

APPROXIMATIONS = ("none", "tanh")


class GeluFunction(torch.autograd.Function):
    """GELU whose backward recovers x from (y, branch bit) and evaluates GELU'(x) exactly."""

    @staticmethod
    def forward(ctx, x, tanh_form):
        kernels = _backend.ops("core", x.device)
        y, bits = kernels.gelu_fwd(x.contiguous().view(-1), tanh_form)
        y = y.view(x.shape)
        ctx.tanh_form = tanh_form
        ctx.save_for_backward(y, bits)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, bits = ctx.saved_tensors
        kernels = _backend.ops("core", y.device)
        dx = kernels.gelu_bwd(dy.contiguous().view(-1), y.view(-1), bits, ctx.tanh_form)
        return dx.view(y.shape), None


def gelu(x, approximate="none"):
    """GELU(x) that keeps only its output and a bit-packed branch mask for backward.

    Args:
        x: tensor of any shape and layout, float16/bfloat16/float32/float64.
        approximate: "none" (erf form) or "tanh" (GPT-2 / Megatron openai_gelu form).

    Saves for backward: the output y and ceil(x.numel()/8) bytes of branch bits.
    """
    check_float_tensor("x", x)
    check_choice("approximate", approximate, APPROXIMATIONS)
    return GeluFunction.apply(x, approximate == "tanh")
