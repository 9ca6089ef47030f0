"""The fused loss head of Hugging Face GPT-2, BERT, RoBERTa and XLM-R (tempo_ds/hf/loss_head.py).

Tiny models from config, fp32, dropout 0, CPU: in training with labels the loss and every gradient
equal stock's within twice stock's error against a float64 stock model, with padding and ignored
labels, and no logits are made; without labels or in eval the model is stock; "loss": false and
unsupported losses stay stock with the reason; the ledger sees no [tokens, V] tensor and BERT's
MLM transform keeps bytes for the counted positions only, by the count of loss_head.kept_bytes.
"""
import copy

import pytest
import torch

from tempo_ds.memory import SavedTensorLedger

from .numerics import assert_within_pytorch_error
from .test_hf import VOCAB, batch, run, tiny

pytest.importorskip("transformers")

from tempo_ds.hf import apply  # noqa: E402  (after the importorskip: it imports transformers)
from tempo_ds.hf.loss_head import TempoLMLinear, kept_bytes  # noqa: E402

# only the head changes, so a difference can only be the head's
LOSS_ONLY = {"gelu": False, "layernorm": False, "dropout": False, "attention": "stock"}
ARCHS = ["gpt2", "bert", "roberta", "xlm-roberta"]


def labelled(arch):
    """batch() with padding; MLM labels only at every third position (and never at padding)."""
    data = batch()
    if arch != "gpt2":
        keep = torch.zeros_like(data["labels"], dtype=torch.bool)
        keep[:, ::3] = True
        data["labels"] = data["labels"].masked_fill(~keep, -100)
    return data


def converted(arch, tempo=LOSS_ONLY):
    """(stock, float64 copy, converted copy, report), all in training mode."""
    stock = tiny(arch).train()
    reference = copy.deepcopy(stock).double()
    ours = copy.deepcopy(stock)
    return stock, reference, ours, apply(ours, tempo, log=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_gradients_equal_stock(arch):
    """Training with labels: the fused head runs (logits None), the loss and every gradient are
    within twice stock's error against float64; GPT-2's num_items_in_batch divides the sum as
    ForCausalLMLoss does, BERT's and RoBERTa's is ignored as their stock forward ignores it."""
    stock, reference, ours, report = converted(arch)
    assert report.swapped.get("loss") == 1 and not report.left_stock("loss")
    data = labelled(arch)
    out = ours(**data)
    assert out.logits is None and "LinearCrossEntropy" in type(out.loss.grad_fn).__name__
    _, grads = run(ours, data)
    _, stock_grads = run(stock, data)
    _, ref_grads = run(reference, data)
    assert set(grads) == set(stock_grads) == set(ref_grads)
    for name in grads:
        assert_within_pytorch_error(grads[name], stock_grads[name], ref_grads[name], name)
    items = dict(data, num_items_in_batch=torch.tensor(7))
    for given in (data, items):
        want = reference(**given).loss
        # one scalar: stock's may land on the float64 value by chance, so a few ulp of it as atol
        assert_within_pytorch_error(ours(**given).loss, stock(**given).loss, want, "loss",
                                    atol=4 * torch.finfo(torch.float32).eps * float(want.detach().abs()))
    if arch == "gpt2":
        assert not torch.allclose(ours(**items).loss, ours(**data).loss)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_as_stock_without_labels_or_in_eval(arch):
    """No labels (training) and eval (with labels): the converted model is stock, bit for bit."""
    stock, _, ours, _ = converted(arch)
    data = labelled(arch)
    unlabelled = {k: v for k, v in data.items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(ours(**unlabelled).logits, stock(**unlabelled).logits)
        ours.eval(), stock.eval()
        a, b = ours(**data), stock(**data)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    # the tuple form: the loss first, the logits left out in training
    ours.train()
    assert torch.equal(ours(**data, return_dict=False)[0], ours(**data).loss)


def test_loss_false_and_unsupported_losses_stay_stock():
    """"loss": false leaves the head stock (logits made, the report says why); a custom
    loss_function or loss_type on GPT-2, and DistilBERT's and ELECTRA's MLM heads, stay stock with
    the reason; a second apply is a no-op."""
    model = tiny("gpt2").train()
    report = apply(model, dict(LOSS_ONLY, loss=False), log=False)
    assert type(model.lm_head) is torch.nn.Linear and report.left_stock("loss") == [("lm_head", '"tempo.loss" is false')]
    assert model(**labelled("gpt2")).logits is not None
    custom = tiny("gpt2")
    custom.loss_function = lambda logits, labels, **_: logits.sum()
    report = apply(custom, LOSS_ONLY, log=False)
    assert type(custom.lm_head) is torch.nn.Linear and "custom loss_function" in report.left_stock("loss")[0][1]
    typed = tiny("gpt2")
    typed.loss_type = "ForMaskedLM"
    assert "loss_type" in apply(typed, LOSS_ONLY, log=False).left_stock("loss")[0][1]
    for arch in ("distilbert", "electra"):
        other = tiny(arch).train()
        report = apply(other, LOSS_ONLY, log=False)
        assert report.warns("loss") and "has no Tempo twin" in report.left_stock("loss")[0][1]
        assert other(**labelled(arch)).logits is not None
    bert = tiny("bert")
    apply(bert, LOSS_ONLY, log=False)
    again = apply(bert, LOSS_ONLY, log=False)
    assert "loss" not in again.swapped and not again.left_stock("loss")
    assert isinstance(bert.cls.predictions.decoder, TempoLMLinear)


@pytest.mark.parametrize("change", ["replaced_projection", "replaced_mlm_head", "zero3_weight", "loss_set_later"])
def test_head_changed_after_apply_runs_stock_with_a_warning(change, caplog):
    """A head replaced since apply, a weight partitioned by ZeRO-3 (its ds_id), or a loss_function
    set since: the forward runs stock (loss and logits as stock's, not a missing loss) and says why
    once; a second install() adds no second pair of hooks."""
    arch = "bert" if change == "replaced_mlm_head" else "gpt2"
    stock, _, ours, _ = converted(arch)
    data = labelled(arch)
    if change == "replaced_projection":
        plain = torch.nn.Linear(ours.config.n_embd, VOCAB, bias=False)
        plain.weight = ours.lm_head.weight
        ours.lm_head = plain
    elif change == "replaced_mlm_head":
        ours.cls.predictions = copy.deepcopy(stock.cls.predictions)
    elif change == "zero3_weight":
        ours.lm_head.weight.ds_id = 0
    else:
        ours.loss_function = lambda logits, labels, **kwargs: stock.loss_function(logits, labels, **kwargs)
    with caplog.at_level("WARNING", logger="tempo_ds"):
        out, want = ours(**data), stock(**data)
        ours(**data)
    assert out.logits is not None and torch.equal(out.logits, want.logits)
    torch.testing.assert_close(out.loss, want.loss)
    warnings = [r.getMessage() for r in caplog.records if "loss head runs stock" in r.getMessage()]
    assert len(warnings) == 1, warnings


def test_install_twice_adds_no_second_hooks():
    from tempo_ds.hf.loss_head import install
    stock, _, ours, _ = converted("gpt2")
    hooks = len(ours._forward_pre_hooks)
    install(ours)
    assert len(ours._forward_pre_hooks) == hooks
    assert ours(**labelled("gpt2")).logits is None  # still fused


def _head_bytes(model, data, head):
    """Bytes the ledger attributes to the head's modules (or the root, where stock's loss runs)
    and the shapes of those records."""
    with SavedTensorLedger(model) as ledger:
        out = model(**data)
    records = [r for r in ledger.report(out.loss).records if r.module == "" or r.module.startswith(head)]
    return sum(r.nbytes for r in records), [r.shape for r in records]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_head_keeps_no_logits_and_mlm_only_counted_positions(arch, dtype):
    """The ledger (every kind on): the head keeps what kept_bytes counts from the shapes, stock and
    Tempo, so no [tokens, V] tensor in Tempo's, and BERT's MLM transform only rows of the counted
    positions."""
    stock, _, ours, _ = converted(arch, True)
    stock, ours = stock.to(dtype), ours.to(dtype)
    data = labelled(arch)
    tokens, counted = data["labels"].numel(), int((data["labels"] != -100).sum())
    head = "lm_head" if arch == "gpt2" else "cls."
    h, e = stock.config.hidden_size, dtype.itemsize
    want_stock, want_tempo = kept_bytes(arch if arch == "gpt2" else "mlm", h, VOCAB, tokens, counted, e)
    if arch == "bert" and dtype == torch.bfloat16:
        # CPU LayerNorm keeps its 16-bit mean and rstd in bf16 (kept_bytes counts fp32, as CUDA's)
        want_stock -= tokens * (8 - 2 * e)
    stock_bytes, stock_shapes = _head_bytes(stock, data, head)
    tempo_bytes, tempo_shapes = _head_bytes(ours, data, head)
    assert (tokens, VOCAB) in stock_shapes and stock_bytes == want_stock
    assert not any(VOCAB in shape for shape in tempo_shapes) and tempo_bytes == want_tempo
    if arch == "bert":
        assert counted < tokens // 2
        # every record a row per counted position, or the GELU's bits of those rows
        assert all(shape[0] == counted or shape == (counted * h // 8,) for shape in tempo_shapes)
