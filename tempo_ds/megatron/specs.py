"""Megatron-core layer specs for GPT and BERT built from the Tempo modules.

    from tempo_ds.megatron import tempo_gpt_model_spec
    config, spec = tempo_gpt_model_spec(config)       # config and block spec, Tempo throughout
    model = GPTModel(config=config, transformer_layer_spec=spec, ...)

get_gpt_layer_tempo_spec() / get_bert_layer_tempo_spec() are the drop-in layer specs; they need a
config from apply_tempo_config(). What changes against megatron.core's local specs:

    submodule              stock (no apex, no TE)        Tempo                     saved for backward
    input/pre_mlp norm     torch.nn.LayerNorm / RMSNorm  TempoNorm                 output + stats, not input
    final norm (model spec) the same                     TempoNorm                 output + stats, not input
    core_attention         DotProductAttention           TempoCoreAttention        flash: nothing s x s;
                                                                                   tempo: softmax + a seed
    self_attn/mlp bda      get_bias_dropout_add          get_tempo_bias_dropout_add a seed, not a mask
    MLP activation         config.activation_func        Tempo GELU (via config)   output + 1 bit, not input

Every parameter keeps its name and shape, so a checkpoint of either spec loads into the other.

The activation is not part of a spec in megatron-core 0.16.1: MLP uses MLPSubmodules.activation_func
only with Transformer Engine, otherwise config.activation_func, and only when
bias_activation_fusion=False (the fused bias-GELU saves its input). apply_tempo_config() makes both
settings; TempoTransformerLayer, which the specs use, refuses a config without them, so they
cannot be forgotten.
"""
import dataclasses
import functools

import torch.nn.functional as F
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnBackend, AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import L2Norm
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from ..ops import gelu
from .bda import get_tempo_bias_dropout_add
from .core_attention import PATHS as ATTENTION_PATHS
from .core_attention import TempoCoreAttention
from .norm import TempoNorm

__all__ = [
    "ATTENTION_PATHS", "TempoBertModel", "TempoTransformerLayer", "apply_tempo_config",
    "get_bert_layer_tempo_spec", "get_gpt_layer_tempo_spec", "tempo_bert_model_spec",
    "tempo_gelu", "tempo_gelu_tanh", "tempo_gpt_model_spec",
]


# -- activation ---------------------------------------------------------------------------------
def tempo_gelu(x):
    """erf GELU that saves its output and one bit per element (tempo_ds.ops.gelu)."""
    return gelu(x, "none")


def tempo_gelu_tanh(x):
    """tanh GELU (Megatron's openai_gelu / fast_gelu) with Tempo's saving contract."""
    return gelu(x, "tanh")


def gelu_form(fn):
    """The Tempo GELU form ("none" for erf, "tanh") whose math is `fn`'s to rounding, or None.

    F.gelu (also as functools.partial with approximate=) and Megatron's openai_gelu, gelu_impl and
    fast_gelu (whose sqrt(2/pi) is exact to 1e-11) have one. Megatron's erf_gelu has none: it divides
    by 1.41421 instead of sqrt(2), which moves fp32 outputs by about 1e-6, beyond their rounding.
    """
    from megatron.core import activations
    from megatron.core.transformer import utils
    if fn is F.gelu:
        return "none"
    if isinstance(fn, functools.partial) and fn.func is F.gelu and not fn.args and set(fn.keywords) <= {"approximate"}:
        form = fn.keywords.get("approximate", "none")
        return form if form in ("none", "tanh") else None
    if fn in (utils.openai_gelu, utils.gelu_impl, activations.fast_gelu):
        return "tanh"
    return None


def _tempo_activation(config):
    act = config.activation_func
    if act in (tempo_gelu, tempo_gelu_tanh):
        return act
    # Megatron-LM's --openai-gelu sets activation_func=openai_gelu; older configs carry the flag.
    form = "tanh" if getattr(config, "openai_gelu", False) else gelu_form(act)
    if form is not None:
        return tempo_gelu_tanh if form == "tanh" else tempo_gelu
    raise NotImplementedError(
        f"apply_tempo_config: activation_func={getattr(act, '__name__', act)!r} has no Tempo "
        "kernel (GELU in erf or tanh form does; Megatron's erf_gelu rounds sqrt(2) to 1.41421, so it "
        "has none); use the stock spec's MLP for this model")


def apply_tempo_config(config):
    """A copy of `config` whose MLP runs the Tempo GELU.

    Sets activation_func to tempo_gelu (erf; F.gelu) or tempo_gelu_tanh (openai_gelu, fast_gelu,
    gelu_impl, approximate="tanh", or config.openai_gelu) and bias_activation_fusion to False.
    Idempotent; the argument is not modified. Raises NotImplementedError for activations other
    than GELU (and for Megatron's erf_gelu, see gelu_form).
    """
    activation = _tempo_activation(config)
    if config.activation_func is activation and not config.bias_activation_fusion:
        return config
    return dataclasses.replace(config, activation_func=activation, bias_activation_fusion=False)


def _require_tempo_config(config):
    if config.activation_func not in (tempo_gelu, tempo_gelu_tanh) or config.bias_activation_fusion:
        raise ValueError(
            "the Tempo layer spec needs config.activation_func set to the Tempo GELU and "
            "bias_activation_fusion=False; pass the config through "
            "tempo_ds.megatron.apply_tempo_config(config) (or use tempo_gpt_model_spec / "
            "tempo_bert_model_spec, which return both)")


class TempoTransformerLayer(TransformerLayer):
    """Megatron's TransformerLayer (same parameters, same forward) that is built only under a
    config from apply_tempo_config(), so the MLP cannot silently run the stock GELU.

    The check sits here rather than in an MLP subclass because TransformerLayer passes the
    tensor-parallel group only to modules that are exactly MLP.
    """

    def __init__(self, config, *args, **kwargs):
        _require_tempo_config(config)
        super().__init__(config, *args, **kwargs)


# -- specs --------------------------------------------------------------------------------------
def _core_attention(attention):
    if attention not in ATTENTION_PATHS:
        raise ValueError(f"attention={attention!r}: expected one of {ATTENTION_PATHS}")
    return ModuleSpec(module=TempoCoreAttention, params={"path": attention})


def _reject(feature, value):
    if value:
        raise NotImplementedError(
            f"the Tempo layer spec does not support {feature}; use megatron.core's own spec")


def _layer_spec(attn_mask_type, attention, qk_norm):
    return ModuleSpec(
        module=TempoTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=TempoNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=_core_attention(attention),
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_tempo_bias_dropout_add,
            pre_mlp_layernorm=TempoNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_tempo_bias_dropout_add,
            # Same mapping as the stock specs: distributed checkpoints interchange with TE specs.
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def _check_normalization(normalization):
    if normalization not in (None, "LayerNorm", "RMSNorm"):
        raise NotImplementedError(f"normalization={normalization!r}: Tempo has LayerNorm and RMSNorm")


def get_gpt_layer_tempo_spec(num_experts=None, moe_grouped_gemm=False, qk_layernorm=False,
                             multi_latent_attention=False, fp8=None, moe_use_legacy_grouped_gemm=False,
                             normalization=None, qk_l2_norm=False, use_kitchen=False,
                             attention="auto"):
    """Drop-in for megatron.core.models.gpt.gpt_layer_specs.get_gpt_layer_local_spec().

    Args follow the stock function. As there, the norm type is decided by config.normalization
    when the layer is built (normalization= is validated only). qk_layernorm uses TempoNorm for
    the query/key norms, qk_l2_norm the stock L2Norm (it has no parameters and saves what its few
    elementwise ops save). Not supported (NotImplementedError): num_experts (MoE),
    multi_latent_attention, use_kitchen, fp8.
        attention: TempoCoreAttention path, "auto" | "flash" | "tempo".

    Returns a ModuleSpec for TransformerLayer (causal self-attention).
    """
    _reject("num_experts (MoE)", num_experts)
    _reject("moe_grouped_gemm", moe_grouped_gemm)
    _reject("moe_use_legacy_grouped_gemm", moe_use_legacy_grouped_gemm)
    _reject("multi_latent_attention", multi_latent_attention)
    _reject("use_kitchen", use_kitchen)
    _reject("fp8 (use Transformer Engine)", fp8)
    _check_normalization(normalization)
    qk_norm = L2Norm if qk_l2_norm else (TempoNorm if qk_layernorm else IdentityOp)
    return _layer_spec(AttnMaskType.causal, attention, qk_norm)


def get_bert_layer_tempo_spec(normalization=None, attention="auto"):
    """Drop-in for megatron.core.models.bert.bert_layer_specs.bert_layer_local_spec.

    Build the model with TempoBertModel (or see its docstring for why stock BertModel refuses
    a core_attention other than DotProductAttention without Transformer Engine).
        normalization: validated only; config.normalization decides, as in the stock spec.
        attention: TempoCoreAttention path, "auto" | "tempo" ("flash" raises: BERT always passes
            its padding mask, which the flash path cannot apply).

    Returns a ModuleSpec for TransformerLayer (padding-mask self-attention).
    """
    _check_normalization(normalization)
    if attention == "flash":
        raise ValueError("attention='flash' cannot apply BERT's padding mask; use 'auto' or 'tempo'")
    return _layer_spec(AttnMaskType.padding, attention, IdentityOp)


def _block_spec(config, layer_spec):
    # A layer spec alone gets megatron's default final norm (WrappedTorchNorm, which refuses
    # sequence parallelism); the block spec puts TempoNorm there too. Same parameter names.
    layers = get_num_layers_to_build(config)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * layers, layer_norm=TempoNorm)


def tempo_gpt_model_spec(config, **spec_kwargs):
    """The config and transformer_layer_spec for GPTModel, Tempo throughout.

    Returns (apply_tempo_config(config), block spec): every layer is get_gpt_layer_tempo_spec(
    **spec_kwargs) and the final norm is TempoNorm, which also makes sequence parallelism
    possible (the stock local spec's torch norms refuse it).
    """
    config = apply_tempo_config(config)
    return config, _block_spec(config, get_gpt_layer_tempo_spec(**spec_kwargs))


def tempo_bert_model_spec(config, **spec_kwargs):
    """As tempo_gpt_model_spec, for TempoBertModel (layers from get_bert_layer_tempo_spec)."""
    config = apply_tempo_config(config)
    return config, _block_spec(config, get_bert_layer_tempo_spec(**spec_kwargs))


def _first_layer_spec(spec):
    if isinstance(spec, TransformerBlockSubmodules):
        return spec.layer_specs[0]
    if isinstance(spec.submodules, TransformerBlockSubmodules):
        return spec.submodules.layer_specs[0]
    return spec


def _is_tempo_attention(core_attention):
    module = getattr(core_attention, "module", core_attention)
    return isinstance(module, type) and issubclass(module, TempoCoreAttention)


class TempoBertModel(BertModel):
    """BertModel that accepts TempoCoreAttention. Same parameters, same forward.

    Stock BertModel compares the layer spec's core_attention with `== DotProductAttention`;
    anything else is taken for Transformer Engine and answered with a TE version check, which
    fails without TE. TempoCoreAttention takes DotProductAttention's [b, 1, s, s] boolean mask,
    so for it this class gives the local answer, "b1ss", under the same backend assertion.
    Every other spec goes through the stock check unchanged. A block spec (TransformerBlockSubmodules,
    as tempo_bert_model_spec returns) is accepted as well; the check reads its first layer.
    """

    def _sanity_check_attention_and_get_attn_mask_dimension(self):
        layer_spec = _first_layer_spec(self.transformer_layer_spec)
        core_attention = layer_spec.submodules.self_attention.submodules.core_attention
        if not _is_tempo_attention(core_attention):
            return super()._sanity_check_attention_and_get_attn_mask_dimension()
        if self.config.attention_backend not in (AttnBackend.local, AttnBackend.auto):
            raise ValueError(
                f"TempoCoreAttention runs with attention_backend local or auto, "
                f"not {self.config.attention_backend}")
        return "b1ss"
