"""tempo_ds.hf.apply on Hugging Face BERT, RoBERTa and GPT-2, and DistilBERT, ELECTRA and XLM-R,
built from the same classes (tiny, from config, no download).

The converted model computes what the stock one computes (fp32, dropout 0, padding, within twice
stock's own error against a float64 stock model, on the flash and the tempo attention paths), keeps
less for backward (tests/test_hf_ledger.py), recomputes bit-identically under gradient
checkpointing, saves and loads checkpoints both ways, and reports what it did honestly.
"""
import copy
import logging

import pytest
import torch

from tempo_ds.modules import TempoDropout, TempoGELU, TempoLayerNorm

from .numerics import assert_within_pytorch_error

transformers = pytest.importorskip("transformers")

import tempo_ds.hf as hf  # noqa: E402  (after the importorskip: it imports transformers)

VOCAB, SEQ = 48, 10


# BERT's classes and those built like them: (config class, model class, extra config fields)
ENCODERS = {"bert": ("BertConfig", "BertForMaskedLM", {}),
            "roberta": ("RobertaConfig", "RobertaForMaskedLM", {}),
            "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForMaskedLM", {}),
            "electra": ("ElectraConfig", "ElectraForMaskedLM", {"embedding_size": 8})}


def tiny(arch, dropout=0.0, layers=2, **overrides):
    """A tiny model of `arch` (ARCHS or OTHER_ARCHS) built from its config, SDPA attention."""
    if arch == "gpt2":
        # use_cache=False, as the Trainer sets it (TrainingArguments.use_cache): with a cache, the
        # training forward copies k and v into it (torch.cat), attention keeps the copies, and the
        # BLAS rounds them differently from the strided views of c_attn that checkpointing sees
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=layers, n_head=2, n_positions=SEQ,
                                         resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                         use_cache=False, **overrides)
        model_cls = transformers.GPT2LMHeadModel
    elif arch == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=VOCAB, n_layers=layers, n_heads=2, dim=16, hidden_dim=32,
                                               max_position_embeddings=SEQ + 4, dropout=dropout,
                                               attention_dropout=dropout, pad_token_id=1, **overrides)
        model_cls = transformers.DistilBertForMaskedLM
    else:
        config_cls, model_cls, extra = ENCODERS[arch]
        config = getattr(transformers, config_cls)(
            vocab_size=VOCAB, num_hidden_layers=layers, num_attention_heads=2, hidden_size=16, intermediate_size=32,
            max_position_embeddings=SEQ + 4, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
            pad_token_id=1, **extra, **overrides)
        model_cls = getattr(transformers, model_cls)
    config._attn_implementation = overrides.pop("attn_implementation", "sdpa")
    return model_cls(config)


def batch(pad=True, b=2):
    """input_ids [b, SEQ] (ids >= 2: not RoBERTa's padding id), the 0/1 attention mask (row 1 padded
    from position 6 when `pad`), labels (the ids, -100 at padding)."""
    ids = torch.randint(2, VOCAB, (b, SEQ))
    mask = torch.ones(b, SEQ, dtype=torch.long)
    if pad:
        mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run(model, data):
    """(loss, {name: grad}) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    loss = model(**data).loss
    loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def attention_paths(model):
    return {m.tempo_last_path for m in model.modules() if hasattr(m, "tempo_last_path")}


ARCHS = ["bert", "roberta", "gpt2"]
# built from the same classes as BERT's (their own copies in transformers 5): one attention path each
OTHER_ARCHS = ["distilbert", "electra", "xlm-roberta"]
# heads with a GELU module (BERT's MLM transform and its copies; RoBERTa's calls the gelu function)
GELU_HEAD = {"bert", "distilbert", "electra"}


@pytest.fixture(scope="module")
def stock_runs():
    """stock_runs(arch) -> (stock model, padded batch, {"stock"|"float64": (loss, grads, eval logits)}),
    made once per arch for the module: the flash and the tempo cases share stock's runs."""
    cache = {}

    def get(arch):
        if arch not in cache:
            torch.manual_seed(0)
            stock, data = tiny(arch).train(), batch()
            reference = copy.deepcopy(stock).double()
            results = {name: (*run(model, data), eval_logits(model, data))
                       for name, model in (("stock", stock), ("float64", reference))}
            cache[arch] = stock.train(), data, results
        return cache[arch]
    return get


def eval_logits(model, data):
    """Logits of an eval forward without labels (where the fused loss head runs stock)."""
    with torch.no_grad():
        logits = model.eval()(**{k: v for k, v in data.items() if k != "labels"}).logits
    model.train()
    return logits


@pytest.mark.parametrize("arch, path", [(arch, path) for arch in ARCHS for path in ("flash", "tempo")]
                         + [(arch, "tempo") for arch in OTHER_ARCHS])
def test_converted_model_equals_stock(arch, path, stock_runs):
    """fp32, dropout 0, a padded batch: the training loss, every gradient and the eval logits within
    twice stock's own error against the float64 stock model, with every kind swapped and the asked
    attention path run (the fused loss head, where the model has one, returns no training logits)."""
    stock, data, results = stock_runs(arch)
    ours = copy.deepcopy(stock)
    report = hf.apply(ours, {"attention": path}, log=False)
    layers = stock.config.num_hidden_layers
    # two per layer, and the final one (GPT-2) or the embeddings' and the MLM head's (encoders)
    assert report.swapped["attention"] == layers and report.swapped["layernorm"] == 2 * layers + 1 + (arch != "gpt2")
    assert report.swapped["gelu"] == layers + (arch in GELU_HEAD)
    assert ours.config._attn_implementation == "tempo"
    assert not any(type(m) is torch.nn.LayerNorm for m in ours.modules())
    # the only stock dropouts left are those the attention never calls (reported, not counted)
    stock_dropouts = {name for name, m in ours.named_modules() if type(m) is torch.nn.Dropout}
    assert stock_dropouts == {where for where, _ in report.never_called("dropout")} and len(stock_dropouts) == layers
    loss, grads = run(ours, data)
    # on CPU in fp32 without dropout SDPA's fused CPU kernel takes the padding mask
    assert attention_paths(ours) == {"flash:sdpa" if path == "flash" else "tempo"}
    (stock_loss, stock_grads, stock_logits), (ref_loss, ref_grads, ref_logits) = results["stock"], results["float64"]
    # one scalar: stock's may land on the nearest fp32 by chance, so one ulp of the loss is the floor
    assert_within_pytorch_error(loss, stock_loss, ref_loss, "loss", atol=torch.finfo(loss.dtype).eps * ref_loss.item())
    assert set(grads) == set(stock_grads) == set(ref_grads)
    for name in grads:
        assert_within_pytorch_error(grads[name], stock_grads[name], ref_grads[name], name)
    assert_within_pytorch_error(eval_logits(ours, data), stock_logits, ref_logits, "logits")


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_recomputation_is_bit_identical(arch):
    """Dropout 0.1, training, the whole conversion (loss head included): gradient_checkpointing_enable()
    gives every gradient bit for bit (each recomputed dropout regenerates its mask from the seed drawn
    again from the restored RNG state), and the dropout is really on (another seed's differ)."""
    model = tiny(arch, dropout=0.1).train()
    hf.apply(model, True, log=False)
    data = batch(pad=arch != "gpt2")
    torch.manual_seed(5)
    _, plain = run(model, data)
    # CPU with dropout: no fused SDPA kernel; GPT-2 (no mask) recomputes, a padded BERT takes tempo
    assert attention_paths(model) == {"flash:recompute" if arch == "gpt2" else "tempo"}
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    # the attention modules run twice per step under checkpointing (forward, then recompute)
    calls = []
    for module in model.modules():
        if hasattr(module, "tempo_attention_path"):
            module.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(5)
    _, checkpointed = run(model, data)
    assert len(calls) == 2 * model.config.num_hidden_layers
    torch.manual_seed(6)
    _, other = run(model, data)
    assert set(plain) == set(checkpointed) == set(other)
    for name, grad in plain.items():
        assert torch.equal(grad, checkpointed[name]), name
    assert any(not torch.equal(grad, other[name]) for name, grad in plain.items())


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_checkpoints_load_both_ways(arch, tmp_path):
    """save_pretrained of a converted model loads with stock from_pretrained into a stock model
    (safetensors), a stock checkpoint loads into a converted model, and state dicts have the same
    names both ways; eval logits agree after each load."""
    stock = tiny(arch).eval()
    converted = copy.deepcopy(stock)
    hf.apply(converted, True, log=False)
    assert list(converted.state_dict()) == list(stock.state_dict())
    with torch.no_grad():
        for p in converted.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # so that a load that kept the old values fails
    data = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        expected = converted(**data).logits
    converted.save_pretrained(tmp_path / "converted")
    assert (tmp_path / "converted" / "model.safetensors").exists()
    loaded = type(stock).from_pretrained(tmp_path / "converted", attn_implementation="sdpa").eval()
    assert not any(isinstance(m, (TempoLayerNorm, TempoDropout, TempoGELU)) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**data).logits, expected, rtol=1e-5, atol=1e-5)
    # the reverse: a stock checkpoint into a converted model, by from_pretrained + apply and by state dict
    loaded.save_pretrained(tmp_path / "stock")
    again = type(stock).from_pretrained(tmp_path / "stock").eval()
    hf.apply(again, True, log=False)
    fresh = tiny(arch).eval()
    hf.apply(fresh, True, log=False)
    fresh.load_state_dict(loaded.state_dict())
    stock.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        for model in (again, fresh, stock):
            torch.testing.assert_close(model(**data).logits, expected, rtol=1e-5, atol=1e-5)


def test_attn_implementation_tempo_from_config_alone():
    """attn_implementation="tempo" works without apply once tempo_ds.hf is imported (path auto)."""
    model = tiny("bert", attn_implementation="tempo").eval()
    model.config._attn_implementation = "tempo"
    with torch.no_grad():
        model(**{k: v for k, v in batch().items() if k != "labels"})
    assert attention_paths(model) == {"flash:sdpa"}


def test_tempo_false_swaps_nothing():
    """"tempo": false (as a bool, an object and in a ds_config dict) changes nothing."""
    for tempo in (False, {"enabled": False}, {"tempo": False, "train_batch_size": 2}):
        model = tiny("bert")
        before = [(name, type(m)) for name, m in model.named_modules()]
        report = hf.apply(model, tempo, log=False)
        assert report.swapped == {} and [(name, type(m)) for name, m in model.named_modules()] == before
        assert model.config._attn_implementation == "sdpa"


def test_model_with_nothing_to_swap_warns(caplog):
    """A model with no part the rows know is a WARNING report, not an error."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with caplog.at_level(logging.INFO, logger="tempo_ds"):
        report = hf.apply(model, True)
    assert report.found_nothing and report.swapped == {} and report.warns("model")
    assert any(r.levelno == logging.WARNING and "nothing to swap" in r.getMessage() for r in caplog.records)


def test_unsupported_attention_feature_is_refused_by_name():
    """A feature the tempo attention cannot compute is refused with its name; output_attentions
    falls back to eager with one warning and returns the probabilities."""
    from tempo_ds.hf.attention import tempo_attention_forward

    model = tiny("bert")
    hf.apply(model, True, log=False)
    module = model.bert.encoder.layer[0].attention.self
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="head_mask"):
        tempo_attention_forward(module, q, q, q, None, head_mask=torch.ones(2))
    with pytest.raises(NotImplementedError, match="softcap"):
        tempo_attention_forward(module, q, q, q, None, softcap=30.0)
    out, weights = tempo_attention_forward(module, q, q, q, None, output_attentions=True)
    assert weights is not None and weights.shape == (1, 2, 4, 4) and out.shape == (1, 4, 2, 8)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_never_called_table_matches_a_forward(arch, impl):
    """The idle rows of tempo_ds/hf/swaps.py are true for the installed transformers: the dropouts
    the report lists as never called are exactly the stock dropouts a training forward does not call
    (with the attention left stock, so the model runs `impl`)."""
    model = tiny(arch, dropout=0.1, attn_implementation=impl).train()
    model.config._attn_implementation = impl
    called, dropouts = set(), set()
    for name, module in model.named_modules():
        if type(module) is torch.nn.Dropout:
            dropouts.add(name)
            module.register_forward_hook(lambda *_, name=name: called.add(name))
    model(**batch())
    report = hf.apply(model, {"attention": "stock"}, log=False, build_ops=False)
    idle = {where for where, _ in report.never_called("dropout")}
    assert idle and idle == dropouts - called
    assert report.swapped["dropout"] == len(called)
