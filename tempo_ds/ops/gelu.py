"""In-place GELU and the fused bias-GELU: the backward needs only the output and one branch bit
per element.

Saved for backward: y (the output; the next linear layer keeps the same tensor, so it costs no
extra bytes) and ceil(n/8) bytes of packed branch bits. Stock GELU saves its input x instead.

The derivative GELU'(x) is recovered from (y, bit). For float32/float64 y the kernel inverts y -> x
by Newton's method on every call. For float16/bfloat16 y there are only 2^16 possible outputs, so
the derivative is a fixed table of 2 x 2^16 floats (512 KiB per device, form and dtype), computed
once with the float64 inversion and then read by a gather: the backward does no inversion at all.
The table is a constant of the op, not an activation: autograd saves nothing more.
"""
import torch
from torch.autograd.function import once_differentiable

from . import _backend, reference
from ._checks import check_choice, check_float_tensor, check_like

APPROXIMATIONS = ("none", "tanh")
TABLE_DTYPES = (torch.float16, torch.bfloat16)

_tables = {}


def derivative_table(dtype, tanh_form, device):
    """GELU'(x(y, bit)) for every 16-bit y of dtype: float32 [2, 65536] on device, row = branch
    bit, column = the bit pattern of y. Built once (float64 Newton inversion, rounded once to
    float32) and cached."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # one table per GPU, however it is named
        device = torch.device("cuda", torch.cuda.current_device())
    key = (dtype, bool(tanh_form), device)
    table = _tables.get(key)
    if table is None:
        if dtype not in TABLE_DTYPES:
            raise TypeError(f"derivative_table: dtype must be float16 or bfloat16, got {dtype}")
        pattern = torch.arange(1 << 16, dtype=torch.int32, device=device)
        y = torch.where(pattern >= 1 << 15, pattern - (1 << 16), pattern).to(torch.int16).view(dtype)
        y = y.to(torch.float64)
        kernels = _backend.ops("core", y.device)
        ones = torch.ones_like(y)
        n_bytes = (1 << 16) // 8
        rows = [kernels.gelu_bwd(ones, y, torch.full((n_bytes,), fill, dtype=torch.uint8, device=device),
                                 bool(tanh_form))
                for fill in (0x00, 0xFF)]
        table = _tables[key] = torch.stack(rows).float().contiguous()
    return table


class GeluFunction(torch.autograd.Function):
    """GELU whose backward recovers GELU'(x) from (y, branch bit): a table gather for 16-bit y
    (when use_table), Newton's inversion otherwise."""

    @staticmethod
    def forward(ctx, x, tanh_form, use_table=True):
        kernels = _backend.ops("core", x.device)
        # y has x's shape (the kernels run over numel): returned as is, not as a view
        y, bits = kernels.gelu_fwd(x.contiguous(), tanh_form)
        ctx.tanh_form = tanh_form
        ctx.use_table = use_table and x.dtype in TABLE_DTYPES
        ctx.save_for_backward(y, bits)
        return y

    @staticmethod
    @once_differentiable  # the kernels' GELU'(x) is not differentiable: raise on double backward
    def backward(ctx, dy):
        y, bits = ctx.saved_tensors
        return _gelu_grad(ctx, dy, y, bits), None, None


def _gelu_grad(ctx, dy, y, bits):
    """dx from the saved (y, bits): a table gather for 16-bit y (ctx.use_table), Newton otherwise."""
    kernels = _backend.ops("core", y.device)
    dy = dy.contiguous()
    if ctx.use_table:
        return kernels.gelu_bwd_table(dy, y, bits, derivative_table(y.dtype, ctx.tanh_form, y.device))
    return kernels.gelu_bwd(dy, y, bits, ctx.tanh_form)


class BiasGeluFunction(torch.autograd.Function):
    """GELU(x + bias) in one kernel that keeps (y, branch bits); the backward is GeluFunction's,
    and the bias gradient the column sum of dx (in fp32, fp64 for fp32/fp64 tensors)."""

    @staticmethod
    def forward(ctx, x, bias, tanh_form, use_table=True):
        kernels = _backend.ops("core", x.device)
        y, bits = kernels.bias_gelu_fwd(x.contiguous(), bias.contiguous(), tanh_form)
        ctx.tanh_form = tanh_form
        ctx.use_table = use_table and x.dtype in TABLE_DTYPES
        ctx.save_for_backward(y, bits)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        y, bits = ctx.saved_tensors
        dx = _gelu_grad(ctx, dy, y, bits)
        dbias = None
        if ctx.needs_input_grad[1]:
            # the sum of the rounded dx, as autograd reduces a broadcast bias's gradient
            acc = reference.compute_dtype(y.dtype)
            dbias = dx.reshape(-1, y.shape[-1]).sum(0, dtype=acc).to(y.dtype)
        return dx, dbias, None, None


def bias_gelu(x, bias, approximate="none"):
    """GELU(x + bias) with bias broadcast over the last dimension, in one kernel that keeps only
    the output and a bit-packed branch mask for backward: Megatron's bias_gelu_impl (approximate
    "tanh", as its bias_activation_fusion computes) without keeping x + bias.

    Args:
        x: tensor [..., N] of any layout, float16/bfloat16/float32/float64.
        bias: tensor [N] with x's dtype and device.
        approximate: "none" (erf form) or "tanh".

    Saves for backward: the output y and ceil(x.numel()/8) bytes of branch bits (stock keeps
    x + bias, or x and bias). Against bias-add then GELU it saves a write and a read of x + bias.
    The backward returns dx and dbias (the column sum of dx). Differentiable once, like gelu.
    """
    check_float_tensor("x", x)
    check_float_tensor("bias", bias)
    check_choice("approximate", approximate, APPROXIMATIONS)
    if x.dim() == 0 or bias.shape != (x.shape[-1],):
        raise ValueError(f"bias must have shape ({x.shape[-1] if x.dim() else '...'},) (the last "
                         f"dimension of x), got {tuple(bias.shape)}")
    check_like("bias", bias, "x", x)
    return BiasGeluFunction.apply(x, bias, approximate == "tanh")


def gelu(x, approximate="none"):
    """GELU(x) that keeps only its output and a bit-packed branch mask for backward. Takes the
    arguments of torch.nn.functional.gelu(input, approximate="none"); approximate may also be
    given positionally, which F.gelu refuses.

    Args:
        x: tensor of any shape and layout, float16/bfloat16/float32/float64.
        approximate: "none" (erf form) or "tanh" (GPT-2 / Megatron openai_gelu form).

    Saves for backward: the output y and ceil(x.numel()/8) bytes of branch bits.

    Differentiable once: a double backward (create_graph=True, then backward through the
    gradient, as a gradient penalty does) raises a RuntimeError rather than returning a wrong
    second derivative (the kernels' backward has no derivative of its own).
    """
    check_float_tensor("x", x)
    check_choice("approximate", approximate, APPROXIMATIONS)
    return GeluFunction.apply(x, approximate == "tanh")
