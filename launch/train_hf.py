"""Train a Hugging Face BERT, RoBERTa or GPT-2 with the transformers Trainer and DeepSpeed, with
Tempo as the ds_config's "tempo" key says.

    deepspeed launch/train_hf.py --model bert-large --deepspeed configs/ds_config_hf.json
    deepspeed --num_gpus 8 launch/train_hf.py --model gpt2 --data-path data/books     # your data
    python launch/train_hf.py --model roberta-large --tiny --steps 20                 # CPU, tiny

--model: bert-large, roberta-large, gpt2 (124M), bert, roberta (base sizes), or a local folder with
a config.json (and weights, which are loaded when present); models are built from their config,
nothing is downloaded. Encoders train masked LM, GPT-2 causal LM, on the embedded corpus (byte
tokens) or --data-path: a prefix written by `python -m tempo_ds.data.preprocess`, or a text/JSONL
file. The Tempo part is tempo_ds.hf.apply(model, ...) before the Trainer is built (docs/hf.md).
Logs the swap report, then loss, tokens/s and peak memory at every --log-interval steps.
"""
import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHECKPOINTING = "activation_checkpointing"
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "ds_config_hf.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="bert-large",
                   help="bert-large, roberta-large, gpt2, bert, roberta, or a local folder with a config.json")
    p.add_argument("--size", default=None, help="a size of tempo_ds.workload.SIZES (tiny, base, large; tiny, 124m, 345m, ...)")
    p.add_argument("--tiny", action="store_true", help="--size tiny (2 layers, hidden 64): a CPU run")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None, help="default: the released model's")
    p.add_argument("--seq-length", type=int, default=None, help="default 512 (encoders) / 1024 (GPT-2) on GPU, 64 on CPU")
    p.add_argument("--micro-batch", type=int, default=None, help="per device; default 8 on GPU, 2 on CPU")
    p.add_argument("--steps", type=int, default=None, help="default 1000 on GPU, 20 on CPU")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="default: a tenth of --steps; 0 runs as 1 (DeepSpeed's WarmupDecayLR takes no 0)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--deepspeed", default=CONFIG, help="ds_config with \"auto\" values and \"tempo\"; 'none' for "
                   "the Trainer without DeepSpeed (then --tempo on/off decides)")
    p.add_argument("--tempo", choices=("config", "on", "off"), default="config",
                   help='override the config\'s "tempo" key')
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None)
    p.add_argument("--data-path", default=None, help="preprocess prefix or text/JSONL file (default: the embedded corpus)")
    p.add_argument("--output-dir", default="results/train_hf")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json-out", default=None, help="write the run's swap report and log records here")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve_config(args):
    """(TempoConfig, DeepSpeed config dict or None): the file with the command line's overrides,
    "tempo" kept in it as a user keeps it (DeepSpeed and the Trainer ignore the key), less its
    "auto" fields, which accelerate would refuse (tempo_ds.hf.trainer.deepspeed_config)."""
    from tempo_ds.deepspeed.config import TempoConfig, tempo_entry
    from tempo_ds.hf.trainer import deepspeed_config

    if args.deepspeed in (None, "none"):
        return TempoConfig(enabled=args.tempo == "on"), None
    ds_config = deepspeed_config(args.deepspeed)
    if args.tempo != "config":
        ds_config["tempo"] = args.tempo == "on"
    if args.zero_stage is not None:
        ds_config["zero_optimization"] = dict(ds_config.get("zero_optimization") or {}, stage=args.zero_stage)
    return tempo_entry(ds_config), ds_config


def main(argv=None):
    args = parse_args(argv)
    import torch

    from tempo_ds import workload
    import tempo_ds.hf as tempo_hf
    from tempo_ds.hf.trainer import build_model, corpus_dataset, throughput_callback

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    on_gpu = torch.cuda.is_available()
    tempo, ds_config = resolve_config(args)
    # Without a launcher, rank 0 of 1 (DeepSpeed would otherwise look for MPI).
    workload.hold(workload.launcher_env())
    from transformers import Trainer, TrainingArguments

    steps = args.steps or (1000 if on_gpu else 20)
    mb = args.micro_batch or (8 if on_gpu else 2)
    torch.manual_seed(args.seed)
    model, task = build_model(args.model, size="tiny" if args.tiny else args.size, layers=args.layers,
                              hidden=args.hidden, heads=args.heads, vocab_size=args.vocab_size,
                              seq_length=args.seq_length or 0, dropout=args.dropout)
    seq = args.seq_length or (64 if not on_gpu else (1024 if task == "clm" else 512))
    targs = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=mb, max_steps=steps, learning_rate=args.lr,
        # transformers 5.24 turns a 0 into DeepSpeed's smallest warm-up, 1; 5.17 passes the 0 on and
        # DeepSpeed 0.19.8 refuses it: 1 on every supported version
        warmup_steps=max(1, args.warmup_steps if args.warmup_steps is not None else steps // 10),
        weight_decay=0.01, logging_steps=args.log_interval, save_strategy="no", report_to="none",
        bf16=on_gpu, deepspeed=ds_config, seed=args.seed, disable_tqdm=True, dataloader_num_workers=0,
        # transformers 5 renamed gradient_checkpointing (still accepted, with a warning)
        **{CHECKPOINTING if CHECKPOINTING in TrainingArguments.__dataclass_fields__ else "gradient_checkpointing":
           args.gradient_checkpointing})
    rank0 = targs.process_index == 0
    say = (lambda line: print(line, flush=True)) if rank0 else (lambda line: None)

    # The one Tempo line: convert in place before the Trainer (and DeepSpeed) see the model.
    report = tempo_hf.apply(model, tempo, log=False)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"{args.model} ({type(model).__name__}, {n_params / 1e6:.1f}M parameters, {task}), seq {seq}, "
        f"micro-batch {mb}, {steps} steps, DeepSpeed {'off' if ds_config is None else 'ZeRO-%s' % ds_config.get('zero_optimization', {}).get('stage', 0)}, "
        f"tempo {'on' if tempo.enabled else 'off'}")
    say("swap report:\n  " + report.summary().replace("\n", "\n  "))

    world = targs.world_size
    num_samples = steps * mb * world * targs.gradient_accumulation_steps + 16
    token_types = getattr(model.config, "type_vocab_size", 1) > 1
    dataset, _ = corpus_dataset(task, seq, num_samples, args.seed, vocab_size=model.config.vocab_size,
                                data_path=args.data_path, token_types=token_types)
    callback = throughput_callback(mb * world * targs.gradient_accumulation_steps * seq, log=say)
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, callbacks=[callback])
    output = trainer.train()
    records = callback.records
    if records:
        last = records[-1]
        say(f"done: {output.global_step} steps, loss {records[0]['loss']:.4f} -> {last['loss']:.4f}, "
            f"last {last['tokens_per_s']:,.0f} tokens/s, peak {last['peak_memory_bytes'] / 2**20:,.0f} MiB")
    engine_stage = getattr(trainer.model_wrapped, "zero_optimization_stage", None)
    if args.json_out and rank0:
        with open(args.json_out, "w") as f:
            json.dump({"model": args.model, "task": task, "seq": seq, "micro_batch": mb, "steps": output.global_step,
                       "tempo": tempo.to_dict(), "engine": type(trainer.model_wrapped).__name__,
                       "zero_stage": engine_stage() if callable(engine_stage) else None,
                       "swapped": report.swapped, "left": report.left, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
