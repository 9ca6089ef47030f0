"""The loss head of megatron-core's GPTModel and BertModel without [tokens, V] logits.

When a model's forward is given labels, its output layer hands the loss a DeferredLogits (its
input, the output weight and bias) instead of logits, and the model's compute_language_model_loss
runs tempo_ds.ops.linear_cross_entropy on it: the fused, vocab-parallel linear cross-entropy that
keeps 12 bytes per token (the fp32 lse and the labels) where Megatron's keeps the fp32 softmax,
4 V bytes per token. Without labels (inference, evaluation) the model returns logits as before.

GPT: per-token losses [b, s], as stock. Tied and untied output weights (the model passes the
embedding's shard as `weight`), tensor parallelism (the op reduces its statistics over the
output layer's group) and sequence parallelism (the hidden states are all-gathered first; the
op's hidden gradient is whole on every rank, so the gather's backward only takes the rank's slice).

BERT: the MLM head (dense, GELU, LayerNorm, then the vocab projection) runs only at the positions
whose label counts (label >= 0; Megatron's BERT dataset labels the others -1), gathered before the
dense layer, with Tempo's GELU and LayerNorm; the per-token loss keeps stock's [b, s] shape with
zeros elsewhere (stock's values there are multiplied by a zero loss mask). NSP is untouched.
Under sequence parallelism the BERT head stays stock (the head's dense weights take
sequence-parallel gradients from every rank's own tokens, which a gathered selection would not).

install_loss_head(model) sets this up on a built model (the "loss" row of tempo_ds.megatron.swaps
calls it through tempo_ds.initialize); TempoGPTModel is GPTModel with it installed.
"""
import torch
from megatron.core.models.bert.bert_lm_head import BertLMHead
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from ..ops import gelu, layer_norm, linear_cross_entropy

# model class -> (name of its labels argument, its position in forward's arguments)
LABELS_ARGUMENT = {GPTModel: ("labels", 4), BertModel: ("lm_labels", 3)}


class DeferredHead:
    """What the BERT LM head returns while labels are given: its input, transformed later at the
    counted positions only."""

    def __init__(self, head, hidden):
        self.head, self.hidden = head, hidden


class DeferredLogits:
    """What the output layer returns in place of logits while labels are given."""

    def __init__(self, layer, hidden, weight):
        self.layer, self.hidden, self.weight = layer, hidden, weight


class TempoOutputLayer(ColumnParallelLinear):
    """ColumnParallelLinear (same parameters and state) that defers its GEMM to the loss while
    its model's forward has labels (`tempo_defer`, set by the model's hooks)."""

    tempo_defer = False

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if not self.tempo_defer:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        return DeferredLogits(self, input_, self.weight if weight is None else weight), None


class TempoBertLMHead(BertLMHead):
    """BertLMHead (same parameters) that defers its transform to the loss while labels are given."""

    tempo_defer = False

    def forward(self, hidden_states):
        if not self.tempo_defer:
            return super().forward(hidden_states)
        return DeferredHead(self, hidden_states)


def _tempo_gelu(fn):
    from .mlp import gelu_form
    if (getattr(fn, "__module__", None) or "").startswith("tempo_ds."):
        return fn
    form = gelu_form(fn)
    return fn if form is None else (lambda x: gelu(x, form))


def _head_transform(head, hidden):
    """dense -> GELU -> LayerNorm of BertLMHead, with Tempo's GELU and LayerNorm."""
    x = _tempo_gelu(head.gelu)(head.dense(hidden))
    norm = head.layer_norm
    if isinstance(norm, torch.nn.LayerNorm) and norm.elementwise_affine:
        return layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return norm(x)


class LossHead:
    """The fused loss of one model; its compute_language_model_loss replaces the model's.

    Its hooks on the model act only while the model's compute_language_model_loss is this
    head's (a swap that was asked for set it); otherwise they return at once and the model runs
    stock, so a row that found the kind off leaves nothing that acts.
    """

    def __init__(self, model, stock_loss):
        self.model_type = type(model)
        self.stock_loss = stock_loss
        self.labels_argument = next(v for cls, v in LABELS_ARGUMENT.items() if isinstance(model, cls))
        model.register_forward_pre_hook(self.announce, with_kwargs=True)
        model.register_forward_hook(self.clear, always_call=True)

    def active(self, model):
        return model.__dict__.get("compute_language_model_loss") == self.compute_language_model_loss

    def activate(self, model):
        """Swap the classes of the output layer (and BERT's LM head) to their deferring twins,
        which keep every parameter, name and state; idempotent."""
        if type(model.output_layer) is ColumnParallelLinear:
            model.output_layer.__class__ = TempoOutputLayer
        head = getattr(model, "lm_head", None)
        if type(head) is BertLMHead and not model.config.sequence_parallel:
            head.__class__ = TempoBertLMHead

    def announce(self, model, args, kwargs):
        """Forward pre-hook: defer the head while this forward has labels."""
        if not self.active(model):
            return
        self.activate(model)
        name, position = self.labels_argument
        labels = kwargs.get(name, args[position] if len(args) > position else None)
        self._set(model, labels is not None)

    def clear(self, model, *_):
        if self.active(model):
            self._set(model, False)

    @staticmethod
    def _set(model, defer):
        model.output_layer.tempo_defer = defer
        head = getattr(model, "lm_head", None)
        if isinstance(head, TempoBertLMHead):
            head.tempo_defer = defer

    def compute_language_model_loss(self, labels, logits):
        """Per-token losses [b, s] from DeferredLogits (stock's function for real logits)."""
        if not isinstance(logits, DeferredLogits):
            return self.stock_loss(labels, logits)
        layer, hidden = logits.layer, logits.hidden
        labels = labels.transpose(0, 1)  # [b, s] -> [s, b], as hidden
        bias = layer.bias if layer.bias is not None and not layer.skip_bias_add else None
        group = layer.tp_group if torch.distributed.get_world_size(layer.tp_group) > 1 else None
        if isinstance(hidden, DeferredHead):
            loss = self._masked_positions_loss(hidden, logits.weight, bias, labels, group)
        else:
            if issubclass(self.model_type, BertModel):
                # Megatron's BERT dataset labels the positions that do not count -1
                labels = labels.masked_fill(labels < 0, -100)
            if layer.sequence_parallel:
                hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False,
                                                              group=layer.tp_group)
            loss = linear_cross_entropy(hidden, logits.weight, labels, bias=bias, reduction="none",
                                        tp_group=group)
        return loss.transpose(0, 1).contiguous()

    @staticmethod
    def _masked_positions_loss(deferred, weight, bias, labels, group):
        """BERT: the head at the counted positions only; zeros at the others."""
        hidden = deferred.hidden.reshape(-1, deferred.hidden.shape[-1])
        flat = labels.reshape(-1)
        where = torch.nonzero(flat >= 0).squeeze(1)
        picked = _head_transform(deferred.head, hidden.index_select(0, where))
        loss = linear_cross_entropy(picked, weight, flat.index_select(0, where), bias=bias, reduction="none",
                                    tp_group=group)
        return torch.zeros(flat.shape, dtype=loss.dtype, device=loss.device).index_copy(
            0, where, loss).view(labels.shape)


def blocked(model):
    """Why `model`'s loss head stays stock, or None."""
    layer = getattr(model, "output_layer", None)
    if layer is None:
        return "this pipeline stage has no output layer"
    if type(layer) not in (ColumnParallelLinear, TempoOutputLayer):
        return f"output layer {type(layer).__name__} has no Tempo twin"
    head = getattr(model, "lm_head", None)
    if head is not None and type(head) not in (BertLMHead, TempoBertLMHead):
        return f"LM head {type(head).__name__} has no Tempo twin"
    return None


def install_loss_head(model):
    """Give a built GPTModel / BertModel the fused loss head (in place; parameters, names and
    state dict unchanged). Returns the LossHead's compute_language_model_loss, which it also sets
    on the model. Raises ValueError when blocked(model) says why not."""
    reason = blocked(model)
    if reason is not None:
        raise ValueError(f"install_loss_head: {reason}")
    loss_head = LossHead(model, model.compute_language_model_loss)
    model.compute_language_model_loss = loss_head.compute_language_model_loss
    loss_head.activate(model)
    return loss_head.compute_language_model_loss


def loss_twin(fn):
    """The swap row's twin of a model's compute_language_model_loss (a bound method):
    install_loss_head, which the row's install_row runs on the model; None for any other
    function (nothing happens until the swap installs it)."""
    model = getattr(fn, "__self__", None)
    if not isinstance(model, tuple(LABELS_ARGUMENT)) or blocked(model) is not None:
        return None
    return install_loss_head


def install_row(model, attr, twin):
    """The row's install step (tempo_ds.modules.swap.AttributeRow.install)."""
    twin(model)


def loss_no_twin(fn):
    """Why a model's compute_language_model_loss has no twin (blocked), or None."""
    model = getattr(fn, "__self__", None)
    return blocked(model) if isinstance(model, tuple(LABELS_ARGUMENT)) else None


class TempoGPTModel(GPTModel):
    """GPTModel with the fused loss head installed (install_loss_head); same parameters."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.post_process:
            install_loss_head(self)
