"""The fused loss head in megatron-core models (tempo_ds.megatron.loss_head): the same per-token
losses and gradients as stock without [tokens, V] logits, tied and untied output weights, logits
as before without labels, BERT's MLM head at the counted positions only, and the "loss" swap
row. TP=2 with sequence parallelism: tests/test_megatron_tp.py (the Tempo spec's GPTModel)."""
import pytest
import torch

from tempo_ds import workload
from tempo_ds.memory import SavedTensorLedger
from tempo_ds.modules.swap import swap_modules

from . import megatron_utils as mu

pytest.importorskip("megatron.core")


def _gpt(tied):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    torch.manual_seed(0)
    model = GPTModel(config=mu.tiny_config(), transformer_layer_spec=get_gpt_layer_local_spec(),
                     vocab_size=mu.VOCAB, max_sequence_length=mu.SEQ,
                     share_embeddings_and_output_weights=tied, position_embedding_type="learned_absolute")
    return model if mu.DEVICE is None else model.to(mu.DEVICE)


def _gpt_forward(model, batch, labels=True):
    return model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                 labels=batch["labels"] if labels else None)


def _swapped(build, kinds=("loss",)):
    """(stock model, the same weights swapped for `kinds`, the swap report)."""
    stock, fused = build(), build()
    return stock, fused, swap_modules(fused, kinds=set(kinds))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gpt_losses_and_grads_match_stock_without_logits(tied, megatron_world):
    stock, fused, report = _swapped(lambda: _gpt(tied))
    assert report.swapped.get("loss") == 1
    batch = mu.batch("gpt", seed=1)
    mask = torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(2)).to(batch["labels"].device)
    expected = _gpt_forward(stock, batch)
    with SavedTensorLedger(fused) as ledger:
        got = _gpt_forward(fused, batch)
    head = ledger.report(got).bytes_by("category").get("loss", 0)
    tokens = batch["labels"].numel()
    # the op's own: the fp32 lse and the int64 labels, nothing of size V
    assert head == 12 * tokens
    assert got.shape == expected.shape == batch["labels"].shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (expected * mask).sum().backward()
    (got * mask).sum().backward()
    want, have = _grads(stock), _grads(fused)
    assert set(want) == set(have) and any(g.abs().max() > 0 for g in have.values())
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_gpt_without_labels_returns_logits_and_state_is_unchanged(megatron_world):
    stock, fused, _ = _swapped(lambda: _gpt(tied=False))
    assert fused.state_dict().keys() == stock.state_dict().keys()
    batch = mu.batch("gpt", seed=3)
    torch.testing.assert_close(_gpt_forward(fused, batch, labels=False), _gpt_forward(stock, batch, labels=False))
    # after a forward with labels, the next one without still builds logits
    _gpt_forward(fused, batch)
    assert _gpt_forward(fused, batch, labels=False).shape[-1] == stock.output_layer.weight.shape[0]


def test_loss_row_off_leaves_the_head_stock(megatron_world):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    _, fused, report = _swapped(lambda: _gpt(tied=True), kinds=("gelu",))
    assert "loss" not in report.swapped
    batch = mu.batch("gpt", seed=1)
    with SavedTensorLedger(fused) as ledger:
        got = _gpt_forward(fused, batch)
    assert type(fused.output_layer) is ColumnParallelLinear
    assert ledger.report(got).bytes_by("category").get("loss", 0) >= 4 * mu.VOCAB * batch["labels"].numel()


def _bert_batch(seed):
    batch = mu.batch("bert", seed=seed)
    counted = torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(seed)) < 0.15
    counted[0, 0] = True
    batch["labels"] = torch.where(counted.to(batch["labels"].device), batch["labels"], -1)
    return batch, counted.to(batch["labels"].device)


def _bert_forward(model, batch):
    return model(batch["tokens"], batch["attention_mask"], tokentype_ids=batch["tokentype_ids"],
                 lm_labels=batch["labels"])


def test_bert_head_runs_at_counted_positions_only(megatron_world):
    from tempo_ds.megatron.loss_head import TempoBertLMHead
    stock, fused, report = _swapped(lambda: mu.build("bert", "stock", mu.tiny_config(), seed=5),
                                    kinds=("loss", "gelu", "layernorm"))
    assert report.swapped.get("loss") == 1 and type(fused.lm_head) is TempoBertLMHead
    batch, counted = _bert_batch(6)
    want_lm, want_nsp = _bert_forward(stock, batch)
    with SavedTensorLedger(fused) as ledger:
        got_lm, got_nsp = _bert_forward(fused, batch)
    records = [r for r in ledger.report(got_lm).records if r.module.startswith(("lm_head", "output_layer"))
               or r.category == "loss"]
    rows = {r.shape[0] for r in records if len(r.shape) == 2}
    # the head's tensors have one row per counted position, none per token
    assert rows == {int(counted.sum())}, rows
    assert got_lm.shape == want_lm.shape
    torch.testing.assert_close(got_lm[counted], want_lm[counted], rtol=1e-5, atol=1e-5)
    assert (got_lm[~counted] == 0).all()
    torch.testing.assert_close(got_nsp, want_nsp)
    mask = counted.float()
    ((want_lm * mask).sum() + want_nsp.sum()).backward()
    ((got_lm * mask).sum() + got_nsp.sum()).backward()
    want, have = _grads(stock), _grads(fused)
    assert set(want) == set(have) and have["lm_head.dense.weight"].abs().max() > 0
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_tempo_spec_models_have_the_head(megatron_world):
    from tempo_ds.megatron.loss_head import TempoOutputLayer
    for arch in ("gpt", "bert"):
        model = mu.build(arch, "tempo", mu.tiny_config(), seed=7)
        assert type(model.output_layer) is TempoOutputLayer, arch
        assert workload.loss(arch, model, mu.batch(arch, seed=8)).isfinite()
