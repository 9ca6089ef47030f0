"""python -m tempo_ds.bench {ops,numerics,train,convergence} [options]"""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tempo_ds.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    # every subcommand's --help shows each option's default
    shown = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    from . import convergence, numerics, ops, train
    ops.add_arguments(sub.add_parser("ops", help="each Tempo op against its stock twin", **shown))
    numerics.add_arguments(sub.add_parser("numerics", help="GELU gradient error vs float64, next to PyTorch's",
                                          **shown))
    train.add_arguments(sub.add_parser(
        "train", help="GPT-2 / BERT through DeepSpeed: memory, largest batch, throughput", **shown))
    convergence.add_arguments(sub.add_parser(
        "convergence", help="loss curves, stock vs Tempo, on the embedded corpus", **shown))
    args = parser.parse_args(argv)
    if args.command == "ops":
        return ops.main(args)
    if args.command == "numerics":
        return numerics.main(args)
    if args.command == "train":
        return train.main(args)
    if args.command == "convergence":
        return convergence.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
