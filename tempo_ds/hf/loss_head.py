"""The fused loss head of GPT2LMHeadModel, BertForMaskedLM, RobertaForMaskedLM and XLMRobertaForMaskedLM.

While the model trains and its forward is given `labels`, the vocab projection computes
tempo_ds.ops.linear_cross_entropy instead of logits: no [tokens, V] logits, no fp32 softmax
kept for backward (12 bytes per counted token: the fp32 lse and the int64 label). BERT's, RoBERTa's
and XLM-R's MLM transform (dense, GELU, LayerNorm) runs only at the positions whose label is not
-100, gathered before the dense layer, with Tempo's GELU and the model's LayerNorm (TempoLayerNorm
when "tempo.layernorm" is on). Liger-Kernel's lce_forward makes the same choice: `logits` is
None in that case (skip_logits). In eval, or without labels, the model runs stock and returns
stock's logits and loss.

How it hooks in, keeping the stock forward: a forward pre-hook on the model takes `labels` out of
the call (so stock code computes no loss) and hands the targets to the vocab projection, whose
class becomes TempoLMLinear (an nn.Linear: same Parameter objects, names and tying); the
projection returns None as the logits and keeps the loss, which a forward hook puts in the
output. Every module still runs through its own __call__. Under DeepSpeed ZeRO-3 the head runs
stock, with a warning: ZeRO-3 gathers a module's parameters again for backward from a hook on its
output tensors, and the projection returns none. The pre-hook also runs stock (with a warning) a
head replaced since install, or a loss set since. State dicts are unchanged, so save_pretrained /
from_pretrained work both ways.

The loss, as stock:
- GPT-2 (transformers' ForCausalLMLoss): labels shifted left (or `shift_labels`), `ignore_index`
  (default -100); the mean over counted tokens, or the sum divided by `num_items_in_batch` when
  the Trainer passes it.
- BERT, RoBERTa, XLM-R (nn.CrossEntropyLoss in their forward): the mean over labels != -100;
  `num_items_in_batch` is ignored, as stock ignores it.
- Differences: the loss is fp32 whatever the activation dtype (stock BERT's is in the logits'
  dtype), and a batch with no counted token gives 0 with zero gradients where stock gives NaN.

The rows (tempo_ds.modules.swap AttributeRows of kind "loss", registered by tempo_ds/hf/swaps.py)
name the head attribute of each model class (`lm_head`, `cls`); a head of another class, a
subclassed model, a custom `loss_function` or `loss_type` stay stock with the reason in the report,
as do DistilBERT's and ELECTRA's MLM heads (NO_HEAD), which have no twin here.
"""
import functools
import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import activations
from transformers.loss import loss_utils
from transformers.models.bert import modeling_bert
from transformers.models.distilbert import modeling_distilbert
from transformers.models.electra import modeling_electra
from transformers.models.gpt2.modeling_gpt2 import GPT2LMHeadModel
from transformers.models.roberta import modeling_roberta
from transformers.models.xlm_roberta import modeling_xlm_roberta
from transformers.utils import ModelOutput

from ..modules import TempoGELU
from ..modules.swap import AttributeRow, register
from ..ops import gelu, linear_cross_entropy
from .attention import warn_once

IGNORE_INDEX = -100


@dataclass(frozen=True)
class HeadSpec:
    """One model class's loss head: `attr` the model attribute holding the head (of class `head`),
    `linear` the path of the vocab projection, `mlm` the path of the MLM head whose transform runs
    at the counted positions (None: causal LM, labels shifted)."""
    model: type
    attr: str
    head: type
    linear: str
    mlm: Optional[str] = None


HEADS = {spec.model: spec for spec in (
    HeadSpec(GPT2LMHeadModel, "lm_head", nn.Linear, "lm_head"),
    HeadSpec(modeling_bert.BertForMaskedLM, "cls", modeling_bert.BertOnlyMLMHead, "cls.predictions.decoder",
             "cls.predictions"),
    HeadSpec(modeling_roberta.RobertaForMaskedLM, "lm_head", modeling_roberta.RobertaLMHead, "lm_head.decoder",
             "lm_head"),
    HeadSpec(modeling_xlm_roberta.XLMRobertaForMaskedLM, "lm_head", modeling_xlm_roberta.XLMRobertaLMHead,
             "lm_head.decoder", "lm_head"),
)}

# MLM models of the other attention classes tempo_ds/hf/swaps.py knows, whose heads have no twin here:
# their loss stays stock, and the report says so
NO_HEAD = {
    modeling_distilbert.DistilBertForMaskedLM: "vocab_projector",
    modeling_electra.ElectraForMaskedLM: "generator_lm_head",
}


@dataclass
class Pending:
    """What the model's pre-hook hands its vocab projection for one forward: the targets (shifted
    for a causal LM; for MLM only the counted ones), the counted positions (MLM), the
    reduction's divisor (`num_items_in_batch`, or None for the mean), and, once computed, the loss."""
    target: torch.Tensor
    where: Optional[torch.Tensor]
    ignore_index: int
    num_items: object = None
    loss: Optional[torch.Tensor] = None


class TempoLMLinear(nn.Linear):
    """nn.Linear (same parameters) that, while a Pending is set on it, returns None and keeps the
    fused linear cross-entropy of its input against the pending targets. Saves for backward what
    linear_cross_entropy saves: its input (shared with the norm before it), the targets and the fp32
    lse per token; nothing of size V."""

    tempo_pending = None

    def forward(self, input):
        pending = self.tempo_pending
        if pending is None or pending.loss is not None:
            return super().forward(input)
        hidden = input.reshape(-1, input.shape[-1])
        target = pending.target.to(hidden.device).reshape(-1)
        mean = pending.num_items is None
        loss = linear_cross_entropy(hidden, self.weight, target, bias=self.bias, ignore_index=pending.ignore_index,
                                    reduction="mean" if mean else "sum")
        if not mean:
            items = pending.num_items
            loss = loss / (items.to(loss.device) if torch.is_tensor(items) else items)
        pending.loss = loss
        return None


def _tempo_gelu(fn):
    """The Tempo GELU of the form of `fn` (a transformers GELU class), else fn itself."""
    if isinstance(fn, TempoGELU):
        return fn
    from .swaps import GELU_FORMS
    form = GELU_FORMS.get(type(fn).__name__) if type(fn).__module__ == "transformers.activations" else None
    return fn if form is None else functools.partial(gelu, approximate=form)


def _counted_rows(hidden, pending):
    """hidden [b, s, h] -> [counted, h]: the rows of the positions whose label counts."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, pending.where.to(hidden.device))


class TempoBertLMPredictionHead(modeling_bert.BertLMPredictionHead):
    """BertLMPredictionHead (same parameters) whose transform runs at the counted positions only
    while its decoder has a Pending."""

    def forward(self, hidden_states):
        pending = self.decoder.tempo_pending
        if pending is None:
            return super().forward(hidden_states)
        t = self.transform
        x = t.LayerNorm(_tempo_gelu(t.transform_act_fn)(t.dense(_counted_rows(hidden_states, pending))))
        return self.decoder(x)


class _RobertaStyleHead:
    """The forward of RoBERTa's MLM head and its copies (dense, the gelu function, layer_norm,
    decoder), the transform at the counted positions only while the decoder has a Pending."""

    def forward(self, features, **kwargs):
        pending = self.decoder.tempo_pending
        if pending is None:
            return super().forward(features, **kwargs)
        x = self.layer_norm(_tempo_gelu(activations.gelu)(self.dense(_counted_rows(features, pending))))
        return self.decoder(x)


class TempoRobertaLMHead(_RobertaStyleHead, modeling_roberta.RobertaLMHead):
    """RobertaLMHead (same parameters) with the transform at the counted positions only."""


class TempoXLMRobertaLMHead(_RobertaStyleHead, modeling_xlm_roberta.XLMRobertaLMHead):
    """XLMRobertaLMHead (same parameters) with the transform at the counted positions only."""


MLM_TWINS = {modeling_bert.BertLMPredictionHead: TempoBertLMPredictionHead,
             modeling_roberta.RobertaLMHead: TempoRobertaLMHead,
             modeling_xlm_roberta.XLMRobertaLMHead: TempoXLMRobertaLMHead}


@functools.cache
def _labels_position(model_cls):
    """Index of `labels` among forward's positional arguments (self left out); once per class, not per forward."""
    return list(inspect.signature(model_cls.forward).parameters).index("labels") - 1


def _arm(model, args, kwargs):
    """Forward pre-hook: in training with labels, take the labels out of the call and hand the
    targets to the vocab projection."""
    spec = HEADS[type(model)]
    linear = model.get_submodule(spec.linear)
    linear.tempo_pending = None
    reason = _runs_stock(model, spec, linear)
    if reason is not None:
        warn_once((id(model), reason), f"tempo_ds: {type(model).__name__}'s loss head runs stock: {reason}")
        return None
    position = _labels_position(spec.model)
    labels = kwargs.get("labels")
    positional = labels is None and len(args) > position and args[position] is not None
    if positional:
        labels = args[position]
    keep = kwargs.get("logits_to_keep", 0)
    # logits_to_keep slices the hidden states: the labels no longer line up, stock decides
    if not model.training or labels is None or not (isinstance(keep, int) and keep == 0):
        return None
    if spec.mlm is None:
        ignore_index = kwargs.get("ignore_index", IGNORE_INDEX)
        target = kwargs.get("shift_labels")
        if target is None:
            target = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()
        linear.tempo_pending = Pending(target, None, ignore_index, kwargs.get("num_items_in_batch"))
    else:
        flat = labels.reshape(-1)
        where = torch.nonzero(flat != IGNORE_INDEX).squeeze(1)
        linear.tempo_pending = Pending(flat.index_select(0, where), where, IGNORE_INDEX)
    if positional:
        args = args[:position] + (None,) + args[position + 1:]
    else:
        kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
    return args, kwargs


def _runs_stock(model, spec, linear):
    """Why this forward of an installed head must run stock, or None: a head replaced since
    install (resize_token_embeddings on an untied GPT-2, set_output_embeddings, a wrapper), a
    loss set since install (blocked), or parameters partitioned by DeepSpeed ZeRO-3 (ds_id): the
    projection returns no tensor, so ZeRO-3's hook on its output, which gathers the weight again
    for backward, would never run."""
    if not isinstance(linear, TempoLMLinear):
        return f"{spec.linear} is {type(linear).__name__} since tempo_ds.hf.apply, not TempoLMLinear"
    if spec.mlm is not None and type(model.get_submodule(spec.mlm)) not in MLM_TWINS.values():
        return f"{spec.mlm} was replaced since tempo_ds.hf.apply"
    if hasattr(linear.weight, "ds_id"):
        return "DeepSpeed ZeRO-3 partitions its weight (the fused head runs under ZeRO stages 0-2)"
    return blocked(model)


def _collect(model, args, kwargs, output):
    """Forward hook (always called): put the fused loss into the output, logits left None."""
    linear = model.get_submodule(HEADS[type(model)].linear)
    pending, linear.tempo_pending = linear.tempo_pending, None
    if pending is None or pending.loss is None:
        return None
    if isinstance(output, ModelOutput):
        fields = {k: v for k, v in output.items() if k not in ("loss", "logits")}
        return type(output)(loss=pending.loss, **fields)
    # return_dict=False: the tuple leaves out None entries, the logits among them
    return (pending.loss,) + tuple(output)


def install(model, attr=None, twin=None):
    """Give `model` (of a class in HEADS) the fused loss head, in place: the vocab projection's
    class becomes TempoLMLinear, the MLM head's its Tempo twin (same parameters, names, state
    dict), and two forward hooks. Raises ValueError naming the reason when blocked(model) says why
    not. (`attr`, `twin`: the AttributeRow install signature, unused.)"""
    spec = HEADS.get(type(model))
    if spec is None:
        reason = f"{type(model).__name__} has no Tempo loss head"
    else:
        reason = blocked(model) or _structure(getattr(model, spec.attr, None), spec)
    if reason is not None:
        raise ValueError(f"tempo_ds.hf.loss_head.install: {reason}")
    if _installed(getattr(model, spec.attr), spec):
        return  # hooks already registered: a second pair would take the labels twice
    if spec.mlm is not None:
        head = model.get_submodule(spec.mlm)
        head.__class__ = MLM_TWINS[type(head)]
    model.get_submodule(spec.linear).__class__ = TempoLMLinear
    model.register_forward_pre_hook(_arm, with_kwargs=True)
    model.register_forward_hook(_collect, with_kwargs=True, always_call=True)


def _structure(head, spec):
    """Why `head` (the model's spec.attr) is not the stock structure the twin knows, or None."""
    if type(head) is not spec.head and not (spec.mlm is None and type(head) is TempoLMLinear):
        return f"{spec.attr} is {type(head).__name__}, not {spec.head.__name__}"
    if spec.mlm is not None:
        mlm = head.predictions if spec.head is modeling_bert.BertOnlyMLMHead else head
        if type(mlm) not in MLM_TWINS and type(mlm) not in MLM_TWINS.values():
            return f"the MLM head is {type(mlm).__name__}, not {' or '.join(c.__name__ for c in MLM_TWINS)}"
        if type(mlm.decoder) not in (nn.Linear, TempoLMLinear):
            return f"the MLM decoder is {type(mlm.decoder).__name__}, not nn.Linear"
    return None


def _installed(head, spec):
    linear = head if spec.mlm is None else head.get_submodule(spec.linear[len(spec.attr) + 1:])
    return isinstance(linear, TempoLMLinear)


def blocked(model):
    """Why `model`'s loss head stays stock (its loss is not one the fused head computes), or None."""
    spec = HEADS.get(type(model))
    if spec is None:
        return f"class {type(model).__name__} subclasses a model with a Tempo loss head; its forward may differ"
    if spec.mlm is None:
        if "_loss_function" in model.__dict__:
            return "a custom loss_function is set on the model"
        if getattr(model, "loss_type", None) not in (None, "ForCausalLM"):
            return f"loss_type {model.loss_type!r} is not ForCausalLM"
        if loss_utils.LOSS_MAPPING.get("ForCausalLM") is not loss_utils.ForCausalLMLoss:
            return "transformers' LOSS_MAPPING['ForCausalLM'] was replaced"
    return None


def kept_bytes(arch, hidden, vocab, tokens, counted, element_size=2):
    """(stock, Tempo): bytes the loss head keeps for backward, from shapes, for a batch of `tokens`
    positions of which `counted` have a label, weights and activations of `element_size` bytes
    (statistics as on a GPU: LayerNorm's mean and rstd in fp32).

    arch "gpt2": stock keeps the projection's input (e h per token), the fp32 log-softmax of
    ForCausalLMLoss's fp32 logits (4 V) and the int64 labels (8), plus the mean's weight (4 bytes);
    Tempo the same input (TempoLayerNorm keeps it anyway as its output), the labels and the fp32
    lse (4): e h + 12 per token.
    arch "mlm" (BERT, RoBERTa): stock keeps, per token, the inputs of dense, GELU, LayerNorm and
    decoder (4 e h), LayerNorm's mean and rstd (8), the log-softmax in the logits' dtype (e V) and
    the labels (8), plus the mean's weight (e); Tempo, per counted position only, the gather index
    (8), the inputs of dense (e h), GELU's output (e h) and bits (h / 8), LayerNorm's output (e h,
    the decoder's input) and rstd (4), the labels (8) and the lse (4).
    """
    e = element_size
    if arch == "gpt2":
        return tokens * (e * hidden + 4 * vocab + 8) + 4, tokens * (e * hidden + 12)
    if arch == "mlm":
        stock = tokens * (4 * e * hidden + 8 + e * vocab + 8) + e
        return stock, counted * (3 * e * hidden + 24) + -(-counted * hidden // 8)
    raise ValueError(f"arch must be \"gpt2\" or \"mlm\", got {arch!r}")


def register_rows():
    """Register one "loss" AttributeRow per model class of HEADS (called by tempo_ds/hf/swaps.py)."""
    for spec in HEADS.values():
        def twin(head, spec=spec):
            return install if _structure(head, spec) is None and not _installed(head, spec) else None

        def no_twin(head, spec=spec):
            return _structure(head, spec)

        register(AttributeRow(spec.model, (spec.attr,), "loss", twin, no_twin=no_twin, blocked=blocked,
                              install=install))
    for model, attr in NO_HEAD.items():
        reason = f"{model.__name__}'s MLM head has no Tempo twin (fused heads: {', '.join(m.__name__ for m in HEADS)})"
        register(AttributeRow(model, (attr,), "loss", lambda _head: None, no_twin=lambda _head, reason=reason: reason))


__all__ = ["HEADS", "HeadSpec", "NO_HEAD", "TempoBertLMPredictionHead", "TempoLMLinear", "TempoRobertaLMHead",
           "TempoXLMRobertaLMHead", "blocked", "install", "kept_bytes", "register_rows"]
