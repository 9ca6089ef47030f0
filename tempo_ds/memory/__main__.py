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

from . import models
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


def measure_spec(arch, spec, args):
    """Forward of one model under the ledger; returns a dict of byte counts."""
    torch.manual_seed(args.seed)
    config = models.model_config(layers=args.layers, hidden=args.hidden, heads=args.heads,
                                 dtype=models.DTYPES[args.dtype], dropout=args.dropout)
    model = models.build_model(arch, spec, config, vocab_size=args.vocab, max_seq=args.seq,
                               attention=args.attention)
    batch = models.make_batch(arch, args.batch, args.seq, args.vocab, seed=args.seed)
    with SavedTensorLedger(model) as ledger:
        loss = models.forward_loss(arch, model, batch)
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
        "loss": float(loss.detach()),
    }


def measure_models(args):
    """Both specs measured. Keys: baseline_* and tempo_* for bytes_per_token_per_layer,
    total_bytes, layers_bytes, head_bytes, layer_by_category, head_by_category, loss; ratio
    (tempo / baseline per token per layer); config (the arguments)."""
    models.init_distributed()
    out = {"config": vars(args)}
    for name, spec in (("baseline", "stock"), ("tempo", "tempo")):
        for key, value in measure_spec(args.arch, spec, args).items():
            out[f"{name}_{key}"] = value
    out["ratio"] = out["tempo_bytes_per_token_per_layer"] / out["baseline_bytes_per_token_per_layer"]
    return out


def _table(result, args):
    tokens = args.batch * args.seq
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
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tempo_ds.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=models.ARCHS, default="gpt")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=1, help="micro-batch size")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--dtype", choices=sorted(models.DTYPES), default="fp32")
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
