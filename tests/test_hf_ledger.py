"""What a converted Hugging Face model keeps for backward, per layer and token, against stock.

Counted with tempo_ds.memory.SavedTensorLedger on tiny models (fp32, CPU, dropout 0.1, training,
no padding): bytes per token of one layer are the difference between a 2-layer and a 1-layer model
over the batch's tokens T. Per layer (h hidden, i intermediate, a heads, s sequence), the counts of
docs/hf.md ("Ledger"):

  stock (eager, and SDPA, which runs its math kernel on CPU with dropout on)
      40h + 8i + 12as + 16 (BERT, RoBERTa);  40h + 20i + 12as + 16 (GPT-2)
  Tempo (attention on its flash:recompute path)
      24h + 4i + i/8 + 4a + 8 + 24/T

so Tempo keeps less than stock SDPA by 16h + 8 + g - i/8 + 12as - 4a - 24/T, g = 4i (erf
GELUActivation keeps its input) or 16i (GPT-2's NewGELUActivation, composed of elementwise ops,
keeps x, tanh(.), 0.5x and 1 + tanh(.)). By part:
  norms     2 (4h + 4): each LayerNorm keeps its fp32 input and mean + rstd (4h + 8) in stock, only
            rstd (4) in Tempo (its output is the next Linear's input, kept there anyway);
  dropouts  2 (4h) - 16 / T: stock CPU dropout keeps a 4-byte mask per element, Tempo an 8-byte
            seed per call;
  GELU      g - i / 8 (Tempo keeps one bit per element);
  attention 12as - 4a - 8 / T: stock keeps the softmax, the dropout mask and the dropped
            probabilities (4 bytes each per score), Tempo an fp32 logsumexp per row and head and a
            seed; both keep q, k and v (12h).
"""
import pytest

from tempo_ds.memory import SavedTensorLedger

from .test_hf import SEQ, batch, tiny

pytest.importorskip("transformers")

import tempo_ds.hf as hf  # noqa: E402


def per_layer(arch, variant):
    """({category: bytes per token of one layer}, the total, tokens T) for variant eager|sdpa|tempo."""
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


def counts(arch, h, i, a, s, tokens):
    """(stock, Tempo, stock GELU) bytes per token per layer, fp32 on CPU with dropout on (module
    docstring)."""
    gelu = 16 * i if arch == "gpt2" else 4 * i
    stock = 40 * h + 4 * i + gelu + 12 * a * s + 16
    tempo = 24 * h + 4 * i + i / 8 + 4 * a + 8 + 24 / tokens
    return stock, tempo, gelu


@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2"])
def test_tempo_keeps_less_than_stock_sdpa_by_the_documented_count(arch):
    eager, eager_total, _ = per_layer(arch, "eager")
    sdpa, sdpa_total, tokens = per_layer(arch, "sdpa")
    tempo, tempo_total, _ = per_layer(arch, "tempo")
    config = tiny(arch).config
    h, a = config.hidden_size, config.num_attention_heads
    i = getattr(config, "intermediate_size", None) or config.n_inner or 4 * h
    stock_count, tempo_count, gelu = counts(arch, h, i, a, SEQ, tokens)
    assert sdpa_total == eager_total == stock_count
    assert tempo_total == pytest.approx(tempo_count)
    assert sdpa_total - tempo_total == pytest.approx(16 * h + 8 + gelu - i / 8 + 12 * a * SEQ - 4 * a - 24 / tokens)
    assert sdpa["norm"] - tempo["norm"] == 2 * (4 * h + 4)
    assert sdpa["dropout"] - tempo["dropout"] == pytest.approx(2 * 4 * h - 16 / tokens)
    assert tempo.get("gelu", 0) == i / 8
    assert sdpa["attention"] - tempo["attention"] == pytest.approx(12 * a * SEQ - 4 * a - 8 / tokens)
    stock_gelu = sdpa_total - sum(sdpa.get(k, 0) for k in ("norm", "dropout", "attention", "matmul"))
    assert stock_gelu == gelu
