"""tempo_ds: Tempo (NeurIPS 2022) for DeepSpeed and Megatron-core.

Same model, less activation memory: in-place GELU, output-saving LayerNorm/RMSNorm, and dropout
and attention that keep no masks.
"""
__version__ = "0.1.0"
