"""Megatron-core GPT-2 and BERT for the launch scripts, stock or Tempo as ds_config's "tempo" says.

build_model() picks the layer spec from the TempoConfig:
- everything on (the default of `"tempo": true`): tempo_ds.megatron's GPT/BERT Tempo specs;
- some kinds off, "attention": "stock", or the Tempo specs not importable: the stock local spec;
  tempo_ds.initialize then swaps the kinds that are on (tempo_ds.deepspeed.apply);
- off: the stock local spec.
Either way the parameters, their names and their initial values are the same, so stock and Tempo
runs with the same seed start from the same model and their checkpoints load into each other.
"""
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger("tempo_ds")


@dataclass(frozen=True)
class Size:
    num_layers: int
    hidden_size: int
    num_attention_heads: int


SIZES = {
    "gpt2": {
        "tiny": Size(2, 64, 4),
        "124m": Size(12, 768, 12),
        "345m": Size(24, 1024, 16),
        "774m": Size(36, 1280, 20),
        "1.5b": Size(48, 1600, 25),
    },
    "bert": {
        "tiny": Size(2, 64, 4),
        "base": Size(12, 768, 12),
        "large": Size(24, 1024, 16),
    },
}


def padded_vocab_size(vocab_size, tp, multiple=128):
    """Megatron splits the embedding rows over tensor-parallel ranks: pad to a multiple of
    `multiple` * tp, as Megatron-LM does."""
    unit = multiple * tp
    return -(-vocab_size // unit) * unit


def transformer_config(model, size, tp, dropout, bf16, on_cpu):
    """The TransformerConfig of `model` ("gpt2" or "bert") at `size` (a key of SIZES[model])."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    shape = SIZES[model][size]
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        ffn_hidden_size=4 * shape.hidden_size,
        tensor_model_parallel_size=tp,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        activation_func=F.gelu,
        layernorm_epsilon=1e-5,
        init_method_std=0.02,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        # Weights are drawn whole from the CPU generator and then split, so a TP=2 model equals
        # the TP=1 model of the same seed (the comparisons in tests/ rely on it). On GPU the
        # per-rank initialization is much faster for large models.
        use_cpu_initialization=on_cpu,
        # The fusions below need apex / Megatron extensions that are not installed, or (bias-GELU)
        # save the activation's input and defeat the Tempo GELU.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        apply_query_key_layer_scaling=False,
    )


def _uses_tempo_spec(tempo):
    return tempo.enabled and tempo.gelu and tempo.layernorm and tempo.dropout and tempo.attention != "stock"


def _specs(model, config, tempo):
    """(config, layer spec, model class, spec name)."""
    if _uses_tempo_spec(tempo):
        try:
            from tempo_ds import megatron as tm
            if model == "gpt2":
                from megatron.core.models.gpt import GPTModel
                config, spec = tm.tempo_gpt_model_spec(config, attention=tempo.attention)
                return config, spec, GPTModel, "tempo"
            config, spec = tm.tempo_bert_model_spec(config, attention=tempo.attention)
            return config, spec, tm.TempoBertModel, "tempo"
        except ImportError as err:
            logger.warning("tempo_ds: Tempo specs unavailable (%s); building the stock spec, "
                           "tempo_ds.initialize swaps what it can", err)
    if model == "gpt2":
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        return config, get_gpt_layer_local_spec(), GPTModel, "stock"
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.bert.bert_model import BertModel
    return config, bert_layer_local_spec, BertModel, "stock"


def build_model(model, size, seq_length, vocab_size, tp, tempo, dropout=0.1, bf16=False,
                on_cpu=True, nsp=True):
    """A Megatron GPT-2 ("gpt2") or BERT ("bert") model; parallel_state must be initialized.

    Args:
        model, size: "gpt2" with tiny/124m/345m/774m/1.5b, or "bert" with tiny/base/large.
        seq_length: maximum sequence length (learned absolute positions).
        vocab_size: tokenizer vocabulary, padded here for tensor parallelism.
        tp: tensor-parallel size (must equal parallel_state's).
        tempo: TempoConfig; chooses the layer spec (module docstring).
        dropout: hidden and attention dropout probability.
        bf16: build in bfloat16 (DeepSpeed's bf16 section must agree).
        on_cpu: initialize weights on CPU (TP-independent values; module docstring).
        nsp: BERT only: add the next-sentence-prediction head and token types.

    Returns (model, spec_name) with spec_name "tempo" or "stock".
    """
    if size not in SIZES[model]:
        raise ValueError(f"--size {size!r} for {model}: expected one of {', '.join(SIZES[model])}")
    config = transformer_config(model, size, tp, dropout, bf16, on_cpu)
    config, spec, cls, spec_name = _specs(model, config, tempo)
    vocab = padded_vocab_size(vocab_size, tp)
    if model == "gpt2":
        net = cls(config=config, transformer_layer_spec=spec, vocab_size=vocab,
                  max_sequence_length=seq_length, share_embeddings_and_output_weights=True,
                  position_embedding_type="learned_absolute")
    else:
        net = cls(config=config, num_tokentypes=2 if nsp else 0, transformer_layer_spec=spec,
                  vocab_size=vocab, max_sequence_length=seq_length, add_binary_head=nsp,
                  share_embeddings_and_output_weights=True)
    return net, spec_name
