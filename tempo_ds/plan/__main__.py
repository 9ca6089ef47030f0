"""python -m tempo_ds.plan: the largest micro-batch that fits, per variant (docs/plan.md).

    python -m tempo_ds.plan --model gpt2 --size 345m --seq-length 1024 --gpu-memory 80GiB --bf16
    python -m tempo_ds.plan --model bert --layers 4 --hidden 256 --heads 4 --seq-length 128 \\
        --memory-budget 4GiB --variants stock,tempo-flash --json

Prints a table headed by its inputs: per variant the activation bytes kept per sample (the
ledger's count on the meta device), the transient working set at the peak, the largest
micro-batch and the predicted peak there; then the model states and a one-line recommendation.
"""
import argparse
import contextlib
import json
import sys
import time

MiB, GiB = 2 ** 20, 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tempo_ds.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="gpt2 or bert")
    p.add_argument("--size", default=None, help="a named size (tempo_ds.workload.SIZES); default 345m / large")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--max-positions", type=int, default=None,
                   help="position table size (default: 1024 GPT-2 / 512 BERT for named sizes, else --seq-length)")
    p.add_argument("--vocab-size", type=int, default=None, help="default 50257 GPT-2 / 30522 BERT")
    p.add_argument("--gpu-memory", default=None, help="the GPU's memory, e.g. 80GiB")
    p.add_argument("--memory-budget", default=None, help="an allocator cap instead (bench train --memory-budget)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (the launch configs'); default fp32")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--zero-stage", type=int, default=1, help="ZeRO stage 0-3 (default 1, the launch configs')")
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel size: the walk builds and counts rank 0's shards (docs/plan.md)")
    p.add_argument("--variants", default=None, help="comma-separated, e.g. stock,selective,full,tempo-flash,tempo")
    p.add_argument("--framework", default="megatron", help="megatron, or hf (transformers: --model bert-large|roberta-large|gpt2|bert|roberta)")
    p.add_argument("--target-micro-batch", type=int, default=None, help="the micro-batch the recommendation aims at")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def _mib(x):
    return "-" if x is None else f"{x / MiB:,.0f}"


def format_plan(plan, seconds=None):
    """The table: inputs, one row per variant, states, recommendation."""
    i = plan.inputs
    memory = (f"allocator budget {i.memory_budget / GiB:g} GiB" if i.memory_budget is not None
              else f"GPU memory {i.gpu_memory / GiB:g} GiB")
    lines = [
        f"plan: {i.model} {i.size} L={i.layers} h={i.hidden} a={i.heads} s={i.seq} V={i.vocab} "
        f"{'bf16' if i.bf16 else 'fp32'} dropout={i.dropout} ZeRO-{i.zero_stage} dp={i.dp} tp={i.tp} {i.framework}",
        f"      {memory}, usable {plan.capacity / GiB:.2f} GiB (constants of {plan.constants.card}: context "
        f"{plan.constants.context / MiB:,.0f} MiB, reserve {plan.constants.reserve / MiB:,.0f} MiB, engine "
        f"{plan.constants.engine / MiB:,.0f} MiB)",
        f"      {plan.n_params:,} parameters; model states per rank {plan.states.total / MiB:,.0f} MiB "
        f"({plan.states.at_peak / MiB:,.0f} at the peak, before this step's gradients)"
        + (f"; DeepSpeed's estimator {plan.states.deepspeed / MiB:,.0f} MiB" if plan.states.deepspeed else ""),
        "",
        f"{'variant':<12}{'kept MiB/sample':>16}{'(head)':>9}{'transient MiB':>15}{'largest mb':>12}"
        f"{'peak MiB':>11}  recomputes",
    ]
    for v in plan.variants:
        lines.append(f"{v.variant:<12}{v.kept_per_sample / MiB:>16,.1f}{v.head_per_sample / MiB:>9,.1f}"
                     f"{_mib(v.transient_at_largest):>15}{v.largest_micro_batch:>12}{_mib(v.peak_at_largest):>11}"
                     f"  {v.recomputes}")
        if v.largest_micro_batch == 0:
            lines.append(f"{'':<12}micro-batch 1 does not fit: it needs {v.need_for_one / GiB:.2f} GiB of GPU memory")
    lines += ["", f"recommendation: {plan.recommendation}"]
    if seconds is not None:
        lines.append(f"(planned in {seconds:.1f} s on the meta device, imports not included)")
    return "\n".join(lines)


def main(argv=None):
    from .estimate import PlanError, estimate
    args = parse_args(argv)
    kwargs = dict(model=args.model, size=args.size, layers=args.layers, hidden=args.hidden, heads=args.heads,
                  seq_length=args.seq_length, vocab_size=args.vocab_size, gpu_memory=args.gpu_memory,
                  memory_budget=args.memory_budget, bf16=args.bf16, dropout=args.dropout,
                  zero_stage=args.zero_stage, dp=args.dp, tp=args.tp, framework=args.framework,
                  variants=[v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None,
                  target_micro_batch=args.target_micro_batch, max_positions=args.max_positions)
    t0 = time.perf_counter()
    try:
        # libraries log to stdout on import; stdout carries the plan only
        with contextlib.redirect_stdout(sys.stderr):
            plan = estimate(**kwargs)
    except PlanError as err:
        print(f"python -m tempo_ds.plan: error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    print(json.dumps(plan.to_dict(), default=str) if args.json else format_plan(plan, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
