"""The ledger CLI on real megatron-core models, and the memory contract of the Tempo GPT spec."""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

from tempo_ds.memory.__main__ import main, measure_models, measure_spec, parse_args

from . import megatron_utils as mu
from .conftest import HAS_CUDA

pytest.importorskip("megatron.core")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARGS = ["--layers", "2", "--hidden", "64", "--heads", "4", "--seq", "32", "--vocab", "128"]
# The GPT-2 medium layer of the Tempo paper: s=1024, h=1024, a=16; one layer, micro-batch 1, fp32.
PAPER_ARGS = ["--arch", "gpt", "--layers", "1", "--hidden", "1024", "--heads", "16", "--seq", "1024",
              "--batch", "1", "--dtype", "fp32", "--vocab", "1024"]


pytestmark = pytest.mark.usefixtures("megatron_world")


def test_cli_json_is_one_object_with_both_specs():
    out = subprocess.run([sys.executable, "-m", "tempo_ds.memory", "--arch", "gpt", *TINY_ARGS, "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout)
    for key in ("baseline_bytes_per_token_per_layer", "tempo_bytes_per_token_per_layer",
                "baseline_total_bytes", "tempo_total_bytes", "baseline_head_bytes", "tempo_head_bytes",
                "baseline_layer_by_category", "tempo_layer_by_category", "ratio"):
        assert key in result, key
    assert 0 < result["tempo_bytes_per_token_per_layer"] < result["baseline_bytes_per_token_per_layer"]
    assert sum(result["tempo_layer_by_category"].values()) == result["tempo_layers_bytes"]
    assert result["tempo_total_bytes"] == result["tempo_layers_bytes"] + result["tempo_head_bytes"]
    # one row per op kind: stock and Tempo keep tensors in the same categories (attention, not
    # stock "softmax" against Tempo "attention"), and the categories add up to the same totals
    assert set(result["baseline_layer_by_category"]) == set(result["tempo_layer_by_category"])
    assert {"attention", "matmul", "gelu", "norm", "dropout"} <= set(result["tempo_layer_by_category"])
    assert sum(result["baseline_layer_by_category"].values()) == result["baseline_layers_bytes"]
    assert set(result["baseline_layer_ops_by_category"]) == set(result["baseline_layer_by_category"])


def test_cli_table_for_bert():
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["--arch", "bert", *TINY_ARGS, "--attention", "tempo"]) == 0
    text = stdout.getvalue()
    assert "BERT L=2 h=64 a=4 s=32" in text
    assert "per layer" in text and "head (bytes)" in text and "norm" in text
    rows = text.split("bytes per token per layer:\n", 1)[1].split("\nper layer", 1)[0].splitlines()[1:]
    categories = [row.split()[0] for row in rows]
    # every row has a stock and a Tempo figure, and no row is empty on both sides
    assert {"attention", "matmul", "gelu", "norm", "dropout"} <= set(categories)
    assert all(len(row.split()) == 3 and row.split()[1:] != ["0.0", "0.0"] for row in rows), rows
    assert "attention: stock keeps" in text and "tempo keeps" in text


def test_tempo_attention_path_keeps_at_most_0_4_of_stock():
    """Softmax-dropout-matmul path, dropout 0.1: the s x s softmax output stays (one copy), the
    dropout mask and the dropped probabilities go, as do the norm/GELU inputs and hidden masks."""
    result = measure_models(parse_args([*PAPER_ARGS, "--attention", "tempo", "--dropout", "0.1"]))
    print(f"\nper token per layer: stock {result['baseline_bytes_per_token_per_layer']:,.0f} B, "
          f"tempo {result['tempo_bytes_per_token_per_layer']:,.0f} B, ratio {result['ratio']:.3f}")
    assert result["ratio"] <= 0.4


def test_flash_path_keeps_at_most_0_2_of_stock():
    """Flash path, dropout 0.1: nothing of size s x s is kept. On GPU SDPA's fused kernels run; on
    CPU, where SDPA would run its math kernel (s x s softmax and mask), recompute_attention does."""
    result = measure_models(parse_args([*PAPER_ARGS, "--attention", "flash", "--dropout", "0.1"]))
    print(f"\nper token per layer: stock {result['baseline_bytes_per_token_per_layer']:,.0f} B, "
          f"tempo {result['tempo_bytes_per_token_per_layer']:,.0f} B, ratio {result['ratio']:.3f}")
    assert result["ratio"] <= 0.2


@pytest.mark.skipif(HAS_CUDA, reason="the CUDA run is test_flash_path_keeps_at_most_0_2_of_stock")
def test_flash_path_on_cpu_keeps_nothing_quadratic_without_dropout():
    """What the CPU can show of the flash path: with dropout 0 PyTorch's CPU flash kernel runs,
    and no tensor the layer keeps grows with s x s (the largest is the [s, b, 4h] MLP activation)."""
    from tempo_ds import workload
    from tempo_ds.memory import SavedTensorLedger

    args = parse_args([*PAPER_ARGS, "--attention", "flash", "--dropout", "0"])
    seq, hidden = args.seq, args.hidden
    mu.reseed(0)
    config = workload.model_config(workload.Shape(1, hidden, args.heads), dropout=0.0)
    model = workload.build_model("gpt", config, spec="tempo", attention="flash", vocab_size=args.vocab,
                                 seq_length=seq)
    batch = workload.make_batch("gpt", 1, seq, args.vocab)
    with SavedTensorLedger(model) as ledger:
        loss = workload.loss("gpt", model, batch)
    layer = [r for r in ledger.report(loss).records if r.module.startswith("decoder.layers.")]
    assert model.decoder.layers[0].self_attention.core_attention.last_path == "flash:sdpa"
    assert max(r.nbytes for r in layer) <= seq * 4 * hidden * 4
    assert any("FlashAttention" in r.op for r in layer)
    # the CLI's figure is this ledger's: the same layer's bytes per token
    result = measure_spec("gpt", "tempo", args)
    assert result["bytes_per_token_per_layer"] == sum(r.nbytes for r in layer) / seq
    print(f"\ntempo flash path, dropout 0, CPU: {result['bytes_per_token_per_layer']:,.0f} B per token per layer")
