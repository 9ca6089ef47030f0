"""The "tempo" attention implementation of Hugging Face transformers (AttentionInterface).

`tempo_attention_forward` has the signature of transformers' sdpa_attention_forward: it receives
the attention module, q, k, v as [b, heads, s, d], the mask that transformers built for it (the
"tempo" entry of AttentionMaskInterface is sdpa_mask: bool, True = attend, or None when `is_causal`
or no padding says it all), `dropout` (the module's p in training, 0 in eval) and `scaling`, and
returns ([b, s, heads, d], None). Each module runs the path its `tempo_attention_path` names (set
by the swap row; "auto" when transformers was asked for attn_implementation="tempo" directly):

  flash  keeps nothing of size s x s: F.scaled_dot_product_attention when it will run a fused
         kernel for these inputs and this mask (flash / memory-efficient / cuDNN on GPU, the CPU
         flash kernel without dropout), whose dropout comes from the Philox state, which
         torch.utils.checkpoint restores, so a recomputation draws the same mask; else, without a
         mask, tempo_ds.ops.recompute_attention (q, k, v, an fp32 logsumexp and a seed); with a
         padding mask there, the tempo path below (recompute_attention takes no mask).
  tempo  tempo_ds.ops.softmax_dropout_matmul on q @ kᵀ: keeps the softmax output in the
         activation dtype and an 8-byte seed; any padding or causal mask.
  auto   flash where a fused SDPA kernel runs or there is no mask, else tempo.

`module.tempo_last_path` says which ran ("flash:sdpa", "flash:recompute" or "tempo").

What it does not take is refused with a message naming it: head_mask (transformers 4.x), softcap,
sliding windows, attention sinks, position bias. output_attentions=True needs the probabilities,
which no path keeps: that call runs the model's eager attention, with a one-line warning.
"""
import importlib
import logging

import torch
import torch.nn.functional as F

from ..ops.attention import softmax_dropout_matmul
from ..ops.flash import recompute_attention, sdpa_runs_fused_kernel

logger = logging.getLogger("tempo_ds")

NAME = "tempo"
PATHS = ("auto", "flash", "tempo")
# keyword arguments of the attention interface that change the function computed: refused
UNSUPPORTED = {"head_mask": "head_mask (scaling heads by a mask)", "softcap": "softcap (logit soft-capping)",
               "sliding_window": "sliding-window attention", "s_aux": "attention sinks (s_aux)",
               "position_bias": "an additive position bias"}
_warned = set()
# id(config) -> (weak reference to it, the implementation it had before the swap set "tempo"): an
# attention module of that config that the swap's filter kept stock (no tempo_attention_path) runs it
STOCK_IMPLEMENTATION = {}


def _masked_out(mask, dtype):
    """The bool "True = masked out" form of a transformers mask for softmax_dropout_matmul: a bool
    mask (True = attend) is inverted; an additive float mask (transformers 4.x eager masks) must
    hold only 0 and large negatives (one host check), anything else is a bias the op cannot add."""
    if mask.dtype == torch.bool:
        return ~mask
    hidden = mask <= torch.finfo(mask.dtype).min / 2
    if not torch.all(hidden | (mask == 0)):
        raise ValueError('attn_implementation="tempo" on its tempo path takes a padding or causal mask; this '
                         'float mask adds a bias (values other than 0 and the dtype minimum): use "tempo.attention": '
                         '"flash" or attn_implementation="sdpa"')
    return hidden


def _eager(module):
    """The eager attention function of the module's own modeling file (BERT's and GPT-2's differ)."""
    owner = importlib.import_module(type(module).__module__)
    fn = getattr(owner, "eager_attention_forward", None)
    if fn is None:
        raise NotImplementedError(f"output_attentions=True: {type(module).__name__}'s modeling file has no "
                                  "eager_attention_forward to fall back to")
    return fn


def warn_once(key, message):
    """Log `message` at WARNING on the tempo_ds logger the first time `key` is seen (process-wide)."""
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def _stock_implementation(module):
    """The attention function `module` ran before a swap that kept it stock switched its config to
    "tempo", or None (a module the swap converted, or a model asked for "tempo" directly)."""
    config = getattr(module, "config", None)
    ref, name = STOCK_IMPLEMENTATION.get(id(config), (None, None))
    if ref is None or ref() is not config:
        return None
    if name in (None, "eager"):
        return _eager(module)
    from transformers import AttentionInterface
    return AttentionInterface()[name]


def _repeat_kv(t, groups):
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def run_path(path, query, key, value, mask, p, scale, causal):
    """(output [b, heads, sq, d], the path that ran) for q, k, v [b, heads, s, d] (the same number
    of heads), mask None or as transformers gives it to SDPA, causal only when mask is None."""
    if path != "tempo":
        if sdpa_runs_fused_kernel(query, key, value, p, causal, scale, mask=mask):
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                  scale=scale), "flash:sdpa"
        if mask is None:
            return recompute_attention(query, key, value, p=p, scale=scale, causal=causal), "flash:recompute"
    # the scores GEMM in the activation dtype, as the eager path; softmax in fp32 inside the op
    scores = torch.matmul(query, key.transpose(-1, -2))
    hidden = None if mask is None else _masked_out(mask, scores.dtype)
    out = softmax_dropout_matmul(scores, value, mask=hidden, p=p, scale=scale, causal=causal)
    return out, "tempo"


def tempo_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):
    """transformers AttentionInterface function "tempo" (see the module docstring).

    Args: module (the attention module; its `tempo_attention_path`, else "auto"), query
    [b, heads, sq, d], key/value [b, kv_heads, sk, d], attention_mask (None, bool True = attend, or
    additive float), dropout (probability, 0 in eval), scaling (None: 1/sqrt(d)), is_causal (None:
    module.is_causal). Returns (attn_output [b, sq, heads, d], None).

    Saves for backward: on flash:sdpa what SDPA's fused kernel saves (q, k, v, output, logsumexp,
    Philox state); on flash:recompute q, k, v, the logsumexp and a seed; on tempo the softmax output
    and a seed (plus the q, k the scores GEMM keeps and v). No dropout mask on any path.

    Raises NotImplementedError naming a feature it does not take (head_mask, softcap, sliding
    window, sinks, position bias); ValueError for an unknown path or a float mask holding a bias on
    the tempo path.
    """
    for name, what in UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f'attn_implementation="tempo" does not support {what} (got {name}=); '
                                      'use attn_implementation="eager" for this model or call')
    if kwargs.get("output_attentions"):
        warn_once("output_attentions", 'tempo_ds: output_attentions=True needs the attention probabilities, which '
                                        '"tempo" attention does not keep: this call runs eager attention')
        return _eager(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    path = getattr(module, "tempo_attention_path", None)
    if path is None:
        stock = _stock_implementation(module)
        if stock is not None:
            return stock(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                         is_causal=is_causal, **kwargs)
        path = "auto"
    if path not in PATHS:
        raise ValueError(f"{type(module).__name__}.tempo_attention_path must be one of {PATHS}, got {path!r}")
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    sq, sk = query.shape[2], key.shape[2]
    is_causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    # as SDPA in transformers: the flag only without a mask, and not for one query row (decoding)
    causal = bool(is_causal) and attention_mask is None and sq > 1
    if causal and sq != sk:
        raise NotImplementedError(f'attn_implementation="tempo" takes causal attention with sq == sk only (no '
                                  f'cache of past keys), got sq={sq}, sk={sk}')
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[..., :sk]
    p = float(dropout) if module.training else 0.0
    out, ran = run_path(path, query, key, value, attention_mask, p, scaling, causal)
    module.tempo_last_path = ran
    return out.transpose(1, 2).contiguous(), None


def register():
    """Register "tempo" with transformers' AttentionInterface and AttentionMaskInterface (sdpa's
    bool masks, None where `is_causal` or no padding suffices). Idempotent."""
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, tempo_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return  # transformers before 4.53 builds masks per model, from _attn_implementation's kind
    AttentionMaskInterface.register(NAME, sdpa_mask)


__all__ = ["NAME", "PATHS", "register", "run_path", "tempo_attention_forward", "warn_once"]
