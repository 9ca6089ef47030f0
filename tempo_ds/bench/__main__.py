"""python -m tempo_ds.bench {ops,numerics,train,convergence} [options]"""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tempo_ds.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    p_ops = sub.add_parser("ops", help="each Tempo op against its stock twin")
    p_ops.add_argument("--only", nargs="*", choices=["gelu", "norm", "dropout", "attention"],
                       help="case groups (default: all)")
    p_ops.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p_ops.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p_ops.add_argument("--size", default=None, choices=["small", "large"])
    p_ops.add_argument("--reps", type=int, default=None)
    p_ops.add_argument("--json", default="bench_ops.json", help="where to write the results ('' for none)")
    sub.add_parser("numerics", help="GELU gradient error vs float64, next to PyTorch's")
    from . import convergence, train
    train.add_arguments(sub.add_parser("train", help="GPT-2 / BERT through DeepSpeed: memory, largest batch, throughput"))
    convergence.add_arguments(sub.add_parser("convergence", help="loss curves, stock vs Tempo, on the embedded corpus"))
    args = parser.parse_args(argv)
    if args.command == "ops":
        from . import ops
        return ops.main(args)
    if args.command == "numerics":
        from . import numerics
        return numerics.main(args)
    if args.command == "train":
        return train.main(args)
    if args.command == "convergence":
        return convergence.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
