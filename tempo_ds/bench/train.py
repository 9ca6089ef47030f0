"""`python -m tempo_ds.bench train`: the paper's end-to-end experiment on our stack.

A megatron-core GPT-2 or BERT trains through the DeepSpeed engine (tempo_ds.initialize, the path
launch/ takes) in several variants, each in its own process (a fresh allocator, and an
out-of-memory error that cannot leak into the next variant):

    stock        megatron-core local spec
    selective    stock + Megatron selective recomputation (core attention recomputed)
    full         stock + full recomputation (every layer recomputed, uniform, 1 layer per unit)
    tempo-flash  Tempo spec, attention on the flash path (GPT; BERT's padding mask takes "auto",
                 which runs the tempo path: the path that ran is recorded)
    tempo        Tempo spec, attention on the softmax-dropout-matmul ("tempo") path

Per variant (tempo_ds.bench.train_variant): the fixed bytes, the activation bytes per sample from
the allocator and from tempo_ds.memory.SavedTensorLedger, the largest micro-batch that runs, and
the throughput (samples/s, tokens/s, MFU) at it and at the common micro-batch.
`--memory-budget 16GiB` caps the process with torch.cuda.set_per_process_memory_fraction.

Without a GPU the defaults shrink to a CPU-sized configuration (tiny model, short sequence, few
steps, the search capped) and the output says so: there the ledger bytes and their ratios are the
figures, times are not speeds and nothing runs out of memory.

Outputs in --out (tempo_ds.bench.train_report): train_<tag>.json / .csv (one row per variant),
and with matplotlib train_<tag>_memory.png (ledger bytes per sample by op category) and
train_<tag>_throughput.png (samples/s against micro-batch). `--from-json FILE` redraws the table
and plots from a JSON file. The targets the table judges are docs/results/targets.json.

This module is the command line and the driver; train_types holds the typed config and results,
train_variant measures one variant, train_report writes the outputs.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from .machine import machine_info
from .train_report import REPO, from_json, format_report, write_outputs
from .train_types import HF_VARIANTS, VARIANTS, Report, RunConfig, VariantResult, variants_for


@dataclass(frozen=True)
class Preset:
    size: str           # a key of tempo_ds.workload.SIZES[arch]
    seq: int
    vocab: int          # the real tokenizer's: it sets the size of the logits and the loss head
    common_mb: int


# GPU defaults: GPT-2 345M at s=1024 (the micro-batch of the reference figures, 8) and BERT-Large
# at s=512. The corpus is tokenized to bytes; only the vocabulary size is the real one.
GPU_PRESETS = {"gpt2": Preset("345m", 1024, 50257, 8), "bert": Preset("large", 512, 30522, 16)}
CPU_PRESETS = {"gpt2": Preset("tiny", 64, 50257, 2), "bert": Preset("tiny", 64, 30522, 2)}
CPU_STEPS, CPU_WARMUP, CPU_CAP = 3, 1, 4
GPU_STEPS, GPU_WARMUP, GPU_CAP = 4, 1, 1024


def parse_bytes(text):
    """"16GiB", "16 GB", "512MiB", "1e9" -> bytes (binary units for the *iB suffixes)."""
    if text is None:
        return None
    units = {"": 1, "b": 1, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40,
             "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12}
    s = str(text).strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):]
    if unit not in units or not number:
        raise ValueError(f"cannot read a byte count from {text!r}; e.g. 16GiB, 512MiB, 2e9")
    return int(float(number) * units[unit])


def resolve_config(args):
    """The run's RunConfig: the command line over the GPU or the CPU-sized defaults."""
    from .. import workload

    on_gpu = torch.cuda.is_available()
    framework = getattr(args, "framework", "megatron")
    if framework == "hf":
        from .train_hf_model import presets
        preset, sizes = presets(args.model, on_gpu)
    elif args.model not in GPU_PRESETS:
        raise SystemExit(f"--model {args.model!r}: one of {', '.join(GPU_PRESETS)} (or --framework hf)")
    else:
        preset = (GPU_PRESETS if on_gpu else CPU_PRESETS)[args.model]
        sizes = workload.SIZES[workload.arch_of(args.model)]
    size = args.size or preset.size
    if size not in sizes:
        raise SystemExit(f"--size {size!r} for {args.model}: one of {', '.join(sizes)}")
    shape = sizes[size]
    hidden, heads = args.hidden or shape.hidden_size, args.heads or shape.num_attention_heads
    if hidden % heads:
        raise SystemExit(f"--hidden {hidden} is not divisible by --heads {heads}")
    return RunConfig(
        model=args.model,
        size=size if not (args.layers or args.hidden or args.heads) else "custom",
        layers=args.layers or shape.num_layers, hidden=hidden, heads=heads,
        seq=args.seq_length or preset.seq,
        vocab=args.vocab_size or preset.vocab,
        common_mb=args.common_micro_batch or preset.common_mb,
        steps=args.steps or (GPU_STEPS if on_gpu else CPU_STEPS),
        warmup=args.warmup_steps if args.warmup_steps is not None else (GPU_WARMUP if on_gpu else CPU_WARMUP),
        cap=args.max_micro_batch or (GPU_CAP if on_gpu else CPU_CAP),
        memory_budget=parse_bytes(args.memory_budget),
        dropout=args.dropout, seed=args.seed, zero_stage=args.zero_stage, sweep=tuple(args.sweep or ()),
        device="cuda" if on_gpu else "cpu", cpu_sized=not on_gpu, framework=framework)


def _worker_command(config, variant, out_path):
    return [sys.executable, "-m", "tempo_ds.bench.train", "--worker", json.dumps(config.to_dict()),
            variant, out_path]


def _run_isolated(config, variant, log):
    """run_variant in a child process; returns its VariantResult, or one saying why it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
        # The child's progress lines go to our stderr as they come.
        proc = subprocess.run(_worker_command(config, variant, out_path), cwd=REPO, env=env, stdout=sys.stderr)
        if proc.returncode == 0 and os.path.exists(out_path):
            with open(out_path) as f:
                return VariantResult.from_dict(json.load(f))
    log(f"[{variant}] failed (exit status {proc.returncode}); see the lines above")
    return VariantResult(variant=variant, description=variants_for(config.framework)[variant].description,
                         error=f"worker exited with status {proc.returncode}")


def run(args, log=None):
    """All variants of args.variants; returns the Report (also written to args.out)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    config = resolve_config(args)
    if config.cpu_sized:
        log(f"no GPU: CPU-sized configuration ({config.model} L{config.layers} h{config.hidden} "
            f"s{config.seq}, {config.steps} steps, search capped at {config.cap}): the figures are "
            "ledger bytes and ratios, not speeds, and nothing runs out of memory")
    report = Report(machine_info(), config)
    known = variants_for(config.framework)
    unknown = [name for name in args.variants or () if name not in known]
    if unknown:
        raise SystemExit(f"--variants {' '.join(unknown)}: not variants of --framework {config.framework} "
                         f"({', '.join(known)})")
    for name in args.variants or known:
        t0 = time.perf_counter()
        if args.isolation == "process":
            result = _run_isolated(config, name, log)
        else:
            from .train_variant import run_variant
            result = run_variant(config, name, log)
        result.wall_s = time.perf_counter() - t0
        report.results.append(result)
        # Written after every variant, so a run stopped by a time limit keeps what it measured.
        write_outputs(report, args.out, plots=False)
    write_outputs(report, args.out, plots=not args.no_plots, log=log)
    print(format_report(report))
    return report


def positive_int(text):
    """argparse type of the size and count options: an integer >= 1 (0 would read as "default")."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_arguments(p):
    """The `train` subcommand's options (tempo_ds.bench.__main__)."""
    p.add_argument("--framework", choices=("megatron", "hf"), default="megatron",
                   help="megatron-core models, or Hugging Face transformers ones (tempo_ds.hf)")
    p.add_argument("--model", choices=("gpt2", "bert", "bert-large", "roberta-large", "roberta"), default="gpt2",
                   help="megatron: gpt2, bert; hf: bert-large, roberta-large, gpt2 (124M), bert, roberta")
    p.add_argument("--size", default=None, help="named size (tempo_ds.workload.SIZES); "
                   "default 345m / large on GPU, tiny on CPU")
    p.add_argument("--layers", type=positive_int, default=None, help="override the size's layers")
    p.add_argument("--hidden", type=positive_int, default=None, help="override the size's hidden size")
    p.add_argument("--heads", type=positive_int, default=None, help="override the size's attention heads")
    p.add_argument("--seq-length", type=positive_int, default=None, help="default 1024 GPT / 512 BERT on GPU, 64 on CPU")
    p.add_argument("--vocab-size", type=positive_int, default=None, help="default 50257 GPT / 30522 BERT")
    p.add_argument("--variants", nargs="+", default=None, choices=list(dict.fromkeys([*VARIANTS, *HF_VARIANTS])),
                   help=f"default: all of the framework's (megatron: {', '.join(VARIANTS)}; "
                        f"hf: {', '.join(HF_VARIANTS)})")
    p.add_argument("--memory-budget", default=None, help="cap the CUDA allocator, e.g. 16GiB")
    p.add_argument("--common-micro-batch", type=positive_int, default=None,
                   help="micro-batch every variant is timed at (default 8 GPT / 16 BERT, 2 on CPU)")
    p.add_argument("--max-micro-batch", type=positive_int, default=None,
                   help=f"cap of the search (default {GPU_CAP} on GPU, {CPU_CAP} on CPU)")
    p.add_argument("--steps", type=positive_int, default=None, help=f"timed steps per point (default {GPU_STEPS}, CPU {CPU_STEPS})")
    p.add_argument("--warmup-steps", type=int, default=None, help=f"untimed steps before them (default {GPU_WARMUP})")
    p.add_argument("--sweep", type=int, nargs="*", default=None,
                   help="further micro-batches to time for the throughput plot (those that fit)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None,
                   help="overrides the launch config's ZeRO stage")
    p.add_argument("--isolation", choices=("process", "none"), default="process",
                   help="each variant in its own process (default) or all in this one")
    p.add_argument("--out", default="results/bench_train", help="folder for JSON, CSV and plots")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--from-json", default=None, help="redraw table and plots from this JSON file")


def main(args):
    if args.from_json:
        from_json(args.from_json, args.out, plots=not args.no_plots)
        return 0
    report = run(args)
    return 1 if any(r.error for r in report.results) else 0


def _worker_main(argv):
    """`python -m tempo_ds.bench.train --worker CONFIG_JSON VARIANT OUT_JSON`: one variant."""
    import logging

    from .train_variant import run_variant
    # DeepSpeed and tempo_ds log through `logging`; their INFO lines would drown the progress.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    config, variant, out_path = RunConfig.from_dict(json.loads(argv[1])), argv[2], argv[3]
    result = run_variant(config, variant, lambda line: print(line, file=sys.stderr, flush=True))
    with open(out_path, "w") as f:
        json.dump(result.to_dict(), f, default=str)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[1:]))
    sys.exit("run `python -m tempo_ds.bench train`")
