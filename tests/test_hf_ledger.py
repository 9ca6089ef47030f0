"""What a converted Hugging Face model keeps for backward, per layer and token, against stock.

Counted with tempo_ds.memory.SavedTensorLedger on tiny models (fp32, CPU, dropout 0.1, training):
bytes per token of one layer are the difference between a 2-layer and a 1-layer model over the
batch's tokens T. Per layer (h hidden, i intermediate, a heads, s sequence), Tempo keeps less than
stock SDPA by exactly:
  norms     2 (4h + 4): each LayerNorm keeps its fp32 input and mean + rstd (4h + 8) in stock, only
            rstd (4) in Tempo (its output is the next Linear's input, kept there anyway);
  dropouts  2 (4h) - 16 / T: stock CPU dropout keeps a 4-byte mask per element, Tempo an 8-byte
            seed per call;
  GELU      stock keeps its input (erf GELUActivation: 4i; GPT-2's NewGELUActivation, composed of
            elementwise ops: more), Tempo i / 8 (one bit per element);
and attention keeps less than stock's (CPU SDPA with dropout runs its math kernel, 12 a s bytes of
softmax, mask and dropped probabilities; Tempo's recompute path keeps an fp32 logsumexp and a seed).
"""
import pytest

from tempo_ds.memory import SavedTensorLedger

from .test_hf import batch, tiny

pytest.importorskip("transformers")

import tempo_ds.hf as hf  # noqa: E402


def per_layer(arch, variant):
    """{category: bytes per token of one layer} and the total, for variant eager|sdpa|tempo."""
    kept = []
    for layers in (1, 2):
        model = tiny(arch, dropout=0.1, layers=layers, attn_implementation="eager" if variant == "eager" else "sdpa")
        model.train()
        if variant == "tempo":
            hf.apply(model, True, log=False)
        data = batch(pad=False)
        with SavedTensorLedger(model) as ledger:
            out = model(**data)
        kept.append(ledger.report(out.loss).by_category())
    tokens = data["input_ids"].numel()
    cats = {k: (kept[1].get(k, 0) - kept[0].get(k, 0)) / tokens for k in set(kept[0]) | set(kept[1])}
    return cats, sum(cats.values()), tokens


@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2"])
def test_tempo_keeps_less_than_stock_sdpa_by_the_documented_count(arch):
    eager, eager_total, _ = per_layer(arch, "eager")
    sdpa, sdpa_total, tokens = per_layer(arch, "sdpa")
    tempo, tempo_total, _ = per_layer(arch, "tempo")
    config = tiny(arch).config
    h, i = config.hidden_size, getattr(config, "intermediate_size", None) or config.n_inner or 4 * config.hidden_size
    assert sdpa["norm"] - tempo["norm"] == 2 * (4 * h + 4)
    assert sdpa["dropout"] - tempo["dropout"] == pytest.approx(2 * 4 * h - 16 / tokens)
    assert tempo.get("gelu", 0) == i / 8
    assert tempo["attention"] < sdpa["attention"]
    stock_gelu = sdpa_total - sum(sdpa.get(k, 0) for k in ("norm", "dropout", "attention", "matmul"))
    assert stock_gelu >= 4 * i
    assert tempo_total < eager_total and sdpa_total - tempo_total >= 2 * (4 * h + 4) + 8 * h - 16 / tokens + 4 * i - i / 8
