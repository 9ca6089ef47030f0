"""PyTorch versions of the dropout family's kernels, with the kernels' exact signatures.

The Philox4x32-10 generator below is bit-identical to csrc/includes/tempo/philox.h, so the
fallback draws the same masks as the compiled CPU and CUDA builds for the same seed. Integer
math runs on int64 tensors: a 32x32-bit product is split into 16-bit halves so that nothing
overflows 63 bits.
"""
import math

import torch

from .reference import compute_dtype

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
MASKED_SCORE = -10000.0
_U32 = 0xFFFFFFFF


def _mulhilo(m, x):
    """(high, low) 32-bit words of the 64-bit product of the constant m and uint32 tensor x."""
    a = m * (x & 0xFFFF)                 # < 2^48
    b = m * (x >> 16)                    # < 2^48
    low_sum = a + ((b & 0xFFFF) << 16)   # < 2^49
    return (b >> 16) + (low_sum >> 32), low_sum & _U32


def philox4x32_10(counter, key):
    """Four uint32 words (as int64 [n, 4]) for int64 counters [n] (< 2^63) and a 64-bit key."""
    c0, c1 = counter & _U32, (counter >> 32) & _U32
    c2, c3 = torch.zeros_like(counter), torch.zeros_like(counter)
    k0, k1 = key & _U32, (key >> 32) & _U32
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _U32, (k1 + PHILOX_W1) & _U32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def dropout_threshold(p):
    """The 32-bit cut of tempo::dropout_threshold: keep iff word >= cut."""
    return min(math.ceil(p * 4294967296.0), _U32)


def keep_mask(seed, n, p, device=None):
    """bool [n]: element i is kept iff word (i & 3) of philox(i >> 2, seed) >= the cut."""
    key = int(seed.item()) & 0xFFFFFFFFFFFFFFFF if isinstance(seed, torch.Tensor) else int(seed)
    device = seed.device if device is None and isinstance(seed, torch.Tensor) else device
    groups = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    words = philox4x32_10(groups, key).reshape(-1)[:n]
    return words >= dropout_threshold(p)


def _keep_scale(seed, n, p, acc, device):
    """Per-element multiplier keep / (1 - p) in the compute dtype (0 where dropped)."""
    keep = keep_mask(seed, n, p, device)
    return keep.to(acc) * (1.0 / (1.0 - p))


def dropout_fwd(x, seed, p):
    acc = compute_dtype(x.dtype)
    return (x.to(acc) * _keep_scale(seed, x.numel(), p, acc, x.device).view(x.shape)).to(x.dtype)


def dropout_mask(seed, n, p):
    return keep_mask(seed, n, p)


def dropout_mask_block(seed, p, offset, outer, outer_stride, rows, row_stride, cols):
    """bool [outer, rows, cols]: entry (o, r, c) is element offset + o*outer_stride + r*row_stride + c
    of keep_mask(seed, ., p)."""
    device = seed.device
    index = (offset + torch.arange(outer, dtype=torch.int64, device=device).view(-1, 1, 1) * outer_stride
             + torch.arange(rows, dtype=torch.int64, device=device).view(1, -1, 1) * row_stride
             + torch.arange(cols, dtype=torch.int64, device=device).view(1, 1, -1))
    # one Philox call per distinct group, then each element picks its word
    groups, inverse = torch.unique(index >> 2, return_inverse=True)
    key = int(seed.item()) & 0xFFFFFFFFFFFFFFFF
    words = philox4x32_10(groups, key)[inverse, index & 3]
    return words >= dropout_threshold(p)


def bias_dropout_add_fwd(x, bias, residual, seed, p):
    acc = compute_dtype(x.dtype)
    v = (x.to(acc).view(-1, bias.numel()) + bias.to(acc)).view(x.shape) if bias is not None else x.to(acc)
    keep = _keep_scale(seed, x.numel(), p, acc, x.device).view(x.shape)
    return (residual.to(acc).view(x.shape) + v * keep).to(x.dtype)  # x's shape, not a view


def mask_of(mask, causal, shape, device):
    """bool [B, sq, sk] (True = masked) from a [b, heads, sq, sk] mask view and the causal flag."""
    total, sq, sk = shape
    out = torch.zeros(shape, dtype=torch.bool, device=device)
    if mask is not None:
        out = out | mask.reshape(total, sq, sk)
    if causal:
        out = out | torch.ones(sq, sk, dtype=torch.bool, device=device).triu(1)
    return out


def softmax_dropout_fwd(scores, mask, causal, scale, seed, p, keep_fp32):
    acc = compute_dtype(scores.dtype)
    masked = mask_of(mask, causal, scores.shape, scores.device)
    x = (scores.to(acc) * scale).masked_fill(masked, MASKED_SCORE)
    y = torch.softmax(x, dim=-1)
    half = scores.dtype in (torch.float16, torch.bfloat16)
    probs = y.to(torch.float32 if keep_fp32 and half else scores.dtype)
    if p > 0.0 or (keep_fp32 and half):
        return [probs, softmax_dropout_regen(probs, seed, p, scores.dtype)]
    return [probs, probs]


def softmax_dropout_regen(probs, seed, p, out_dtype):
    acc = compute_dtype(out_dtype)
    y = probs.to(out_dtype).to(acc)
    return (y * _keep_scale(seed, probs.numel(), p, acc, probs.device).view(probs.shape)).to(out_dtype)


def softmax_dropout_bwd(grad, probs, mask, causal, scale, seed, p, out_dtype):
    acc = compute_dtype(grad.dtype)
    gp = grad.to(acc) * _keep_scale(seed, grad.numel(), p, acc, grad.device).view(grad.shape)
    y = probs.to(acc)
    dot = (gp * y).sum(dim=-1, keepdim=True)
    gs = scale * y * (gp - dot)
    return gs.masked_fill(mask_of(mask, causal, grad.shape, grad.device), 0.0).to(out_dtype)

