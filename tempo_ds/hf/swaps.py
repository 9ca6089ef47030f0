"""Hugging Face transformers rows of the swap table (tempo_ds.modules.swap), registered on import.

tempo_ds.modules.swap imports this module when transformers is imported already, so a stock
transformers model is converted by the one generic mechanism (tempo_ds.hf.apply and
tempo_ds.initialize alike) and tempo_ds.deepspeed knows nothing of transformers. The rows:

    kind       stock part                                    Tempo part
    layernorm  nn.LayerNorm (the torch row)                  TempoLayerNorm, same Parameters
    gelu       GELUActivation (gelu, gelu_python)            TempoGELU("none") (erf form)
               NewGELUActivation (gelu_new), GELUTanh        TempoGELU("tanh"): the same tanh
               (gelu_pytorch_tanh, gelu_python_tanh),        formula, to rounding
               FastGELUActivation, AccurateGELUActivation
               QuickGELUActivation, ClippedGELUActivation    stock, with the reason
    dropout    nn.Dropout (the torch row)                    TempoDropout (seeded)
    attention  the self-/cross-attention classes of BERT,    the same module, its config switched
               RoBERTa, XLM-R, ELECTRA, DistilBERT, GPT-2    to attn_implementation="tempo", its
               (ATTENTION_CLASSES)                           path in `tempo_attention_path`
    loss       GPT2LMHeadModel.lm_head, BertForMaskedLM.cls, the fused linear cross-entropy (training
               (XLM)RobertaForMaskedLM.lm_head               with labels), MLM at the counted positions
                                                             only (loss_head.py); DistilBERT's, ELECTRA's
                                                             MLM heads: stock, with the reason

Idle rows (the report's "never called", issue 17): these attention classes keep an nn.Dropout
whose `.p` they pass to the attention function and never call it (BERT's family under every
implementation; GPT-2's attn_dropout except with eager attention and reorder_and_upcast_attn).
Those modules are neither swapped nor counted; tests/test_hf.py checks the table against the
modules a forward really calls.
"""
import importlib
import weakref

from transformers import activations

from ..modules import TempoGELU
from ..modules.swap import IdleRow, ModuleRow, register
from . import attention, loss_head

# (transformers.models module, attention classes that call ALL_ATTENTION_FUNCTIONS, their dropout)
ATTENTION_CLASSES = [
    ("bert", ("BertSelfAttention", "BertCrossAttention"), "dropout"),
    ("roberta", ("RobertaSelfAttention", "RobertaCrossAttention"), "dropout"),
    ("xlm_roberta", ("XLMRobertaSelfAttention", "XLMRobertaCrossAttention"), "dropout"),
    ("electra", ("ElectraSelfAttention", "ElectraCrossAttention"), "dropout"),
    ("distilbert", ("DistilBertSelfAttention",), "dropout"),
    ("gpt2", ("GPT2Attention",), "attn_dropout"),
]

# GELU classes of transformers.activations -> the TempoGELU form equal to them to rounding
GELU_FORMS = {"GELUActivation": "none", "NewGELUActivation": "tanh", "GELUTanh": "tanh",
              "FastGELUActivation": "tanh", "AccurateGELUActivation": "tanh"}
GELU_NO_TWIN = {"QuickGELUActivation": "QuickGELUActivation is x * sigmoid(1.702 x), not a GELU form of TempoGELU",
                "ClippedGELUActivation": "ClippedGELUActivation clips its output, which TempoGELU cannot invert"}


def _route(module, path):
    """Send `module` through the "tempo" attention on `path`: the module is kept (its parameters,
    names and hooks), its config's attn_implementation becomes "tempo"."""
    config = module.config
    if config._attn_implementation != attention.NAME:
        attention.STOCK_IMPLEMENTATION[id(config)] = (weakref.ref(config), config._attn_implementation)
        config._attn_implementation = attention.NAME
    module.tempo_attention_path = "auto" if path in (None, "auto") else path
    return module


def _gpt2_dropout_idle(module):
    calls = (module.config._attn_implementation == "eager" and module.reorder_and_upcast_attn
             and getattr(module, "tempo_attention_path", None) is None)
    return None if calls else "read only for .p by GPT2Attention; never called"


def _idle(module):
    return f"read only for .p by {type(module).__name__}; never called"


def _register_attention():
    for model, names, dropout in ATTENTION_CLASSES:
        try:
            owner = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
        except ImportError:
            continue
        for name in names:
            cls = getattr(owner, name, None)
            if cls is None:
                continue
            register(ModuleRow(cls, "attention", _route))
            register(IdleRow(cls, (dropout,), "dropout", _gpt2_dropout_idle if model == "gpt2" else _idle))


def _register_gelu():
    for name, form in GELU_FORMS.items():
        cls = getattr(activations, name, None)
        if cls is not None:
            register(ModuleRow(cls, "gelu", lambda _m, _o, form=form: TempoGELU(form)))
    for name, reason in GELU_NO_TWIN.items():
        cls = getattr(activations, name, None)
        if cls is not None:
            register(ModuleRow(cls, "gelu", None, blocked=lambda _m, reason=reason: reason))


attention.register()
_register_gelu()
_register_attention()
loss_head.register_rows()
