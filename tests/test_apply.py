"""swap_model: a stock megatron-core model swapped by `"tempo"` computes what it computed before.

Stock models are built with the local spec, then swapped in place as tempo_ds.initialize does.
"""
import functools
import logging

import pytest
import torch
import torch.nn.functional as F

from tempo_ds.deepspeed.apply import swap_model
from tempo_ds.deepspeed.config import TempoConfig
from tempo_ds import workload

from . import megatron_utils as mu
from .numerics import assert_within_pytorch_error

pytest.importorskip("megatron.core")


pytestmark = pytest.mark.usefixtures("megatron_world")


def _core_attentions(model):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    return [m for m in model.modules() if isinstance(m, DotProductAttention)]


def _eval_logits(model, batch):
    with torch.no_grad():
        return workload.loss("gpt", model, batch, return_logits=True)[1]


@pytest.mark.parametrize("attention", ["tempo", "flash"])
def test_swapped_attention_keeps_layer_scaling_and_eval_mode(attention):
    """The swapped core attention keeps the stock module's net softmax scale (with query-key
    layer scaling, the stored scale is already divided by the layer number) and its eval mode
    (dropout 0.1 would otherwise run again): eval logits stay those of the stock model."""
    config = mu.tiny_config(apply_query_key_layer_scaling=True, dropout=0.1)
    model = mu.build("gpt", "stock", config)
    model.eval()
    batch = mu.batch("gpt")
    scales = [m.softmax_scale for m in _core_attentions(model)]
    assert scales[0] != scales[1]  # layer scaling: layer n divides by n
    stock = _eval_logits(model, batch)

    counts = swap_model(model, TempoConfig(attention=attention), log=False).swapped
    assert counts["attention"] == config.num_layers
    swapped = _core_attentions(model)
    assert [type(m).__name__ for m in swapped] == ["TempoCoreAttention"] * config.num_layers
    assert [m.softmax_scale for m in swapped] == scales
    assert not any(m.training for m in swapped)
    ours = _eval_logits(model, batch)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_eval_logits(model, batch), ours, rtol=0, atol=0)  # no dropout


def _mlp_activations(model):
    from megatron.core.transformer.mlp import MLP
    return [m.activation_func for m in model.modules() if isinstance(m, MLP)]


@pytest.mark.parametrize("activation,form", [
    (F.gelu, "none"), (functools.partial(F.gelu, approximate="tanh"), "tanh"), ("openai_gelu", "tanh"),
    ("fast_gelu", "tanh"), ("erf_gelu", None), (F.silu, None)])
def test_gelu_swap_takes_twins_to_rounding_only(activation, form):
    from megatron.core import activations
    from megatron.core.transformer import utils
    from tempo_ds.modules import TempoGELU

    fn = {"openai_gelu": utils.openai_gelu, "fast_gelu": activations.fast_gelu,
          "erf_gelu": utils.erf_gelu}.get(activation, activation)
    model = mu.build("gpt", "stock", mu.tiny_config(activation_func=fn, bias_activation_fusion=False))
    report = swap_model(model, TempoConfig(attention="stock"), log=False)
    counts = report.swapped
    acts = _mlp_activations(model)
    if form is None:
        assert "gelu" not in counts and all(a is fn for a in acts)
        # a GELU without a twin is reported stock; silu is no GELU at all
        assert len(report.left_stock("gelu")) == (2 if activation == "erf_gelu" else 0)
    else:
        assert counts["gelu"] == len(acts) == 2
        assert all(isinstance(a, TempoGELU) and a.approximate == form for a in acts)
        x = torch.linspace(-6, 6, 1001)
        assert_within_pytorch_error(acts[0](x), fn(x), fn(x.double()), "GELU")


# bias_activation_fusion is no longer such a setting: the MLP row installs the fused Tempo
# bias-GELU there (tests/test_megatron_dropin.py::test_initialize_swaps_the_fused_bias_gelu).
@pytest.mark.parametrize("flag", ["gated_linear_unit"])
def test_gelu_swap_leaves_mlps_that_do_not_call_the_attribute(flag, caplog):
    """A GLU calls config.activation_func: a swapped attribute would never run. Those MLPs stay
    stock, reported with a warning naming the setting, and the model still trains."""
    model = mu.build("gpt", "stock", mu.tiny_config(**{flag: True}))
    with caplog.at_level(logging.WARNING, logger="tempo_ds"):
        report = swap_model(model, TempoConfig(attention="stock"))
    assert "gelu" not in report.swapped and all(a is F.gelu for a in _mlp_activations(model))
    assert [name for name, _ in report.left_stock("gelu")] == [
        f"decoder.layers.{i}.mlp.activation_func" for i in range(2)]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "gelu: swapped 0, left 2 stock" in warned[0] and flag in warned[0]
    loss = workload.loss("gpt", model, mu.batch("gpt"))
    loss.backward()
    assert torch.isfinite(loss)


def test_auto_attention_honours_a_document_mask_under_the_causal_type():
    """Megatron's unfused softmax applies the mask it is given, also under the causal mask type
    (block-causal masks of packed documents). "auto" keeps the flash path for the causal mask
    itself and takes the tempo path for any other mask; "flash" refuses it."""
    from tempo_ds.megatron.core_attention import is_causal_mask

    config = mu.tiny_config()
    stock = mu.build("gpt", "stock", config)
    batch = mu.batch("gpt")
    s = batch["tokens"].shape[1]
    causal = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)
    documents = causal.clone()
    documents[..., s // 2:, : s // 2] = True  # the second document does not see the first
    assert is_causal_mask(causal, s, s) and not is_causal_mask(documents, s, s)
    assert not is_causal_mask(causal[..., :-1], s, s - 1)

    for mask, path in ((causal, "flash:sdpa"), (documents, "tempo")):
        batch = dict(batch, attention_mask=mask)
        expected = _eval_logits(stock, batch)
        model = mu.build("gpt", "stock", config)
        model.load_state_dict(stock.state_dict())
        model.eval()
        swap_model(model, TempoConfig(attention="auto"), log=False)
        got = _eval_logits(model, batch)
        assert {m.last_path for m in _core_attentions(model)} == {path}
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    swap = mu.build("gpt", "stock", config)
    swap_model(swap, TempoConfig(attention="flash"), log=False)
    with pytest.raises(ValueError, match="path='flash'"):
        _eval_logits(swap, dict(batch, attention_mask=documents))


def test_causal_verdict_is_kept_per_mask_version():
    from tempo_ds.megatron.core_attention import is_causal_mask

    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).triu(1)
    assert is_causal_mask(mask, 6, 6)
    mask[..., 5, 0] = True  # an in-place edit bumps the version: checked again
    assert not is_causal_mask(mask, 6, 6)
    assert is_causal_mask(torch.zeros(2, 1, 1, 6, dtype=torch.bool), 1, 6)  # one query sees all keys
    assert not is_causal_mask(mask.float(), 6, 6)  # only boolean masks take the flash path


def test_flash_attention_with_bert_padding_mask_is_refused_before_any_swap():
    """BERT passes its padding mask to every layer; the flash path cannot apply it. Asked for
    flash, the spec and the swap refuse at build time, naming the setting, not at the first
    forward."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from tempo_ds import megatron as tm
    from tempo_ds.deepspeed.config import TempoConfigError

    with pytest.raises(ValueError, match="attention='flash' cannot apply BERT's padding mask"):
        tm.get_bert_layer_tempo_spec(attention="flash")
    model = mu.build("bert", "stock", mu.tiny_config())
    with pytest.raises(TempoConfigError, match='"tempo.attention": "flash"'):
        swap_model(model, TempoConfig(attention="flash"), log=False)
    assert all(type(m) is DotProductAttention for m in _core_attentions(model))
    assert not any(type(m).__name__.startswith("Tempo") for m in model.modules())


# -- the swap report -------------------------------------------------------------------------------
def _stock_parts(model):
    """kind -> number of stock parts of `model` that have a Tempo twin, counted from its modules."""
    from megatron.core.models.bert.bert_lm_head import BertLMHead
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from torch import nn

    def count(cls):
        return sum(type(m) is cls for m in model.modules())
    core = [m for m in model.modules() if type(m) is DotProductAttention]
    return {"layernorm": count(nn.LayerNorm), "gelu": count(MLP) + count(BertLMHead),
            # the core attentions' own dropout goes with them
            "dropout": count(nn.Dropout) - len(core) + 2 * count(TransformerLayer),
            "attention": len(core)}


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_report_on_stock_model_swaps_everything(arch):
    """A GPT or BERT built with megatron-core's stock local spec: every norm, GELU (MLPs and BERT's
    LM head), dropout (modules and bias-dropout-adds), core attention and the loss head is swapped, and the report
    says that nothing was left stock."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from torch import nn

    from tempo_ds.megatron import get_tempo_bias_dropout_add
    from tempo_ds.modules import TempoGELU

    config = mu.tiny_config(dropout=0.1)
    model = mu.build(arch, "stock", config)
    expected = _stock_parts(model)
    assert expected["gelu"] == config.num_layers + (arch == "bert") and expected["attention"] == config.num_layers
    # and the model's one loss head (tempo_ds.megatron.loss_head)
    expected["loss"] = 1
    report = swap_model(model, TempoConfig(attention="tempo"), log=False)
    assert report.left == []
    assert report.swapped == expected
    assert not any(type(m) in (nn.LayerNorm, nn.Dropout, nn.GELU, DotProductAttention) for m in model.modules())
    assert all(isinstance(a, TempoGELU) for a in _mlp_activations(model))
    assert all(m.self_attn_bda is get_tempo_bias_dropout_add is m.mlp_bda
               for m in model.modules() if isinstance(m, TransformerLayer))
    assert not any(report.warns(kind) for kind in report.kinds)
    assert all(text.endswith("no stock ones left") for _, text in report.lines())


class _ForeignGELU(torch.nn.Module):
    """A GELU of another library: no row, named like one."""

    def forward(self, x):
        return F.gelu(x)


class _TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 2)
        self.norm = torch.nn.LayerNorm(16)
        self.act = torch.nn.GELU()
        self.act2 = _ForeignGELU()

    def forward(self, x):
        x = self.attn(x, x, x, need_weights=False)[0]
        return self.act2(self.act(self.norm(x)))


def test_report_on_plain_block_names_attention_left_stock():
    """nn.MultiheadAttention has no Tempo twin: the report names it, with the reason, instead of
    claiming no stock attention is left; GELU and LayerNorm are swapped keeping their parameters,
    and a GELU class of no row is reported, not passed over."""
    from tempo_ds.modules import TempoGELU, TempoLayerNorm

    model = _TorchBlock()
    weight = model.norm.weight
    report = swap_model(model, TempoConfig(), log=False)
    assert report.swapped == {"gelu": 1, "layernorm": 1}
    assert isinstance(model.act, TempoGELU) and isinstance(model.norm, TempoLayerNorm)
    assert model.norm.weight is weight and type(model.attn) is torch.nn.MultiheadAttention
    assert report.left_stock("attention") == [("attn", "nn.MultiheadAttention has no Tempo twin")]
    assert report.left_stock("gelu") == [("act2", "class _ForeignGELU has no Tempo row")]
    assert report.warns("attention") and report.warns("gelu") and not report.warns("layernorm")
    lines = dict(report.lines())
    assert "no stock ones left" not in lines["attention"] and "MultiheadAttention" in lines["attention"]
    assert lines["layernorm"] == "layernorm: swapped 1, no stock ones left"


def test_kind_turned_off_is_not_swapped():
    """A kind the config turns off stays stock, is reported with the config's words, and does not
    warn; the other kinds are swapped."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    model = mu.build("gpt", "stock", mu.tiny_config())
    report = swap_model(model, TempoConfig(gelu=False, attention="stock"), log=False)
    assert "gelu" not in report.swapped and "attention" not in report.swapped and report.swapped["layernorm"]
    assert all(a is F.gelu for a in _mlp_activations(model))
    assert all(type(m) is DotProductAttention for m in _core_attentions(model))
    assert {reason for _, reason in report.left_stock("gelu")} == {'"tempo.gelu" is false'}
    assert {reason for _, reason in report.left_stock("attention")} == {'"tempo.attention" is "stock"'}
    assert not report.warns("gelu") and not report.warns("attention")
    plain = _TorchBlock()
    swap_model(plain, TempoConfig(gelu=False), log=False)
    assert type(plain.act) is torch.nn.GELU


def test_tempo_spec_model_has_nothing_left():
    """A model built from the Tempo spec: nothing to swap but the embedding dropout, nothing left
    stock (the Tempo functions and modules are ours, not stock ones of no twin)."""
    model = mu.build("gpt", "tempo", mu.tiny_config())
    report = swap_model(model, TempoConfig(), log=False)
    assert report.left == [] and report.swapped == {"dropout": 1}


def test_rows_of_a_framework_without_provider_are_skipped_quietly(monkeypatch):
    """A framework in sys.modules whose provider of rows is not written (yet) costs nothing: the
    torch rows still swap; a provider that exists is imported once its framework is."""
    import sys
    import types

    from tempo_ds.modules import TempoGELU
    from tempo_ds.modules import swap

    monkeypatch.setitem(sys.modules, "some_framework", types.ModuleType("some_framework"))
    monkeypatch.setitem(swap.PROVIDERS, "some_framework", "tempo_ds.some_framework.swaps")
    # imported by an earlier test most likely: forgotten here, so the walk below must import it
    monkeypatch.delitem(sys.modules, "tempo_ds.megatron.swaps")
    model = torch.nn.Sequential(torch.nn.GELU())
    assert swap.swap_modules(model).swapped == {"gelu": 1} and isinstance(model[0], TempoGELU)
    assert "tempo_ds.megatron.swaps" in sys.modules  # megatron.core is imported in this module


class _HoldsIdleDropout(torch.nn.Module):
    """Keeps a dropout it never calls (it passes only `.p` on, as Hugging Face attention does)
    beside one it calls."""

    def __init__(self):
        super().__init__()
        self.attn_dropout = torch.nn.Dropout(0.1)
        self.dropout = torch.nn.Dropout(0.1)

    def forward(self, x):
        return self.dropout(F.dropout(x, self.attn_dropout.p, self.training))


def test_dropout_never_called_is_neither_swapped_nor_counted(monkeypatch):
    """A dropout module that exists but is never called (an IdleRow names it) is not swapped, not
    counted, not reported as stock left, and listed apart as never called; the called one is
    swapped. Without the row it would be swapped and counted."""
    from tempo_ds.modules import TempoDropout
    from tempo_ds.modules import swap

    model = _HoldsIdleDropout()
    assert swap_model(model, TempoConfig(), log=False).swapped == {"dropout": 2}  # no row: counted
    monkeypatch.setattr(swap, "IDLE_ROWS", {})
    swap.register(swap.IdleRow(_HoldsIdleDropout, ("attn_dropout",), "dropout", lambda m: "read only for .p"))
    model = _HoldsIdleDropout()
    report = swap_model(model, TempoConfig(), log=False)
    assert report.swapped == {"dropout": 1} and report.left == []
    assert type(model.attn_dropout) is torch.nn.Dropout and isinstance(model.dropout, TempoDropout)
    assert report.never_called("dropout") == [("attn_dropout", "read only for .p")]
    assert not report.warns("dropout")
    assert "1 never called, not counted: read only for .p" in dict(report.lines())["dropout"]
