"""Fused, vocab-parallel linear cross-entropy: the loss of `hidden @ weight.T (+ bias)` without
the [tokens, V] logits.

Stock code (F.linear, then Megatron's vocab-parallel cross-entropy) holds the logits in the
activation dtype, their fp32 copy and, for backward, the fp32 softmax: 4 V bytes per token kept
(201 KiB at V = 50,304) and about 10 V bytes per token at the peak of the step.

This op works in chunks of tokens whose logits fit CHUNK_BYTES. Forward: each chunk's logits
(an ATen GEMM) go through one kernel (csrc/loss, tempo/cross_entropy.h) that returns the fp32
row statistics (max, sum of exp(z - max), sum of z, the target's logit); the chunk is freed.
Under tensor parallelism those statistics are reduced across tp_group (max, then the rescaled
sums), as megatron/core/tensor_parallel/cross_entropy.py reduces them, once for all chunks.

Saved for backward: hidden (the final norm keeps that tensor already: shared), weight and bias
(parameters), the caller's target (8 bytes per token for int64 labels) and the fp32
log-sum-exp (4 bytes per token): 12 bytes per token that are the op's own.
Backward recomputes each chunk's logits (one more GEMM), turns them into their gradient in place
(the second kernel), and takes grad_hidden and grad_weight from that buffer with two GEMMs.

Why recompute rather than compute the gradients in the forward (Liger-Kernel's choice): the
forward would have to keep grad_hidden ([tokens, h] in the activation dtype, 2 h bytes per token,
2 KiB at h = 1024) and grad_weight (an fp32 [V, h] buffer, 206 MB at GPT-2 345M) from the
forward until the backward; memory is what this op is for, so it spends one GEMM instead.
"""
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import _backend
from ._checks import autocast_inputs, check_choice, check_float_tensor, check_non_negative, without_autocast

REDUCTIONS = ("mean", "sum", "none")
# Logits of one chunk of tokens, in bytes: 64 MiB keeps the GEMMs large (640 tokens at V 50,304
# in bf16) and the transient of the step a few per cent of stock's.
CHUNK_BYTES = 64 << 20
# Bytes per token the op itself keeps for backward: the fp32 lse (the target is the caller's).
LSE_BYTES = 4


def chunk_rows(vocab_local, element_size, chunk_bytes=None):
    """Tokens per chunk: as many as fit chunk_bytes (default CHUNK_BYTES) of logits, at least 1."""
    return max(1, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (vocab_local * element_size))


def _tp(group):
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _local_target(target, start, vocab_local, ignore_index):
    """The target's column in this vocab shard, or -1 (ignored, or in another shard)."""
    t = target.long() - start
    here = (target != ignore_index) & (t >= 0) & (t < vocab_local)
    return torch.where(here, t, torch.full_like(t, -1))


def _chunk_logits(hidden, weight, bias, begin, end):
    h = hidden[begin:end]
    return torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-token losses (fp32; fp64 for fp64 inputs) of a linear layer and a cross-entropy;
    `hidden` [N, h], `target` [N]. See the module docstring for what it keeps."""

    # The ledger's category of saved tensor 0, hidden: the input that stock code's Linear keeps
    # ("matmul"); lse and the labels count as "loss" by this Function's name.
    ledger_categories = {0: "matmul"}

    @staticmethod
    @without_autocast
    def forward(ctx, hidden, weight, bias, target, ignore_index, label_smoothing, z_loss, reduction,
                tp_group, chunk_bytes):
        kernels = _backend.ops("loss", hidden.device)
        world, rank = _tp(tp_group)
        n, vocab_local = hidden.shape[0], weight.shape[0]
        vocab = vocab_local * world
        start = rank * vocab_local
        stats_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        stats = torch.empty(4, n, dtype=stats_dtype, device=hidden.device)
        rows = chunk_rows(vocab_local, hidden.element_size(), chunk_bytes)
        for begin in range(0, n, rows):
            end = min(n, begin + rows)
            logits = _chunk_logits(hidden, weight, bias, begin, end)
            stats[:, begin:end] = kernels.cross_entropy_fwd(
                logits, _local_target(target[begin:end], start, vocab_local, ignore_index))
            del logits
        row_max, sum_exp = stats[0], stats[1]
        if world > 1:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
            sum_exp.mul_(torch.exp(row_max - global_max))
            dist.all_reduce(stats[1:], op=dist.ReduceOp.SUM, group=tp_group)
            row_max = global_max
        lse = row_max + torch.log(sum_exp)
        eps = label_smoothing * vocab / (vocab - 1) if label_smoothing > 0 else 0.0
        loss = lse - (1 - eps) * stats[3] - (eps / vocab) * stats[2] + z_loss * lse * lse
        valid = target != ignore_index
        loss = torch.where(valid.reshape(-1), loss, torch.zeros_like(loss))

        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.settings = (ignore_index, eps, z_loss, reduction, tp_group, chunk_bytes, vocab, start)
        if reduction == "none":
            return loss
        total = loss.sum()
        return total if reduction == "sum" else total / valid.sum().clamp(min=1)

    @staticmethod
    @once_differentiable
    @without_autocast
    def backward(ctx, grad):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        ignore_index, eps, z_loss, reduction, tp_group, chunk_bytes, vocab, start = ctx.settings
        kernels = _backend.ops("loss", hidden.device)
        n, vocab_local = hidden.shape[0], weight.shape[0]
        valid = target != ignore_index
        g = grad.to(lse.dtype)
        if reduction == "mean":
            g = g / valid.sum().clamp(min=1)
        # where, not a product: a NaN or inf in the incoming gradient of an ignored token stays out
        g = torch.where(valid, g.expand(n), torch.zeros((), dtype=lse.dtype, device=lse.device)).contiguous()

        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if want_h else None
        rows = chunk_rows(vocab_local, hidden.element_size(), chunk_bytes)
        several = n > rows
        # 16-bit weights: chunks' contributions add up in fp32 and are rounded once at the end
        accumulate_fp32 = several and weight.dtype in (torch.float16, torch.bfloat16)
        grad_weight = None
        if want_w:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32 if accumulate_fp32 else weight.dtype,
                                      device=weight.device)
        grad_bias = torch.zeros(vocab_local, dtype=lse.dtype, device=hidden.device) if want_b else None
        for begin in range(0, n, rows):
            end = min(n, begin + rows)
            logits = _chunk_logits(hidden, weight, bias, begin, end)
            dz = kernels.cross_entropy_bwd(
                logits, lse[begin:end], g[begin:end],
                _local_target(target[begin:end], start, vocab_local, ignore_index), eps, z_loss, 1.0 / vocab)
            if want_h:
                torch.mm(dz, weight, out=grad_hidden[begin:end])
            if want_w:
                part = torch.mm(dz.t(), hidden[begin:end])
                grad_weight.add_(part)
            if want_b:
                grad_bias.add_(dz.sum(dim=0, dtype=grad_bias.dtype))
            del logits, dz
        if want_h and tp_group is not None and dist.get_world_size(tp_group) > 1:
            # hidden is replicated across the group; each rank has the part of its vocab shard
            dist.all_reduce(grad_hidden, group=tp_group)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def _check(hidden, weight, bias, target, ignore_index, label_smoothing, z_loss, reduction, tp_group):
    check_float_tensor("hidden", hidden)
    check_float_tensor("weight", weight)
    if hidden.dim() == 0:
        raise ValueError("hidden must have a last (hidden) dimension, got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [V_local, {hidden.shape[-1]}] (h of hidden), "
                         f"got {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if bias is not None:
        check_float_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},) (V_local), got {tuple(bias.shape)}")
        if bias.device != hidden.device or bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype and device of hidden ({hidden.dtype}, {hidden.device}), "
                            f"got {bias.dtype}, {bias.device}")
    if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point or target.dtype.is_complex \
            or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor, got "
                        f"{target.dtype if isinstance(target, torch.Tensor) else type(target).__name__}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(hidden.shape[:-1])} (hidden without its last "
                         f"dimension), got {tuple(target.shape)}")
    if target.device != hidden.device:
        raise ValueError(f"target is on {target.device} but hidden is on {hidden.device}")
    check_choice("reduction", reduction, REDUCTIONS)
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
    check_non_negative("z_loss", z_loss)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    world, _ = _tp(tp_group)
    vocab = weight.shape[0] * world
    if label_smoothing > 0 and vocab < 2:
        raise ValueError("label_smoothing needs a vocab of at least 2")
    # one reduction and one host sync: a bad id would otherwise read outside the logits' row
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if target.numel() and bool(bad.any()):
        value = int(target[bad].flatten()[0])
        raise ValueError(f"target holds {value}, outside [0, {vocab}) (the vocab of weight"
                         f"{' across tp_group' if world > 1 else ''}) and not ignore_index={ignore_index}")


def linear_cross_entropy(hidden, weight, target, *, bias=None, ignore_index=-100, label_smoothing=0.0,
                         z_loss=0.0, reduction="mean", tp_group=None, chunk_bytes=None):
    """Cross-entropy of the logits `hidden @ weight.T + bias` against `target`, without them.

    Args:
        hidden: [..., h] float tensor (fp16, bf16, fp32 or fp64).
        weight: [V_local, h] in hidden's dtype; under tensor parallelism the local vocab shard of
            Megatron's equal split (rank r holds ids [r V_local, (r + 1) V_local)).
        target: integer tensor of hidden.shape[:-1], global vocab ids or ignore_index.
        bias: optional [V_local] in hidden's dtype.
        ignore_index: target value that counts nothing (loss 0, gradient 0).
        label_smoothing: in [0, 1); Megatron's definition: with eps = label_smoothing V / (V - 1),
            loss = (1 - eps) nll - eps mean_j log p_j (V and the mean over the whole vocab).
        z_loss: adds z_loss lse^2 per counted token.
        reduction: "mean" (over counted tokens; 0 when none counts, with zero gradients, where
            F.cross_entropy returns NaN), "sum", or "none" (per-token losses of target's shape,
            0 at ignored tokens).
        tp_group: process group over which weight's vocab is split (None: not split). The
            gradient of hidden is all-reduced over it, so hidden must be replicated there.
        chunk_bytes: the memory cap of one chunk's logits (default CHUNK_BYTES).

    Returns the loss in float32 (float64 for float64 inputs). Saved for backward: hidden, weight,
    bias, target and the fp32 lse ([tokens], 4 bytes per token); nothing of size V per token.
    Under autocast, hidden, weight and bias are cast as F.linear would cast them.
    """
    _check(hidden, weight, bias, target, ignore_index, label_smoothing, z_loss, reduction, tp_group)
    hidden, weight, bias = autocast_inputs(hidden.device.type, hidden, weight, bias)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    flat_target = target.reshape(-1)
    loss = LinearCrossEntropyFunction.apply(
        flat_hidden, weight.contiguous(), None if bias is None else bias.contiguous(), flat_target,
        ignore_index, float(label_smoothing), float(z_loss), reduction, tp_group, chunk_bytes)
    return loss.reshape(target.shape) if reduction == "none" else loss
