"""tempo_ds: Tempo (NeurIPS 2022) for DeepSpeed and Megatron-core.

Same model, less activation memory: in-place GELU, output-saving LayerNorm/RMSNorm, and dropout
and attention that keep no masks.
"""
__version__ = "0.1.0"


def __getattr__(name):
    # `import tempo_ds` stays light: DeepSpeed is imported on first use of tempo_ds.initialize.
    if name == "initialize":
        from .deepspeed.engine import initialize
        return initialize
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
