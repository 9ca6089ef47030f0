"""Memory-efficient attention with seeded dropout: flash-attention's saving contract in PyTorch ops.

out = dropout(softmax(scale * q @ kᵀ, causal)) @ v, computed in query chunks. Stock (SDPA's math
kernel, which PyTorch runs on CPU whenever dropout is on) keeps per score element the softmax
output (4 bytes in fp32) and the dropout mask (4 bytes on CPU, 1 on CUDA): 8 bytes × b·np·sq·sk.
This op keeps nothing of size sq × sk: q, k, v (views of the QKV projection output in Megatron,
so no new bytes), the fp32 logsumexp [b, np, sq] (4 bytes per query row and head) and an 8-byte
seed. Backward recomputes the probabilities of each chunk from q, k and the logsumexp and
regenerates the dropout mask from the seed.

Unlike flash-attention it does not keep the output either: flash-attention needs O for
D = rowsum(dO ∘ O) because it tiles the key dimension, but here a query chunk holds whole rows, so
D = rowsum(P ∘ dP) is computed exactly in fp32 from the recomputed chunk (the same value, without
the rounding of O to the activation dtype).

Dropout: element (b, h, i, j) of the [b, np, sq, sk] probabilities uses the keep bit of flat index
((b·np + h)·sq + i)·sk + j of the dropout family's Philox stream (`dropout_mask_block`), the layout
of softmax_dropout_matmul. The mask is therefore a function of (seed, position) only: forward and
backward agree whatever the chunk size, the CPU build, the CUDA build and the PyTorch fallback draw
the same bits, and the debug hook (`record_dropout_masks`) reports the whole mask.
"""
import torch
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend

from . import _backend
from ._checks import autocast_inputs, check_float_tensor, check_like, check_probability, without_autocast
from .dropout import draw_seed, report_mask

# Score elements per chunk (b · np · rows · sk): 4M fp32 scores are 16 MiB, and a chunk holds a few
# tensors of that size (scores, probabilities, mask, their gradient) at once.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(chunk_size, b, heads, sq, sk):
    if chunk_size is not None:
        return max(1, min(int(chunk_size), sq))
    return max(1, min(sq, DEFAULT_CHUNK_ELEMENTS // max(1, b * heads * sk)))


class _Chunk:
    """Geometry of query rows [r0, r1): with a causal mask only keys [0, min(r1, sk)) are visible."""

    def __init__(self, r0, r1, sk, causal):
        self.r0, self.r1 = r0, r1
        self.cols = min(r1, sk) if causal else sk


def _grouped_rows(t, groups):
    """[b, np, rows, d] -> [b, ng, (np / ng) * rows, d]: a group's heads stacked along rows, so one
    matmul against the group's k or v serves them all (GQA without repeating k, v)."""
    b, heads, rows, d = t.shape
    return t.reshape(b, groups, heads // groups * rows, d)


def _probs(q_chunk, k, lse, chunk, scale, causal, acc):
    """Probabilities [b, ng, r·rows, cols] in acc from q rows, k (already in acc) and the rows'
    logsumexp (or, when lse is None, the logsumexp computed here). Returns (probs, lse
    [b, ng, r·rows, 1])."""
    groups = k.shape[1]
    q_g = _grouped_rows(q_chunk, groups).to(acc)
    scores = torch.matmul(q_g, k[:, :, :chunk.cols].transpose(-1, -2)).mul_(scale)
    if causal:
        rows = torch.arange(chunk.r0, chunk.r1, device=scores.device).view(-1, 1)
        hidden = torch.arange(chunk.cols, device=scores.device).view(1, -1) > rows
        # [rows, cols] repeated over the heads stacked in the row dimension
        hidden = hidden.repeat(q_chunk.shape[1] // groups, 1)
        scores.masked_fill_(hidden, float("-inf"))
    if lse is None:
        # forward: softmax normalises by the row sum, which rounds less than exp(s - lse)
        return torch.softmax(scores, dim=-1), torch.logsumexp(scores, dim=-1, keepdim=True)
    return scores.sub_(lse).exp_(), lse


def _keep_scale(kernels, seed, p, shape, chunk, acc, groups):
    """keep / (1 - p) for the chunk, [b, ng, r·rows, cols] in acc; the flat index of (b, h, i, j) is
    ((b·np + h)·sq + i)·sk + j."""
    b, heads, sq, sk = shape
    rows = chunk.r1 - chunk.r0
    keep = kernels.dropout_mask_block(seed, p, chunk.r0 * sk, b * heads, sq * sk, rows, sk, chunk.cols)
    return keep.view(b, groups, heads // groups * rows, chunk.cols).to(acc).mul_(1.0 / (1.0 - p))


class RecomputeAttentionFunction(torch.autograd.Function):
    """softmax(scale·q@kᵀ) → seeded dropout → @v, keeping q, k, v, the fp32 logsumexp and a seed."""

    @staticmethod
    @without_autocast
    def forward(ctx, q, k, v, p, scale, causal, chunk_size):
        b, heads, sq, hn = q.shape
        groups, sk = k.shape[1], k.shape[2]
        acc = _acc_dtype(q.dtype)
        kernels = _backend.ops("dropout", q.device)
        # without dropout nothing is drawn, so the generator is left where stock code leaves it
        seed = draw_seed(q.device) if p > 0.0 else torch.zeros(1, dtype=torch.int64, device=q.device)
        shape = (b, heads, sq, sk)
        rows = _chunk_rows(chunk_size, b, heads, sq, sk)
        out = torch.empty(b, heads, sq, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(b, groups, heads // groups, sq, dtype=acc, device=q.device)
        # converted once for all chunks (a no-op when the inputs are already in acc)
        k_acc, v_acc = k.to(acc), v.to(acc)
        for r0 in range(0, sq, rows):
            chunk = _Chunk(r0, min(r0 + rows, sq), sk, causal)
            probs, chunk_lse = _probs(q[:, :, chunk.r0:chunk.r1], k_acc, None, chunk, scale, causal, acc)
            if p > 0.0:
                probs.mul_(_keep_scale(kernels, seed, p, shape, chunk, acc, groups))
            o = torch.matmul(probs, v_acc[:, :, :chunk.cols])
            # explicit sizes: a -1 is ambiguous when another size is 0 (an empty batch)
            n = chunk.r1 - chunk.r0
            out[:, :, chunk.r0:chunk.r1] = o.view(b, heads, n, v.shape[-1])
            lse[..., chunk.r0:chunk.r1] = chunk_lse.view(b, groups, heads // groups, n)
        if p > 0.0:
            report_mask("recompute_attention", kernels, seed, shape, p)
        ctx.p, ctx.scale, ctx.causal, ctx.rows = p, scale, causal, rows
        ctx.save_for_backward(q, k, v, lse.view(b, heads, sq), seed)
        return out

    @staticmethod
    @once_differentiable  # backward's recomputation is not differentiable: raise on double backward
    @without_autocast
    def backward(ctx, grad_out):
        q, k, v, lse, seed = ctx.saved_tensors
        b, heads, sq, hn = q.shape
        groups, sk = k.shape[1], k.shape[2]
        r = heads // groups
        acc = _acc_dtype(q.dtype)
        kernels = _backend.ops("dropout", q.device)
        k_acc, v_acc = k.to(acc), v.to(acc)
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for r0 in range(0, sq, ctx.rows):
            chunk = _Chunk(r0, min(r0 + ctx.rows, sq), sk, ctx.causal)
            n, cols = chunk.r1 - chunk.r0, chunk.cols
            q_c = q[:, :, chunk.r0:chunk.r1]
            lse_c = lse[:, :, chunk.r0:chunk.r1].reshape(b, groups, r * n, 1)
            probs, _ = _probs(q_c, k_acc, lse_c, chunk, ctx.scale, ctx.causal, acc)
            do = _grouped_rows(grad_out[:, :, chunk.r0:chunk.r1], groups).to(acc)
            # gradient of the dropped probabilities, then through the dropout
            dprobs = torch.matmul(do, v_acc[:, :, :cols].transpose(-1, -2))
            if ctx.p > 0.0:
                keep = _keep_scale(kernels, seed, ctx.p, (b, heads, sq, sk), chunk, acc, groups)
                dprobs.mul_(keep)
                dv[:, :, :cols] += torch.matmul((probs * keep).transpose(-1, -2), do)
            else:
                dv[:, :, :cols] += torch.matmul(probs.transpose(-1, -2), do)
            # softmax backward on whole rows: dS = P ∘ (dP − rowsum(P ∘ dP)), times the scale
            dscores = dprobs.sub_((probs * dprobs).sum(-1, keepdim=True)).mul_(probs).mul_(ctx.scale)
            dq[:, :, chunk.r0:chunk.r1] = torch.matmul(dscores, k_acc[:, :, :cols]).view(b, heads, n, hn)
            dk[:, :, :cols] += torch.matmul(dscores.transpose(-1, -2), _grouped_rows(q_c, groups).to(acc))
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def sdpa_runs_fused_kernel(q, k, v, p, causal, scale, enable_gqa=False, mask=None):
    """True when F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
    is_causal=causal, scale=scale, enable_gqa=enable_gqa) picks a kernel that keeps nothing of size
    sq x sk (flash, memory-efficient, cuDNN), False when it would run its math kernel, which keeps
    the softmax and, with dropout, a mask of that size: the one check of every attention module
    that falls back to recompute_attention where SDPA would run its math kernel.

    Asks SDPA's own dispatcher (torch._fused_sdp_choice, the function SDPA calls), so the answer
    follows the installed torch, the enabled backends and the mask. That function is private:
    where it is missing, assume what torch 2.x does, fused on CUDA and, on CPU, fused only without
    dropout.
    """
    try:
        choice = torch._fused_sdp_choice(q, k, v, mask, p, causal, scale=scale, enable_gqa=enable_gqa)
    except (AttributeError, TypeError):
        return q.device.type == "cuda" or p == 0.0
    return choice not in (SDPBackend.MATH.value, SDPBackend.ERROR.value)


def recompute_attention(q, k, v, p=0.0, scale=None, causal=False, chunk_size=None):
    """dropout(softmax(scale · q @ kᵀ [causal])) @ v, keeping no tensor of size sq × sk.

    Args:
        q: [b, np, sq, hn] float (any strides: Megatron's q is a view of the QKV projection).
        k: [b, ng, sk, hn] of q's dtype (after autocast's conversion, below) and device, ng
            dividing np (GQA: head h uses group h // (np / ng)).
        v: [b, ng, sk, hv] of q's dtype and device.
        p: attention dropout probability in [0, 1); pass 0 in eval. One seed is drawn from the
            device's torch generator when p > 0 (none otherwise).
        scale: multiplier of q @ kᵀ; None is 1 / sqrt(hn), as SDPA.
        causal: query i sees keys j <= i (SDPA's is_causal, top-left aligned).
        chunk_size: query rows per chunk; None picks rows so that a chunk holds about
            DEFAULT_CHUNK_ELEMENTS scores. The result does not depend on it beyond fp rounding of
            the dk, dv sums (the dropout mask does not depend on it at all).

    Returns: [b, np, sq, hv] in q's dtype (in the autocast dtype under autocast, below). Scores,
    softmax statistics and all matmuls are computed in fp32 (fp64 for fp64 inputs).

    Under torch.autocast (enabled for q's device type) the op behaves as
    F.scaled_dot_product_attention does: float16/bfloat16/float32 q, k, v are first converted to the
    autocast dtype (float64 is left alone; k, v must then share q's dtype), the output is in that
    dtype, and the gradients come back in each input's own dtype through the conversion. The
    computation itself then runs with autocast off, in forward and backward alike (fp32 accumulation
    as above), so that the probabilities backward recomputes are those of the forward.

    Saves for backward: q, k, v (inputs, kept by reference: no new bytes when they are views of a
    tensor already kept, as Megatron's QKV output; under autocast with inputs of another dtype,
    the converted copies, as SDPA keeps them), the logsumexp [b, np, sq] (fp32; fp64 for fp64
    inputs) and an 8-byte seed. Not the output, not the probabilities, not a mask.

    Differentiable once: a double backward (create_graph=True, then backward through the
    gradient) raises a RuntimeError rather than returning a wrong second derivative.

    Raises: TypeError for a non-float q, k or v, or k, v of another dtype than q; ValueError for a
    wrong shape, k or v on another device, p outside [0, 1) or chunk_size < 1.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [b, heads, s, d], got shape {tuple(t.shape)}")
    check_probability("p", p)
    b, heads, sq, hn = q.shape
    if (k.shape[0] != b or k.shape[1] == 0 or heads % k.shape[1] or k.shape[3] != hn
            or v.shape[:3] != k.shape[:3]):
        raise ValueError(f"k must be [b={b}, ng, sk, hn={hn}] with ng dividing np={heads} and v [b, ng, sk, hv]; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    # converted before the dtype check: under autocast mixed input dtypes are fine, as for SDPA
    q, k, v = autocast_inputs(q.device.type, q, k, v)
    for name, t in (("k", k), ("v", v)):
        check_like(name, t, "q", q)
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of query rows, got {chunk_size}")
    scale = hn ** -0.5 if scale is None else float(scale)
    return RecomputeAttentionFunction.apply(q, k, v, float(p), scale, bool(causal), chunk_size)


__all__ = ["DEFAULT_CHUNK_ELEMENTS", "RecomputeAttentionFunction", "recompute_attention",
           "sdpa_runs_fused_kernel"]
