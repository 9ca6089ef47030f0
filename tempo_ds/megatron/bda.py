"""Tempo bias-dropout-add for TransformerLayer's self_attn_bda and mlp_bda.

Megatron builds the bda as a plain function f(training, fused) that returns
bda((x, bias), residual, prob) (megatron/core/fusions/fused_bias_dropout.py). The stock version
saves the dropout mask (one byte per element, or the scaled mask) for backward; Tempo's
bias_dropout_add saves only a seed and regenerates the mask in backward.

`fused` is accepted and ignored: Tempo's bias_dropout_add is a single fused op on every path, and
Megatron's jit-fused variant (torch.compile on torch >= 2.2) would only add compile time.
"""
from ..ops import bias_dropout_add
from .compat import bda_operands

__all__ = ["get_tempo_bias_dropout_add"]


def get_tempo_bias_dropout_add(training, fused):
    """Megatron's bda factory with Tempo's op.

    Args:
        training: dropout is applied when True (the layer passes self.training).
        fused: ignored (see the module docstring).

    Returns bda((x, bias), residual, prob) -> residual + dropout(x + bias, prob), where bias may be
    None. Saved for backward: a dropout seed (no mask, no input).
    """

    def _bias_dropout_add(x_with_bias, residual, prob):
        # As in the stock bda, mixed dtypes (AMP O1, fp32_residual_connection) are cast to one,
        # and which one depends on the megatron-core release (compat.bda_operands): the output
        # must have the dtype the stock layer hands to the next one.
        x, bias, residual = bda_operands(*x_with_bias, residual)
        return bias_dropout_add(x, bias, residual, prob, training)

    return _bias_dropout_add
