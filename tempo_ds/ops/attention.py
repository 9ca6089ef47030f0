"""Attention scale-mask-softmax-dropout-matmul that keeps the softmax output and a seed only.

Tempo's sub-layer dropout recomputation for attention: out = dropout(softmax(mask(scale * scores))) @ v.
Megatron-core's unfused attention (FusedScaleMaskSoftmax's PyTorch path + nn.Dropout + bmm) keeps,
per element of the [b, np, sq, sk] score tensor, the fp32 softmax output (4 bytes), the dropout
mask (1 byte) and the dropped probabilities that the @v matmul saves (2 bytes in bf16): 7 bytes.
This op keeps the softmax output in the activation dtype (2 bytes in bf16; 4 with
softmax_in_fp32=True) plus one 8-byte seed; backward regenerates the dropped probabilities.

Semantics follow Megatron's FusedScaleMaskSoftmax with attention_mask_func: mask True means
"masked out"; masked scores are replaced by -10000.0 after scaling (so a fully masked row is the
uniform 1/sk, never NaN); softmax statistics are fp32 (fp64 for fp32 scores); the probabilities are
rounded to the activation dtype before dropout and @v, as Megatron casts them.
"""
import torch
from torch.autograd.function import once_differentiable

from . import _backend
from ._checks import autocast_inputs, check_float_tensor, check_like, check_probability, without_autocast
from .dropout import draw_seed, report_mask

_HALF = (torch.float16, torch.bfloat16)


def _grouped(t, groups, rows_per_group):
    """[b, np, rows, d] -> [b, groups, (np / groups) * rows, d] (a view: heads of a group are adjacent)."""
    return t.reshape(t.shape[0], groups, rows_per_group, t.shape[-1])


class SoftmaxDropoutMatmulFunction(torch.autograd.Function):
    """dropout(softmax(mask(scale * scores))) @ v, keeping probs (activation dtype or fp32) and a seed."""

    @staticmethod
    @without_autocast
    def forward(ctx, scores, v, mask, p, scale, keep_fp32, causal):
        b, heads, sq, sk = scores.shape
        groups = v.shape[1]
        kernels = _backend.ops("dropout", scores.device)
        # without dropout nothing is drawn, so the generator is left where stock code leaves it
        seed = draw_seed(scores.device) if p > 0.0 else torch.zeros(1, dtype=torch.int64, device=scores.device)
        scores3 = scores.contiguous().view(b * heads, sq, sk)
        probs, dropped = kernels.softmax_dropout_fwd(scores3, mask, causal, scale, seed, p, keep_fp32)
        if p > 0.0:
            report_mask("softmax_dropout_matmul", kernels, seed, scores.shape, p)
        # GQA: a group's heads share one v, so [b, g, r*sq, sk] @ [b, g, sk, hn] needs no repeat.
        # The product is written into out, [b, heads, sq, hn], which is returned as is, not as a view.
        rows = heads // groups * sq
        out = torch.empty(b, heads, sq, v.shape[-1], dtype=v.dtype, device=v.device)
        torch.matmul(_grouped(dropped.view(b, heads, sq, sk), groups, rows), v, out=_grouped(out, groups, rows))
        ctx.shape = (b, heads, sq, sk)
        ctx.p, ctx.scale, ctx.causal = p, scale, causal
        ctx.has_mask = mask is not None
        ctx.save_for_backward(probs, v, seed, *([mask] if mask is not None else []))
        return out

    @staticmethod
    @once_differentiable  # the kernels' backward is not differentiable: raise on double backward
    @without_autocast
    def backward(ctx, grad_out):
        probs, v, seed, *rest = ctx.saved_tensors
        mask = rest[0] if ctx.has_mask else None
        b, heads, sq, sk = ctx.shape
        groups = v.shape[1]
        rows = heads // groups * sq
        kernels = _backend.ops("dropout", probs.device)
        grad_out = _grouped(grad_out, groups, rows)
        grad_dropped = torch.matmul(grad_out, v.transpose(-1, -2))
        grad_v = None
        if ctx.needs_input_grad[1]:
            if ctx.p > 0.0 or probs.dtype != v.dtype:
                dropped = kernels.softmax_dropout_regen(probs, seed, ctx.p, v.dtype)
            else:
                dropped = probs
            grad_v = torch.matmul(_grouped(dropped.view(b, heads, sq, sk), groups, rows).transpose(-1, -2), grad_out)
        grad_scores = None
        if ctx.needs_input_grad[0]:
            grad_scores = kernels.softmax_dropout_bwd(grad_dropped.contiguous().view(b * heads, sq, sk), probs, mask,
                                                      ctx.causal, ctx.scale, seed, ctx.p, grad_dropped.dtype)
            grad_scores = grad_scores.view(b, heads, sq, sk)
        return grad_scores, grad_v, None, None, None, None, None


def softmax_dropout_matmul(scores, v, mask=None, p=0.0, scale=None, softmax_in_fp32=False, causal=False):
    """dropout(softmax(mask(scale * scores))) @ v with Megatron's masking semantics.

    Args:
        scores: raw attention scores [b, np, sq, sk] (Megatron: q @ k^T * softmax_scale), float.
        v: values [b, ng, sk, hn] of scores' dtype (after autocast's conversion, below) and
            device, ng dividing np (GQA: head i uses group i // (np/ng)).
        mask: None or a bool tensor broadcastable to [b, np, sq, sk]; True = masked out
            (replaced by -10000.0 after scaling, as Megatron's attention_mask_func).
        p: attention dropout probability in [0, 1); pass 0 in eval.
        scale: None or the multiplier applied in fp32 before masking (Megatron's
            FusedScaleMaskSoftmax `scale`, the query-key layer scaling coefficient).
        softmax_in_fp32: keep the softmax output in fp32 (4 bytes per element) for a backward
            bit-for-bit on Megatron's fp32 softmax backward. False keeps it in the activation
            dtype (2 bytes in bf16/fp16); the backward still computes in fp32. The statistics are
            fp32 either way.
        causal: also mask key > query (Megatron's default causal mask), without a mask tensor.

    Returns: [b, np, sq, hn] in scores' dtype (in the autocast dtype under autocast, below).

    Under torch.autocast (enabled for scores' device type) the op is a "lower precision" op, as the
    bmm that ends Megatron's unfused path: float16/bfloat16/float32 scores and v are first converted
    to the autocast dtype (float64 is left alone; v must then share scores' dtype), the output and
    the kept softmax output are in that dtype (fp32 with softmax_in_fp32), and the gradients come
    back in each input's own dtype through the conversion. In Megatron the scores come from a
    baddbmm under the same autocast, so they are already in that dtype and this matches the stock
    path. The computation itself then runs with autocast off, in forward and backward alike.

    Saves for backward: the softmax output ([b, np, sq, sk], activation dtype or fp32), an 8-byte
    seed, v and the mask (both inputs, so no new bytes; under autocast with inputs of another
    dtype, v's converted copy). Not the dropout output, not a dropout mask.

    Differentiable once: a double backward (create_graph=True, then backward through the
    gradient) raises a RuntimeError rather than returning a wrong second derivative.

    Raises: TypeError for a non-float scores or v, v of another dtype than scores, or a non-bool
    mask; ValueError for a wrong shape, v or mask on another device, or p outside [0, 1).
    """
    check_float_tensor("scores", scores)
    check_float_tensor("v", v)
    check_probability("p", p)
    if scores.dim() != 4:
        raise ValueError(f"scores must be [b, np, sq, sk], got shape {tuple(scores.shape)}")
    b, heads, sq, sk = scores.shape
    if v.dim() != 4 or v.shape[0] != b or v.shape[2] != sk or v.shape[1] == 0 or heads % v.shape[1]:
        raise ValueError(f"v must be [b={b}, ng, sk={sk}, hn] with ng dividing np={heads}, got {tuple(v.shape)}")
    # converted before the dtype check: under autocast mixed input dtypes are fine, as for bmm
    scores, v = autocast_inputs(scores.device.type, scores, v)
    check_like("v", v, "scores", scores)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = masked out), got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.device != scores.device:
            raise ValueError(f"mask must be on scores' device {scores.device}, got {mask.device}")
        try:
            if mask.dim() > 4 or torch.broadcast_shapes(mask.shape, scores.shape) != scores.shape:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"mask of shape {tuple(mask.shape)} is not broadcastable to scores' shape "
                             f"{tuple(scores.shape)}") from None
        # a broadcast view: stride 0 on broadcast dimensions, no copy
        mask = mask.expand(b, heads, sq, sk)
    if causal and sq != sk:
        raise ValueError(f"causal needs sq == sk (Megatron's causal mask is for self attention), got {sq}, {sk}")
    # after the conversion: keep_fp32 refers to the dtype the kernels compute in
    keep_fp32 = bool(softmax_in_fp32) and scores.dtype in _HALF
    return SoftmaxDropoutMatmulFunction.apply(scores, v, mask, float(p), 1.0 if scale is None else float(scale),
                                              keep_fp32, bool(causal))
