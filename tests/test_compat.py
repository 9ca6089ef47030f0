"""tempo_ds.megatron.compat: every megatron-core version branch, checked on whichever release is
installed (make test: 0.16.1; make test-compat: 0.19.2), each against the stock behaviour it
stands in for."""
import logging
import os
import re

import pytest
import torch

from tempo_ds.megatron import compat

pytest.importorskip("megatron.core")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_supported_range_is_named_once():
    from packaging.specifiers import SpecifierSet
    with open(os.path.join(ROOT, "setup.py")) as f:
        requirement = re.search(r'"megatron-core([^"]*)"', f.read()).group(1)
    assert SpecifierSet(requirement) == SpecifierSet(compat.SUPPORTED), "setup.py and compat.SUPPORTED differ"
    assert all(compat.is_supported(v) for v in compat.TESTED)
    with open(os.path.join(ROOT, "Makefile")) as f:
        pinned = re.search(r"^MCORE_COMPAT\s*\?=\s*(\S+)", f.read(), re.M).group(1)
    assert pinned == compat.TESTED[-1], "make test-compat must run the newest tested release"
    assert compat.is_supported(), f"installed megatron-core {compat.version()} is outside {compat.SUPPORTED}"


def test_tokenizers_have_the_legacy_contract():
    from tempo_ds.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    assert isinstance(tok, compat.tokenizer_base())
    assert tok.unique_identifiers["class"] == "ByteTokenizer"
    assert list(tok.tokenize("hi")) == [104, 105] and tok.eod == 256
    # What 0.19's datasets catch: an optional attribute the tokenizer lacks raises NotImplementedError
    with pytest.raises(NotImplementedError, match="bos"):
        tok.bos
    # The stand-in for the removed base class keeps that contract on every release.
    bare = compat._LegacyTokenizer("path", lower=True)
    assert bare.unique_identifiers == {"class": "_LegacyTokenizer", "tokenizer_path": ["path"], "lower": "True"}
    for name in ("eos", "vocab_size", "pad"):
        with pytest.raises(NotImplementedError, match=name):
            getattr(bare, name)


@pytest.mark.parametrize("x_dtype, residual_dtype", [(torch.bfloat16, torch.float32),
                                                     (torch.float32, torch.bfloat16),
                                                     (torch.float32, torch.float32)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_tempo_bda_casts_as_stock(x_dtype, residual_dtype, with_bias):
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    from tempo_ds.megatron.bda import get_tempo_bias_dropout_add

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 8, generator=g).to(x_dtype)
    bias = torch.randn(8, generator=g).to(x_dtype) if with_bias else None
    residual = torch.randn(3, 2, 8, generator=g).to(residual_dtype)
    outs, grads = [], []
    for factory in (get_bias_dropout_add, get_tempo_bias_dropout_add):
        # inputs that need a gradient keep stock from adding in place (it does so without one)
        xi = x.clone().requires_grad_()
        # dropout off: both compute residual + (x + bias) and must agree bit for bit
        out = factory(False, False)((xi, bias), residual, 0.1)
        out.float().sum().backward()
        outs.append(out)
        grads.append(xi.grad)
    assert outs[1].dtype == outs[0].dtype
    assert torch.equal(outs[1], outs[0]) and torch.equal(grads[1], grads[0])


def test_mlp_spec_builds_mlp_subclasses_silently(megatron_world, caplog):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from . import megatron_utils as mu

    stock = get_gpt_layer_local_spec()
    stock_mlp = stock.submodules.mlp
    assert compat.spec_module(stock_mlp) is MLP
    assert isinstance(compat.spec_submodules(stock_mlp), MLPSubmodules)

    class SubMLP(MLP):
        pass

    # A plain ModuleSpec of an MLP subclass fails on 0.19 (it would be given pg_collection).
    spec = compat.mlp_spec(SubMLP, compat.spec_submodules(stock_mlp))
    assert compat.spec_module(spec) is SubMLP
    config = mu.tiny_config()
    torch.manual_seed(0)
    reference = TransformerLayer(config, stock.submodules, layer_number=1)
    submodules = type(stock.submodules)(**{**vars(stock.submodules), "mlp": spec})
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        layer = TransformerLayer(config, submodules, layer_number=1)
    assert type(layer.mlp) is SubMLP
    assert not [r for r in caplog.records if "Rewrapping" in r.getMessage()]
    ref_state, state = reference.state_dict(), layer.state_dict()
    assert list(state) == list(ref_state)
    assert all(torch.equal(state[k], ref_state[k]) for k in state if isinstance(state[k], torch.Tensor))


def test_quiet_gpt_model_deprecation_drops_only_that_message(caplog):
    logger = logging.getLogger(compat._GPT_MODEL_LOGGER)
    with caplog.at_level(logging.WARNING, logger=compat._GPT_MODEL_LOGGER):
        with compat.quiet_gpt_model_deprecation():
            logger.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
            logger.warning("something else")
        logger.warning("GPTModel IS DEPRECATED, after the block")
    assert [r.getMessage() for r in caplog.records] == ["something else", "GPTModel IS DEPRECATED, after the block"]
