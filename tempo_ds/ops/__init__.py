"""Functional API of tempo_ds: each op keeps less for backward than its stock PyTorch twin."""
from .attention import SoftmaxDropoutMatmulFunction, softmax_dropout_matmul
from .cross_entropy import LinearCrossEntropyFunction, linear_cross_entropy
from .dropout import (BiasDropoutAddFunction, DropoutFunction, bias_dropout_add, dropout, dropout_mask_hook,
                      record_dropout_masks)
from .flash import RecomputeAttentionFunction, recompute_attention
from .gelu import BiasGeluFunction, GeluFunction, bias_gelu, gelu
from .norm import LayerNormFunction, RMSNormFunction, layer_norm, rms_norm

__all__ = [
    "BiasDropoutAddFunction", "BiasGeluFunction", "DropoutFunction", "GeluFunction", "LayerNormFunction",
    "RMSNormFunction",
    "RecomputeAttentionFunction", "SoftmaxDropoutMatmulFunction", "bias_dropout_add", "bias_gelu", "dropout",
    "dropout_mask_hook", "gelu", "LinearCrossEntropyFunction", "linear_cross_entropy",
    "layer_norm", "recompute_attention", "record_dropout_masks", "rms_norm", "softmax_dropout_matmul",
]
