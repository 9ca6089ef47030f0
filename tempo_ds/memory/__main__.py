"""Ledger of a real megatron-core model: what the stock local spec and the Tempo spec keep for
backward, per op category, per token and layer.

    python -m tempo_ds.memory --arch gpt --layers 2 --hidden 256 --heads 4 --seq 128 --dtype fp32
    python -m tempo_ds.memory --arch bert ... --attention tempo --dropout 0.1 --json

Builds the GPTModel / BertModel twice from the same seed (stock local spec, Tempo spec), runs one
training-mode forward through the head (logits and loss) under SavedTensorLedger, and reports:
  per layer  bytes saved by modules inside the transformer layers / (layers x tokens);
  head       everything else: embeddings, final norm, output layer, loss.
`--json` prints one JSON object; its keys are listed in measure_models().
"""
import argparse
import contextlib
import json
import sys

import torch

from .. import workload
from .ledger import SavedTensorLedger


def _layer_prefixes():
    return ("decoder.layers.", "encoder.layers.")


def _split(report):
    """(layer records, head records) of a report."""
    layers, head = [], []
    for record in report.records:
        (layers if record.module.startswith(_layer_prefixes()) else head).append(record)
    return layers, head


def _by_category(records):
    out = {}
    for r in records:
        out[r.category] = out.get(r.category, 0) + r.nbytes
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _ops_by_category(records):
    """{category: sorted names of the autograd ops whose saves count in it}."""
    out = {}
    for r in records:
        out.setdefault(r.category, set()).add(r.op)
    return {c: sorted(ops) for c, ops in out.items()}


# What each side keeps in a category where Tempo keeps other tensors than stock code (the table's
# notes; the ops named next to them come from the measurement).
KEPT = {
    "attention": ("q, k, v + the s x s softmax output, its dropout mask and the dropped probabilities",
                  "q, k, v + the softmax output and a seed"),
    # the flash path (RecomputeAttentionFunction) in place of the tempo path's note
    "attention:flash": ("", "q, k, v + the row logsumexp and a seed, nothing s x s"),
    "gelu": ("its input", "1 branch bit per element (its output is the next Linear's input: matmul)"),
    "norm": ("its input + mean + rstd", "rstd (its output is the next Linear's input: matmul)"),
    "dropout": ("a mask (a float per element on CPU, a byte on GPU)", "an 8-byte seed"),
}


def measure_spec(arch, spec, args, device=None):
    """Forward of one model under the ledger (inside workload.distributed()); returns a dict of
    byte counts."""
    torch.manual_seed(args.seed)
    shape = workload.Shape(args.layers, args.hidden, args.heads)
    config = workload.model_config(shape, dtype=workload.DTYPES[args.dtype], dropout=args.dropout)
    model = workload.build_model(arch, config, spec=spec, attention=args.attention,
                                 vocab_size=args.vocab, seq_length=args.seq, device=device)
    batch = workload.make_batch(arch, args.batch, args.seq, args.vocab, seed=args.seed, device=device)
    with SavedTensorLedger(model) as ledger:
        loss = workload.loss(arch, model, batch)
    report = ledger.report(loss)
    layer_records, head_records = _split(report)
    tokens = args.batch * args.seq
    layer_bytes = sum(r.nbytes for r in layer_records)
    return {
        "total_bytes": report.total_bytes,
        "layers_bytes": layer_bytes,
        "head_bytes": sum(r.nbytes for r in head_records),
        "bytes_per_token_per_layer": layer_bytes / (args.layers * tokens),
        "layer_by_category": _by_category(layer_records),
        "head_by_category": _by_category(head_records),
        "layer_ops_by_category": _ops_by_category(layer_records),
        "loss": float(loss.detach()),
    }


def measure_models(args):
    """Both specs measured. Keys: baseline_* and tempo_* for bytes_per_token_per_layer,
    total_bytes, layers_bytes, head_bytes, layer_by_category, head_by_category, loss; ratio
    (tempo / baseline per token per layer); config (the arguments)."""
    out = {"config": vars(args)}
    with workload.distributed() as device:
        for name, spec in (("baseline", "stock"), ("tempo", "tempo")):
            for key, value in measure_spec(args.arch, spec, args, device).items():
                out[f"{name}_{key}"] = value
    out["ratio"] = out["tempo_bytes_per_token_per_layer"] / out["baseline_bytes_per_token_per_layer"]
    return out


def _table(result, args):
    tokens = args.batch * args.seq
    # one row per op category, the same rows for both (a category one side lacks shows 0)
    cats = list(dict.fromkeys(list(result["baseline_layer_by_category"]) +
                              list(result["tempo_layer_by_category"])))
    scale = args.layers * tokens
    lines = [
        f"{args.arch.upper()} L={args.layers} h={args.hidden} a={args.heads} s={args.seq} "
        f"b={args.batch} {args.dtype} dropout={args.dropout} attention={args.attention} "
        f"(torch {torch.__version__}, {'cuda' if torch.cuda.is_available() else 'cpu'})",
        "saved for backward inside the layers, bytes per token per layer:",
        f"{'category':<14}{'stock':>14}{'tempo':>14}",
    ]
    for c in cats:
        b = result["baseline_layer_by_category"].get(c, 0) / scale
        t = result["tempo_layer_by_category"].get(c, 0) / scale
        lines.append(f"{c:<14}{b:>14,.1f}{t:>14,.1f}")
    lines += [
        f"{'per layer':<14}{result['baseline_bytes_per_token_per_layer']:>14,.1f}"
        f"{result['tempo_bytes_per_token_per_layer']:>14,.1f}   ratio {result['ratio']:.3f}",
        f"{'head (bytes)':<14}{result['baseline_head_bytes']:>14,}{result['tempo_head_bytes']:>14,}",
        f"{'total (bytes)':<14}{result['baseline_total_bytes']:>14,}{result['tempo_total_bytes']:>14,}",
    ]
    return "\n".join(lines + _notes(result, cats))


def _notes(result, cats):
    """One note per category in which Tempo keeps other tensors than stock code (other ops save
    them): what each side keeps, with the ops that saved it in this run."""
    stock_ops = result.get("baseline_layer_ops_by_category", {})
    tempo_ops = result.get("tempo_layer_ops_by_category", {})
    notes = []
    for c in cats:
        if stock_ops.get(c, []) == tempo_ops.get(c, []):
            continue
        stock_kept, tempo_kept = KEPT.get(c, ("", ""))
        if c == "attention" and "RecomputeAttentionFunction" in tempo_ops.get(c, []):
            tempo_kept = KEPT["attention:flash"][1]
        stock = ", ".join(stock_ops.get(c, [])) or "nothing"
        tempo = ", ".join(tempo_ops.get(c, [])) or "nothing"
        notes.append(f"  {c}: stock keeps {stock_kept + ' ' if stock_kept else ''}({stock}); "
                     f"tempo keeps {tempo_kept + ' ' if tempo_kept else ''}({tempo})")
    return ["same kind, other tensors kept (the ops that saved them in parentheses):", *notes] if notes else []


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tempo_ds.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=workload.ARCHS, default="gpt")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=1, help="micro-batch size")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--dtype", choices=sorted(workload.DTYPES), default="fp32")
    p.add_argument("--attention", choices=("auto", "flash", "tempo"), default="auto",
                   help="TempoCoreAttention path of the Tempo spec")
    p.add_argument("--dropout", type=float, default=0.1,
                   help="hidden and attention dropout (training setting; 0 removes the masks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Libraries imported on the way (DeepSpeed's accelerator probe) log to stdout; keep stdout
    # for the result so that --json prints exactly one JSON object.
    with contextlib.redirect_stdout(sys.stderr):
        result = measure_models(args)
    print(json.dumps(result, sort_keys=True) if args.json else _table(result, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
