"""`python -m tempo_ds.bench convergence`: does Tempo train like the stock model?

A small GPT-2 and a small BERT train on the embedded corpus (tempo_ds.data) through
tempo_ds.initialize, three times each from the same initial weights and data:

    stock          the local spec, dropout stream from --seed
    tempo          Tempo as `"tempo": true` gives it, same seeds
    stock (seed')  the local spec again, dropout stream from --seed + 1

Tempo draws its dropout masks differently (a Philox seed, not torch.bernoulli_), so its loss
cannot match the stock loss bit for bit; the question is whether it moves away from the stock
curve more than a change of dropout seed moves the stock model. The command prints, per model,
the largest per-step |stock - tempo| next to the largest per-step |stock - stock(seed')|, plots
the curves (convergence_<model>.png) and writes convergence.json. Defaults take a few minutes on
two CPU cores.
"""
import json
import os
import sys

from .. import workload
from .machine import header, json_safe, machine_info
from .train_model import Batches, build_engine, train_step
from .train_types import Variant

RUNS = (
    # (label, variant, dropout-seed offset)
    ("stock", Variant("stock", "megatron-core local spec"), 0),
    ("tempo", Variant("tempo", "Tempo, as \"tempo\": true", tempo=True), 0),
    ("stock (other dropout seed)", Variant("stock", "megatron-core local spec"), 1),
)


def train_losses(model, variant, steps, micro_batch, seq, size, seed, dropout_seed, dropout, device):
    """Losses of `steps` optimizer steps of a fresh model of `variant`; weights and data from
    `seed`, dropout masks from `dropout_seed`."""
    from ..data import ByteTokenizer

    shape = workload.shape_of(workload.arch_of(model), size)
    # The byte tokenizer's own vocabulary: a small model's head stays small.
    vocab = ByteTokenizer().vocab_size
    cfg = {"model": model, "layers": shape.num_layers, "hidden": shape.hidden_size,
           "heads": shape.num_attention_heads, "seq": seq, "vocab": vocab, "dropout": dropout,
           "common_mb": micro_batch}
    engine, _, _ = build_engine(cfg, variant, device, init_seed=seed)
    data = Batches(model, seq, vocab, seed, device)
    losses = []
    for step in range(steps):
        workload.reseed(dropout_seed, step)
        losses.append(float(train_step(engine, model, data.get(step, micro_batch))))
    return losses


def compare(model, device, steps=60, micro_batch=4, seq=128, size="tiny", seed=1234, dropout=0.1,
            log=print):
    """The three runs of RUNS for `model` ("gpt2" or "bert") on `device`, inside
    workload.distributed(). Returns a dict with the curves ({label: losses}), max_diff_tempo
    (largest per-step |stock - tempo|) and max_diff_seed (largest per-step |stock - stock(seed')|)."""
    curves = {}
    for label, variant, offset in RUNS:
        curves[label] = train_losses(model, variant, steps, micro_batch, seq, size, seed, seed + offset,
                                     dropout, device)
        log(f"  {model} {label:<28} loss {curves[label][0]:.4f} -> {curves[label][-1]:.4f}")
    stock = curves["stock"]

    def max_diff(other):
        return max(abs(a - b) for a, b in zip(stock, other))

    return {"model": model, "size": size, "seq": seq, "micro_batch": micro_batch, "steps": steps,
            "seed": seed, "dropout": dropout, "curves": curves,
            "max_diff_tempo": max_diff(curves["tempo"]),
            "max_diff_seed": max_diff(curves["stock (other dropout seed)"])}


def _size_names():
    return sorted(set().union(*workload.SIZES.values()))


def add_arguments(p):
    """The options of `python -m tempo_ds.bench convergence` (shown with their defaults by --help)."""
    p.add_argument("--models", nargs="+", choices=("gpt2", "bert"), default=["gpt2", "bert"],
                   help="models to train, each stock and with Tempo")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-length", type=int, default=128, help="tokens per sequence")
    p.add_argument("--size", default="tiny", choices=_size_names(),
                   help="a named size of tempo_ds.workload.SIZES that every model of --models has")
    p.add_argument("--seed", type=int, default=1234,
                   help="seed of the weights, the data and dropout (the second stock run draws its "
                        "dropout from seed + 1)")
    p.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout probability")
    p.add_argument("--out", default="results/bench_convergence", help="folder for JSON and plots")


def main(args):
    import logging
    logging.getLogger("tempo_ds").setLevel(logging.WARNING)
    from . import plots

    for model in args.models:
        sizes = workload.SIZES[workload.arch_of(model)]
        if args.size not in sizes:
            raise SystemExit(f"--size {args.size}: {model} has the sizes {', '.join(sizes)}")

    info = machine_info()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    results = []
    with workload.launcher_env(), workload.distributed() as device:
        for model in args.models:
            log(f"{model}: {args.steps} steps, micro-batch {args.micro_batch}, seq {args.seq_length}")
            results.append(compare(model, device, args.steps, args.micro_batch, args.seq_length,
                                   args.size, args.seed, args.dropout, log))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "convergence.json"), "w") as f:
        json.dump(json_safe({"machine": info, "results": results}), f, indent=1)
    print(header(info))
    print(f"{'model':<8}{'steps':>6}{'final stock':>13}{'final tempo':>13}"
          f"{'max |stock-tempo|':>19}{'max |stock-stock(seed+1)|':>27}")
    for r in results:
        c = r["curves"]
        print(f"{r['model']:<8}{r['steps']:>6}{c['stock'][-1]:>13.4f}{c['tempo'][-1]:>13.4f}"
              f"{r['max_diff_tempo']:>19.4f}{r['max_diff_seed']:>27.4f}")
        path = os.path.join(args.out, f"convergence_{r['model']}.png")
        title = (f"{r['model']} {r['size']} s{r['seq']} mb{r['micro_batch']}, seed {r['seed']}: stock vs Tempo\n"
                 f"{info.get('gpu') or 'CPU'}, torch {info['torch']}, git {info['git_sha']}")
        if plots.loss_curves(c, path, title):
            print(f"wrote {path}")
        else:
            print(plots.MISSING)
    print("per-step differences: Tempo against stock, next to stock against itself with another "
          "dropout seed (the spread Tempo's own dropout stream is judged by)")
    return 0
