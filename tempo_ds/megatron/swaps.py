"""Megatron-core rows of the swap table (tempo_ds.modules.swap), registered on import.

tempo_ds.modules.swap imports this module when megatron.core is imported already, so a stock
megatron-core model is swapped by the one generic mechanism and tempo_ds.deepspeed knows nothing of
Megatron's internals. The rows:

    kind       stock part                                  Tempo part
    gelu       MLP.activation_func (F.gelu, openai_gelu,   TempoGELU of the same form (gelu_form),
               gelu_impl, fast_gelu), bias_gelu_impl       or TempoMLP's fused bias-GELU; erf_gelu
               (bias_activation_fusion), BertLMHead.gelu   has none, reported stock
    dropout    TransformerLayer.self_attn_bda / mlp_bda    get_tempo_bias_dropout_add
               (get_bias_dropout_add)
    attention  DotProductAttention (exact class)           TempoCoreAttention on the asked path
    loss       GPTModel/BertModel.compute_language_model_loss  the fused linear cross-entropy head
               (and the output layer's logits)             (loss_head.py), no [tokens, V] logits

The MLP row installs what tempo_ds.megatron.mlp decides from the MLP's config, the same code the
Tempo layer specs run: under bias_activation_fusion the MLP becomes a TempoMLP (same object and
parameters) running the fused Tempo bias-GELU in the tanh form that stock's bias_gelu_impl
computes; otherwise activation_func becomes the TempoGELU of its form. An MLP with a GLU or
Transformer Engine's activation stays stock with the reason. The "flash" path cannot apply the
padding mask that a padding-mask attention (BERT's) is given in every forward: it is refused
before anything changes.
"""
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.bert.bert_lm_head import BertLMHead
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer

from ..modules import TempoGELU
from ..modules.swap import AttributeRow, ModuleRow, register
from .bda import get_tempo_bias_dropout_add
from .core_attention import TempoCoreAttention
from .loss_head import LABELS_ARGUMENT, install_row, loss_no_twin, loss_twin
from .mlp import gelu_form, install_tempo_activation, mlp_activation


def _gelu_twin(fn):
    # Twins to rounding only (gelu_form): erf_gelu, quick_gelu and silu have none.
    form = gelu_form(fn)
    return None if form is None else TempoGELU(form)


def _gelu_no_twin(fn):
    name = getattr(fn, "__name__", type(fn).__name__)
    if "gelu" in name.lower():
        return f"activation_func {name} has no Tempo GELU equal to it to rounding"
    return None


def _mlp_stays_stock(mlp):
    """Why `mlp` keeps its stock activation (GLU, Transformer Engine's activation, ...), or None.
    The decision is tempo_ds.megatron.mlp's, shared with the Tempo layer specs."""
    return mlp_activation(mlp.config, mlp.activation_func).reason


def _install_mlp(mlp, attr, twin):
    # The twin names the GELU form of the function alone; the MLP's config decides what runs in its
    # place (the fused tanh bias-GELU under bias_activation_fusion), so the shared code installs it.
    reason = install_tempo_activation(mlp)
    if reason is not None:  # _mlp_stays_stock said otherwise a moment ago: a bug, not a user error
        raise RuntimeError(f"{attr}: {reason}")


def _bda_twin(fn):
    return get_tempo_bias_dropout_add if fn is get_bias_dropout_add else None


def attention_from_stock(module, path):
    """TempoCoreAttention with the constructor arguments `module` (a DotProductAttention) was
    built with, its state (softmax_offset, when the config has one) and its train/eval mode."""
    new = TempoCoreAttention(
        config=module.config, layer_number=module.layer_number, attn_mask_type=module.attn_mask_type,
        attention_type=module.attention_type, attention_dropout=module.attention_dropout.p,
        pg_collection=module.pg_collection, path=path)
    # module.softmax_scale is the constructor's scale already divided by the layer-scaling
    # coefficient; passing it to the constructor would divide it again
    new.softmax_scale = module.softmax_scale
    new.load_state_dict(module.state_dict())
    new.train(module.training)
    return new


def _flash_cannot_serve(module, path):
    if path == "flash" and module.attn_mask_type == AttnMaskType.padding:
        return ('"flash" cannot apply the padding mask of this model\'s attention (BERT); '
                'use "auto" or "tempo"')
    return None


register(AttributeRow(MLP, ("activation_func",), "gelu", _gelu_twin, no_twin=_gelu_no_twin,
                      blocked=_mlp_stays_stock, install=_install_mlp))
register(AttributeRow(BertLMHead, ("gelu",), "gelu", _gelu_twin, no_twin=_gelu_no_twin))
register(AttributeRow(TransformerLayer, ("self_attn_bda", "mlp_bda"), "dropout", _bda_twin))
# loss: GPTModel / BertModel.compute_language_model_loss -> the fused loss head (loss_head.py)
for _model in LABELS_ARGUMENT:
    register(AttributeRow(_model, ("compute_language_model_loss",), "loss", loss_twin, no_twin=loss_no_twin,
                          install=install_row))
register(ModuleRow(DotProductAttention, "attention",
                   lambda module, path: attention_from_stock(module, path or "auto"),
                   refuse=_flash_cannot_serve))
