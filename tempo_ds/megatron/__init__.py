"""Megatron-core layer specs for GPT and BERT built from the Tempo modules, and a CPU switch.

    from tempo_ds.megatron import tempo_gpt_model_spec
    config, layer_spec = tempo_gpt_model_spec(config)
    model = GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=..., ...)

tempo_ds.megatron.swaps holds the Megatron rows of the one swap mechanism (tempo_ds.modules.swap),
which swaps a model built from megatron.core's own specs; it registers them when imported, which
tempo_ds.modules.swap does by itself once megatron.core is imported.

Names are imported on first use, so `import tempo_ds.megatron` does not import megatron.core
(several seconds) and cpu_patches() can be entered before it.
"""
import importlib

# public name -> submodule that defines it
_EXPORTS = {
    "cpu_patches": "cpu",
    "is_cpu_enabled": "cpu",
    "get_gpt_layer_tempo_spec": "specs",
    "get_bert_layer_tempo_spec": "specs",
    "apply_tempo_config": "specs",
    "tempo_gpt_model_spec": "specs",
    "tempo_bert_model_spec": "specs",
    "tempo_gelu": "specs",
    "tempo_gelu_tanh": "specs",
    "TempoTransformerLayer": "specs",
    "TempoMLP": "mlp",
    "mlp_activation": "mlp",
    "TempoBertModel": "specs",
    "TempoGPTModel": "loss_head",
    "install_loss_head": "loss_head",
    "TempoNorm": "norm",
    "MegatronTempoLayerNorm": "norm",
    "MegatronTempoRMSNorm": "norm",
    "get_tempo_bias_dropout_add": "bda",
    "allreduce_sequence_parallel_grads": "parallel",
    "free_local_port": "parallel",
    "TempoCoreAttention": "core_attention",
    "attention_from_stock": "swaps",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
