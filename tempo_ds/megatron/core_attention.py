"""TempoCoreAttention: a Megatron-core `core_attention` module that keeps no s x s dropout state.

It takes DotProductAttention's constructor and forward, and runs one of two paths:

  flash  keeps nothing of size s x s, by one of two means (last_path says which ran):
         "flash:sdpa"       torch.nn.functional.scaled_dot_product_attention when it will run a
                            fused kernel (flash / memory-efficient / cuDNN on GPU, the CPU flash
                            kernel with dropout off): q, k, v, the output and a [b, np, sq] fp32
                            logsumexp, dropout from the kernel's Philox state. Autograd node
                            ScaledDotProduct{Flash,Efficient,...}AttentionBackward.
         "flash:recompute"  tempo_ds.ops.recompute_attention wherever SDPA would fall back to its
                            math kernel (CPU with dropout on; unsupported shapes or dtypes on GPU),
                            which keeps the s x s softmax and a dropout mask: q, k, v, the fp32
                            logsumexp and a seed, the dropout mask regenerated from the seed by
                            Tempo's Philox kernels. Autograd node RecomputeAttentionFunctionBackward.
  tempo  tempo_ds.ops.softmax_dropout_matmul: Megatron's exact unfused arithmetic (scores from
         baddbmm in the activation dtype, fp32 scale-mask-softmax with the -10000 fill, bf16
         probabilities into @v), keeping the softmax output in the activation dtype (2 bytes per
         score in bf16) and a seed. Autograd node: SoftmaxDropoutMatmulFunctionBackward.

`path` (constructor kwarg, else `config.tempo_attention_path`, else "auto") chooses. "auto" takes
flash when it computes the same function as DotProductAttention's unfused softmax: no
attention_bias, and either no mask or, with attn_mask_type == causal, the causal mask itself
(checked once per mask tensor, is_causal_mask). Any other mask goes to the tempo path, which
honours it exactly as the unfused DotProductAttention does (fully masked rows included: uniform,
not NaN), so a document mask under the causal type is applied, not replaced by the causal one.

Dropout uses config.attention_dropout (or the attention_dropout argument) in training and none in
eval. Like DotProductAttention, the draw happens inside Megatron's RNG tracker fork unless sequence
parallelism is on; the fork is skipped when no dropout runs, so dropout-free use needs no tracker.
"""
import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from ..ops.attention import softmax_dropout_matmul
# imported by name: tempo_ds.plan.walk patches core_attention.sdpa_runs_fused_kernel for its meta walk
from ..ops.flash import recompute_attention, sdpa_runs_fused_kernel

PATHS = ("auto", "flash", "tempo")


_CAUSAL_VERDICT = "_tempo_is_causal"  # attribute of a mask tensor: (version, sq, sk, verdict)


def is_causal_mask(mask, sq, sk):
    """True when `mask` (bool, True = masked out, broadcastable to [b, np, sq, sk]) masks exactly
    the keys after each query, bottom-right aligned (for sq == 1: none), i.e. what is_causal does.

    Comparing costs a device-to-host synchronisation, so the verdict is kept on the mask tensor
    for its current version: one check per mask, not per layer (Megatron passes the same mask to
    every layer). During a CUDA graph capture, where no synchronisation may happen, an unchecked
    mask counts as not causal (the tempo path applies it exactly)."""
    kept = getattr(mask, _CAUSAL_VERDICT, None)
    state = (mask._version, sq, sk)
    if kept is not None and kept[:3] == state:
        return kept[3]
    if mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return False  # no synchronisation inside a CUDA graph capture: the tempo path honours any mask
    verdict = False
    if mask.dtype == torch.bool and mask.dim() >= 2 and tuple(mask.shape[-2:]) == (sq, sk):
        expected = torch.ones(sq, sk, dtype=torch.bool, device=mask.device).triu(sk - sq + 1)
        verdict = torch.equal(mask, expected.expand_as(mask))
    try:
        setattr(mask, _CAUSAL_VERDICT, (*state, verdict))
    except (AttributeError, TypeError):
        pass  # a tensor type that takes no attributes is checked on every call
    return verdict


class TempoCoreAttention(DotProductAttention):
    """DotProductAttention without the s x s dropout mask and dropout output (see module docstring).

    Subclassing keeps Megatron's constructor checks, per-partition sizes and sharded_state_dict,
    and lets code that tests `issubclass(..., DotProductAttention)` treat it as local attention.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, path=None):
        super().__init__(config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                         attention_type=attention_type, attention_dropout=attention_dropout,
                         softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        path = path if path is not None else getattr(config, "tempo_attention_path", "auto")
        if path not in PATHS:
            raise ValueError(f"path must be one of {', '.join(map(repr, PATHS))}, got {path!r}")
        if config.softmax_type != "vanilla":
            raise NotImplementedError(f"TempoCoreAttention supports softmax_type='vanilla', got {config.softmax_type!r}")
        if self.scale_mask_softmax.window_size is not None:
            raise NotImplementedError("TempoCoreAttention does not support sliding-window attention")
        self.path = path
        self.last_path = None
        # The stock submodules are replaced by what they configure; removing them keeps a later
        # swap_modules from converting modules that never run.
        self.dropout_p = float(self.attention_dropout.p)
        self.qk_coeff = self.scale_mask_softmax.scale  # None, or layer_number with layer scaling
        del self.attention_dropout
        del self.scale_mask_softmax
        # Keep the softmax output in fp32 (4 bytes per score) instead of the activation dtype.
        self.keep_fp32_softmax = bool(getattr(config, "tempo_softmax_keep_fp32", False))

    def extra_repr(self):
        return (f"path={self.path!r}, last_path={self.last_path!r}, dropout={self.dropout_p}, "
                f"attn_mask_type={self.attn_mask_type.name}, heads={self.num_attention_heads_per_partition}, "
                f"groups={self.num_query_groups_per_partition}")

    def _choose_path(self, mask_type, attention_mask, attention_bias, sq, sk):
        if self.path == "tempo":
            return "tempo"
        causal = mask_type == AttnMaskType.causal
        flash_ok = (attention_bias is None and (not causal or sq in (1, sk))
                    and (attention_mask is None or (causal and is_causal_mask(attention_mask, sq, sk))))
        if self.path == "flash" and not flash_ok:
            raise ValueError("path='flash' needs no attention_bias, and either no attention_mask or "
                             "attn_mask_type=causal with the causal mask itself (sq == sk, or sq == 1); "
                             "use path='tempo' or 'auto'")
        return "flash" if flash_ok else "tempo"

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """q: [sq, b, np, hn]; k, v: [sk, b, ng, hn]; attention_mask: bool, True = masked out.
        Returns [sq, b, np * hn]."""
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences need TEDotProductAttention")
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported (nor by DotProductAttention)")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b, heads, hn = query.shape
        sk, groups = key.shape[0], key.shape[2]
        if key.shape != (sk, b, groups, hn) or value.shape[:3] != (sk, b, groups) or heads % groups:
            raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} "
                             "must be [s, b, heads, hn] with key/value heads dividing query heads")
        p = self.dropout_p if self.training else 0.0
        path = self._choose_path(mask_type, attention_mask, attention_bias, sq, sk)
        self.last_path = path  # refined to "flash:sdpa" / "flash:recompute" by _flash
        fork = (tensor_parallel.get_cuda_rng_tracker().fork() if p > 0.0 and not self.config.sequence_parallel
                else contextlib.nullcontext())
        with fork:
            if path == "flash":
                context = self._flash(query, key, value, mask_type, p)
            else:
                context = self._tempo(query, key, value, attention_mask, mask_type, p)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).contiguous().view(sq, b, heads * value.shape[-1])

    def _flash(self, query, key, value, mask_type, p):
        sq = query.shape[0]
        # DotProductAttention divides softmax_scale by the layer-scaling coefficient and multiplies
        # it back in fp32 inside the softmax: the net scale is the same.
        scale = self.softmax_scale * (self.qk_coeff if self.qk_coeff is not None else 1.0)
        causal = mask_type == AttnMaskType.causal and sq > 1
        gqa = query.shape[2] != key.shape[2]
        # [s, b, heads, hn] -> [b, heads, s, hn]: views of the QKV projection output, no copy
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if sdpa_runs_fused_kernel(q, k, v, p, causal, scale, gqa):
            self.last_path = "flash:sdpa"
            grouped = {"enable_gqa": True} if gqa else {}
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal, scale=scale, **grouped)
        self.last_path = "flash:recompute"
        return recompute_attention(q, k, v, p=p, scale=scale, causal=causal)

    def _tempo(self, query, key, value, attention_mask, mask_type, p):
        sq, b, heads, hn = query.shape
        sk, groups = key.shape[0], key.shape[2]
        if heads != groups:
            # as DotProductAttention: the scores GEMM needs a key per head; v stays grouped (the op
            # broadcasts a group's v over its heads without a copy)
            key = key.repeat_interleave(heads // groups, dim=2)
        # the scores GEMM of DotProductAttention, zero-copy views of [s, b, np, hn]
        q3 = query.reshape(sq, b * heads, hn).transpose(0, 1)
        k3 = key.reshape(sk, b * heads, hn).permute(1, 2, 0)
        unused = torch.empty((), dtype=query.dtype, device=query.device)
        scores = torch.baddbmm(unused, q3, k3, beta=0.0, alpha=self.softmax_scale).view(b, heads, sq, sk)
        causal = attention_mask is None and mask_type == AttnMaskType.causal and sq > 1
        return softmax_dropout_matmul(scores, value.permute(1, 2, 0, 3), mask=attention_mask, p=p,
                                      scale=self.qk_coeff, softmax_in_fp32=self.keep_fp32_softmax, causal=causal)


__all__ = ["PATHS", "TempoCoreAttention", "is_causal_mask", "sdpa_runs_fused_kernel"]
