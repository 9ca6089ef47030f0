"""Megatron-core layer specs for GPT and BERT built from the Tempo modules.

    from tempo_ds.megatron import get_gpt_layer_tempo_spec
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_tempo_spec(), ...)

get_gpt_layer_tempo_spec() / get_bert_layer_tempo_spec() are drop-ins for megatron.core's
get_gpt_layer_local_spec() / bert_layer_local_spec: they take the config a job already has (no
rewrite) and take no required argument, so Megatron-LM's `--spec tempo_ds.megatron
get_gpt_layer_tempo_spec` works. tempo_gpt_model_spec / tempo_bert_model_spec give the block spec
with the Tempo final norm too. What changes against the local specs:

    submodule              stock (no apex, no TE)        Tempo                     saved for backward
    input/pre_mlp norm     torch.nn.LayerNorm / RMSNorm  TempoNorm                 output + stats, not input
    final norm (model spec) the same                     TempoNorm                 output + stats, not input
    core_attention         DotProductAttention           TempoCoreAttention        flash: nothing s x s;
                                                                                   tempo: softmax + a seed
    self_attn/mlp bda      get_bias_dropout_add          get_tempo_bias_dropout_add a seed, not a mask
    MLP activation         bias_gelu_impl (fusion on)    ops.bias_gelu (TempoMLP)  output + 1 bit, not
                           activation_func (fusion off)  TempoGELU, same form      x + b (nor x)

Every parameter keeps its name and shape, so a checkpoint of either spec loads into the other.

The activation is not part of a spec in megatron-core (MLP takes config.activation_func, or
bias_gelu_impl under bias_activation_fusion), so TempoTransformerLayer installs it once the stock
MLP is built (tempo_ds.megatron.mlp, shared with the swap of a stock model). An activation with no
Tempo form keeps the stock MLP and is reported, never refused.
"""
import dataclasses
import warnings

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

from .bda import get_tempo_bias_dropout_add
from .core_attention import PATHS as ATTENTION_PATHS
from .core_attention import TempoCoreAttention
from .mlp import install_tempo_activation, mlp_activation, tempo_gelu, tempo_gelu_tanh
from .norm import TempoNorm

__all__ = [
    "ATTENTION_PATHS", "TempoBertModel", "TempoTransformerLayer", "apply_tempo_config",
    "get_bert_layer_tempo_spec", "get_gpt_layer_tempo_spec", "tempo_bert_model_spec",
    "tempo_gelu", "tempo_gelu_tanh", "tempo_gpt_model_spec",
]


# -- activation ---------------------------------------------------------------------------------
def apply_tempo_config(config):
    """A copy of `config` whose MLP activation_func is the Tempo GELU of the form stock computes.

    Optional: the Tempo specs need no config rewrite (TempoTransformerLayer installs the Tempo
    activation itself, fused with the bias where stock fuses). This is for models that keep the
    stock MLP class, which then calls config.activation_func. Sets activation_func to tempo_gelu
    (F.gelu) or tempo_gelu_tanh (openai_gelu, fast_gelu, gelu_impl, approximate="tanh",
    config.openai_gelu, and F.gelu under bias_activation_fusion, whose bias_gelu_impl is the tanh
    form) and bias_activation_fusion to False (bias-add and GELU then run as two ops). Idempotent;
    the argument is not modified. Raises NotImplementedError, with the reason, for an activation
    with no Tempo form (see mlp_activation).
    """
    if config.activation_func in (tempo_gelu, tempo_gelu_tanh) and not config.bias_activation_fusion:
        return config
    plan = mlp_activation(config, config.activation_func)
    if plan.reason is not None:
        raise NotImplementedError(f"apply_tempo_config: {plan.reason}; use the stock spec's MLP for this model")
    activation = tempo_gelu_tanh if plan.form == "tanh" else tempo_gelu
    return dataclasses.replace(config, activation_func=activation, bias_activation_fusion=False)


class TempoTransformerLayer(TransformerLayer):
    """Megatron's TransformerLayer (same parameters, same forward) whose MLP runs the Tempo
    activation of what the stock MLP computes under the config it is given (tempo_ds.megatron.mlp):
    the fused Tempo bias-GELU under bias_activation_fusion, the Tempo GELU of the same form
    otherwise. An activation with no Tempo form (GLU/SwiGLU, squared ReLU, erf_gelu) keeps the
    stock MLP: the reason is in `tempo_mlp_left_stock` and in a warning, nothing is refused.

    The MLP is built as a stock MLP and converted after, because TransformerLayer passes the
    tensor-parallel group only to modules that are exactly MLP.
    """

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.tempo_mlp_left_stock = install_tempo_activation(self.mlp) if isinstance(self.mlp, MLP) else None
        if self.tempo_mlp_left_stock is not None:
            # one warning per reason and call site (Python's default filter), not one per layer
            warnings.warn(f"tempo_ds: the MLP keeps its stock activation: {self.tempo_mlp_left_stock}",
                          UserWarning, stacklevel=2)


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

    Returns (config, block spec): `config` as given (the layers install the Tempo activation
    themselves; apply_tempo_config is optional), every layer get_gpt_layer_tempo_spec(
    **spec_kwargs), and the final norm TempoNorm, which also makes sequence parallelism possible
    (the stock local spec's torch norms refuse it).
    """
    return config, _block_spec(config, get_gpt_layer_tempo_spec(**spec_kwargs))


def tempo_bert_model_spec(config, **spec_kwargs):
    """As tempo_gpt_model_spec, for TempoBertModel (layers from get_bert_layer_tempo_spec)."""
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
    It has the fused loss head (tempo_ds.megatron.loss_head): with lm_labels, the MLM head runs at
    the counted positions only and no [tokens, V] logits are built.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.post_process:
            from .loss_head import install_loss_head
            install_loss_head(self)

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
