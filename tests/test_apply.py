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
from tempo_ds.memory import models

from . import megatron_utils as mu
from .numerics import assert_within_pytorch_error

pytest.importorskip("megatron.core")


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    mu.init_single_process()


def _core_attentions(model):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    return [m for m in model.modules() if isinstance(m, DotProductAttention)]


def _eval_logits(model, batch):
    with torch.no_grad():
        return models.forward_loss("gpt", model, batch, return_logits=True)[1]


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

    counts = swap_model(model, TempoConfig(attention=attention), log=False)
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
    counts = swap_model(model, TempoConfig(attention="stock"), log=False)
    acts = _mlp_activations(model)
    if form is None:
        assert "gelu" not in counts and all(a is fn for a in acts)
    else:
        assert counts["gelu"] == len(acts) == 2
        assert all(isinstance(a, TempoGELU) and a.approximate == form for a in acts)
        x = torch.linspace(-6, 6, 1001)
        assert_within_pytorch_error(acts[0](x), fn(x), fn(x.double()), "GELU")


@pytest.mark.parametrize("flag", ["bias_activation_fusion", "gated_linear_unit"])
def test_gelu_swap_leaves_mlps_that_do_not_call_the_attribute(flag, caplog):
    """With bias-GELU fusion Megatron picks its fused kernel by comparing the function with
    F.gelu, and a GLU calls config.activation_func: a swapped attribute would fail in the first
    forward or never run. Those MLPs stay stock, with a warning, and the model still trains."""
    model = mu.build("gpt", "stock", mu.tiny_config(**{flag: True}))
    with caplog.at_level(logging.WARNING, logger="tempo_ds"):
        counts = swap_model(model, TempoConfig(attention="stock"), log=False)
    assert "gelu" not in counts and all(a is F.gelu for a in _mlp_activations(model))
    assert flag in caplog.text and "keeps the stock gelu" in caplog.text
    loss = models.forward_loss("gpt", model, mu.batch("gpt"))
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
