"""Train a megatron-core GPT-2 or BERT through the DeepSpeed engine, with Tempo as ds_config says.

    python -m tempo_ds.training.train --model gpt2 --size tiny --steps 50     # one process
    deepspeed --num_gpus 2 -m tempo_ds.training.train --model bert ...        # any launcher
    bash launch/train_gpt2.sh / deepspeed launch/train_gpt2.sh                # docs/launch.md

The model, its batches, its loss and the process group come from tempo_ds.workload. Everything
Tempo-specific sits in tempo_ds.initialize (called instead of deepspeed.initialize) and in the
choice of layer spec (spec_for); the loop is an ordinary DeepSpeed loop.

Which spec: with every kind of ds_config's "tempo" on (the default of `"tempo": true`), the Tempo
spec; with some kinds off, or "attention": "stock", the stock local spec, of which
tempo_ds.initialize swaps the kinds that are on; with Tempo off, the stock spec. Either way the
parameters, their names and their initial values are the same, so stock and Tempo runs with the
same seed start from the same model and their checkpoints load into each other.

Reproducibility: sample i of the dataset depends only on (seed, i), and the RNG is reseeded from
(seed, step, data-parallel rank) at every step, so a run resumed from a checkpoint at step k
continues the loss trajectory of the uninterrupted run exactly (tests/test_deepspeed_train.py,
test_resume_continues_trajectory).
"""
import argparse
import dataclasses
import json
import logging
import os
import resource
import sys
import time
from dataclasses import field

import torch

from tempo_ds import workload
from tempo_ds._shipped import shipped_dir

logger = logging.getLogger("tempo_ds")

CONFIGS = shipped_dir("configs")
DEFAULT_CONFIGS = {"gpt2": str(CONFIGS / "ds_config_gpt2.json"), "bert": str(CONFIGS / "ds_config_bert.json")}
DEFAULT_SIZES = {"gpt": ("tiny", "124m"), "bert": ("tiny", "base")}  # (CPU, GPU)


def _micro_batch(text):
    """--micro-batch: a positive integer or "auto"."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=("gpt2", "bert"), default="gpt2")
    p.add_argument("--size", default=None,
                   help="gpt2: tiny/124m/345m/774m/1.5b; bert: tiny/base/large "
                        "(default: tiny on CPU, 124m / base on GPU)")
    p.add_argument("--seq-length", type=int, default=None, help="default: 128 on CPU, 1024 GPT / 512 BERT on GPU")
    p.add_argument("--micro-batch", type=_micro_batch, default=None,
                   help="overrides train_micro_batch_size_per_gpu of the config; 'auto': the largest "
                        "that tempo_ds.plan predicts fits the visible GPU")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 60 on CPU, 1000 on GPU)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--data-path", default=None,
                   help="prefix of a Megatron indexed dataset (.bin/.idx); default: the embedded corpus")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary of --data-path when not tokenized with the byte tokenizer")
    p.add_argument("--special-ids", default="",
                   help="ids of special tokens of --data-path, e.g. eod=50256 or cls=101,sep=102,mask=103,pad=0")
    p.add_argument("--config", default=None, help="DeepSpeed JSON config (default: configs/ds_config_<model>.json)")
    p.add_argument("--tempo", choices=("config", "on", "off"), default="config",
                   help='override the config\'s "tempo" key (compare runs without editing the file)')
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None,
                   help="overrides zero_optimization.stage of the config")
    p.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout")
    p.add_argument("--no-nsp", dest="nsp", action="store_false", help="BERT: masked LM only")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--save", default=None, help="DeepSpeed checkpoint folder")
    p.add_argument("--save-interval", type=int, default=0, help="also save every N steps (0: only at the end)")
    p.add_argument("--load", default=None, help="resume from the latest checkpoint in this folder")
    p.add_argument("--resume", action="store_true", help="resume from --save if it holds a checkpoint")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--no-summary", dest="summary", action="store_false",
                   help="skip the end-of-run activation-bytes comparison")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


@dataclasses.dataclass
class Result:
    """What a run did; rank 0's view (losses are averaged over data-parallel ranks)."""
    losses: list = field(default_factory=list)
    start_step: int = 0
    steps: int = 0
    tokens_per_s: float = 0.0
    peak_memory_bytes: int = 0
    tempo: dict = field(default_factory=dict)
    spec: str = "stock"
    activation_bytes: dict = field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """A run as the command line and the machine resolve it: `args` as parsed (never modified),
    and what is derived from them."""
    args: argparse.Namespace
    arch: str            # "gpt" or "bert"
    size: str            # a key of workload.SIZES[arch]
    seq_length: int
    steps: int
    on_cpu: bool
    ds_config: dict      # the file with the command line's overrides, without "tempo"
    tempo: object        # TempoConfig, parsed once from the file's "tempo"
    bf16: bool


def resolve(args):
    """The TrainJob of `args`: machine-dependent defaults filled in, the "tempo" key validated
    before anything slow happens."""
    from tempo_ds.deepspeed.config import split_config

    on_cpu = not torch.cuda.is_available()
    arch = workload.arch_of(args.model)
    size = args.size or DEFAULT_SIZES[arch][0 if on_cpu else 1]
    workload.shape_of(arch, size)  # an unknown --size fails here, before anything slow
    if args.micro_batch == "auto":
        args.micro_batch = _auto_micro_batch(args, arch, size, on_cpu)
    # The one parse of "tempo": the TempoConfig is handed down, DeepSpeed gets the rest.
    tempo, ds_config = split_config(build_ds_config(args, on_cpu))
    return TrainJob(
        args=args, arch=arch, size=size,
        seq_length=args.seq_length or (128 if on_cpu else (1024 if arch == "gpt" else 512)),
        steps=args.steps if args.steps is not None else (60 if on_cpu else 1000),
        on_cpu=on_cpu, ds_config=ds_config, tempo=tempo,
        bf16=bool(ds_config.get("bf16", {}).get("enabled")))


def _auto_micro_batch(args, arch, size, on_cpu):
    """--micro-batch auto: tempo_ds.plan's answer for the visible GPU (None on CPU: the config's)."""
    from tempo_ds.deepspeed.config import split_config
    from tempo_ds.plan.auto import auto_micro_batch

    probe = argparse.Namespace(**dict(vars(args), micro_batch=None))
    tempo, ds_config = split_config(build_ds_config(probe, on_cpu))
    seq = args.seq_length or (128 if on_cpu else (1024 if arch == "gpt" else 512))
    return auto_micro_batch(args.model, size, seq, tempo, ds_config.get("zero_optimization", {}).get("stage", 0),
                            bool(ds_config.get("bf16", {}).get("enabled")), tp=args.tp, vocab_size=args.vocab_size,
                            dropout=args.dropout, say=_say)


def spec_for(tempo):
    """The layer spec ("tempo" or "stock") the trainer builds for a TempoConfig (module
    docstring): the Tempo spec only when it covers every kind that is on."""
    everything = (tempo.enabled and tempo.gelu and tempo.layernorm and tempo.dropout
                  and tempo.attention != "stock")
    return "tempo" if everything else "stock"


def _say(message):
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


def build_ds_config(args, on_cpu):
    """The config dict for this run: the file, then the command line's overrides."""
    from tempo_ds.deepspeed.config import load_ds_config

    ds_config = load_ds_config(args.config or DEFAULT_CONFIGS[args.model])
    if args.tempo != "config":
        ds_config["tempo"] = args.tempo == "on"
    if args.micro_batch is not None:
        # The override keeps the accumulation steps and lets the global batch follow, which
        # DeepSpeed derives once train_batch_size is gone. A file that fixes the global batch
        # without the accumulation steps leaves no way to keep both.
        if "train_batch_size" in ds_config and "gradient_accumulation_steps" not in ds_config:
            raise ValueError(
                f"--micro-batch {args.micro_batch} overrides train_micro_batch_size_per_gpu, but the config "
                f"fixes train_batch_size ({ds_config['train_batch_size']}) without gradient_accumulation_steps; "
                "set gradient_accumulation_steps in the config, or drop --micro-batch")
        ds_config["train_micro_batch_size_per_gpu"] = args.micro_batch
        ds_config.pop("train_batch_size", None)
    if args.zero_stage is not None:
        ds_config.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    if on_cpu:
        for key in ("bf16", "fp16"):
            if ds_config.get(key, {}).get("enabled"):
                _say(f"tempo_ds: no GPU: {key} turned off, training in float32 on CPU")
                ds_config[key] = {"enabled": False}
    return ds_config


def batch_geometry(ds_config, dp):
    """(micro-batch per GPU, gradient accumulation steps) as DeepSpeed derives them from the
    config's train_batch_size, train_micro_batch_size_per_gpu and gradient_accumulation_steps
    (any two of them, or one) and the data-parallel size. Inconsistent values are left to
    DeepSpeed's own check."""
    tbs = ds_config.get("train_batch_size")
    mb = ds_config.get("train_micro_batch_size_per_gpu")
    gas = ds_config.get("gradient_accumulation_steps")
    if mb is None and gas is None and tbs is None:
        raise ValueError("the config sets none of train_batch_size, train_micro_batch_size_per_gpu "
                         "and gradient_accumulation_steps")
    if mb is None:
        if tbs is None:
            raise ValueError("gradient_accumulation_steps alone does not give a batch size; set "
                             "train_micro_batch_size_per_gpu or train_batch_size")
        mb = tbs // (dp * (gas or 1))
    if gas is None:
        gas = tbs // (mb * dp) if tbs is not None else 1
    return mb, gas


def _data(job, num_samples, device):
    """(tokenizer, dataset) of the run: --data-path (its sidecar names the tokenizer) or the
    embedded corpus. A bad --data-path stops every rank with one message printed by rank 0."""
    from tempo_ds.data import DataError, check_prefix, default_prefix, index_cache_dir, load_prefix_tokenizer
    from tempo_ds.data import parse_special_ids
    from tempo_ds.data.datasets import MLMDataset, gpt_dataset

    args = job.args
    error = ""
    try:
        # the sidecar's tokenizer (the byte tokenizer without one); --vocab-size/--special-ids override it
        tokenizer = load_prefix_tokenizer(args.data_path, args.vocab_size, parse_special_ids(args.special_ids))
        if args.data_path is not None and torch.distributed.get_rank() == 0:
            check_prefix(args.data_path, tokenizer.vocab_size, job.arch)
    except DataError as err:
        error = str(err)
    # every rank learns whether rank 0 (or any rank) found a problem, so none of them hangs
    # on the run's device: an NCCL group reduces CUDA tensors only
    failed = torch.tensor([int(bool(error))], device=device)
    torch.distributed.all_reduce(failed)
    if failed.item():
        if error:
            print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    if args.data_path is not None:
        prefix = args.data_path
    elif int(os.environ.get("LOCAL_RANK", "0")) == 0:
        prefix = default_prefix(job.arch, tokenizer)
    else:
        prefix = None
    if args.data_path is None:
        # Local rank 0 writes the corpus' indexed dataset on first use; the others wait for it.
        torch.distributed.barrier()
        prefix = prefix or default_prefix(job.arch, tokenizer)
    if job.arch == "gpt":
        dataset = gpt_dataset(prefix, tokenizer, job.seq_length, num_samples, args.seed, index_cache_dir(prefix))
    else:
        dataset = MLMDataset(prefix, tokenizer, job.seq_length, num_samples, args.seed, nsp=args.nsp)
    return tokenizer, dataset


def _batch(dataset, step, micro, gas, mb, device):
    """Micro-batch `micro` of optimizer step `step` for this data-parallel rank."""
    from megatron.core import parallel_state as ps

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    first = ((step * gas + micro) * dp + rank) * mb
    items = [dataset[(first + j) % len(dataset)] for j in range(mb)]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]).to(device) for k in items[0]}


def _peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # ru_maxrss is in KiB on Linux: the process' peak resident set, parameters and all.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _latest_checkpoint(folder):
    return folder is not None and os.path.isfile(os.path.join(folder, "latest"))


def build_model(job, tempo, vocab_size, device=None):
    """The run's model in the spec `tempo` (a TempoConfig) calls for; returns (model, spec)."""
    spec = spec_for(tempo)
    config = workload.model_config(
        workload.shape_of(job.arch, job.size), tp=job.args.tp, dropout=job.args.dropout,
        dtype=torch.bfloat16 if job.bf16 else torch.float32, cpu_init=job.on_cpu)
    model = workload.build_model(job.arch, config, spec=spec, attention=tempo.attention,
                                 vocab_size=vocab_size, seq_length=job.seq_length,
                                 nsp=job.args.nsp, device=device)
    return model, spec


def activation_bytes(job, vocab_size, batch, device):
    """Bytes autograd keeps for one forward of the stock spec and of the Tempo model, as
    tempo_ds.memory.SavedTensorLedger counts them (parameters excluded, storages deduplicated)."""
    from tempo_ds.deepspeed.apply import swap_model
    from tempo_ds.deepspeed.config import TempoConfig
    from tempo_ds.memory import SavedTensorLedger

    out = {}
    for name, cfg in (("stock", TempoConfig.disabled()),
                      ("tempo", job.tempo if job.tempo.enabled else TempoConfig())):
        torch.manual_seed(job.args.seed)
        # float32 whatever the run's dtype, so that the summaries of fp32 and bf16 runs compare.
        model, _ = build_model(dataclasses.replace(job, bf16=False), cfg, vocab_size)
        if cfg.enabled:
            swap_model(model, cfg, log=False)
        model.to(device).train()
        with SavedTensorLedger(model) as ledger:
            loss = workload.loss(job.arch, model, batch)
        out[name] = ledger.report(loss).total_bytes
        del model, loss, ledger
    return out


def run(args):
    """Train as `args` says; returns a Result (meaningful on every rank, printed by rank 0)."""
    job = resolve(args)
    with workload.launcher_env(), workload.distributed(tp=args.tp) as device:
        return _train(job, device)


def _train(job, device):
    from megatron.core import parallel_state as ps

    import tempo_ds
    from tempo_ds.deepspeed.mpu import MegatronMPU

    args, tempo, bf16 = job.args, job.tempo, job.bf16
    workload.reseed(args.seed, 0)
    dp = ps.get_data_parallel_world_size()
    mb, gas = batch_geometry(job.ds_config, dp)
    tokenizer, dataset = _data(job, max(1, job.steps * gas * dp * mb), device)

    torch.manual_seed(args.seed)
    model, spec = build_model(job, tempo, tokenizer.vocab_size)
    engine, _, _, _ = tempo_ds.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=job.ds_config, mpu=MegatronMPU(), tempo=tempo)
    if (engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()) != (mb, gas):
        raise RuntimeError(
            f"DeepSpeed runs micro-batch {engine.train_micro_batch_size_per_gpu()} x accumulation "
            f"{engine.gradient_accumulation_steps()}, the trainer's data was cut for {mb} x {gas}")

    result = Result(tempo=tempo.to_dict(), spec=spec)
    load_from = args.load or (args.save if args.resume and _latest_checkpoint(args.save) else None)
    if load_from:
        path, client_state = engine.load_checkpoint(load_from)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {load_from}")
        result.start_step = client_state["step"]
        _say(f"tempo_ds: resumed from {path} at step {result.start_step}")

    n_params = sum(p.numel() for p in model.parameters())
    _say(f"tempo_ds: {args.model} {job.size} ({n_params / 1e6:.2f}M params per TP rank), "
         f"seq {job.seq_length}, micro-batch {mb} x accumulation {gas} x DP {dp}, TP {args.tp}, "
         f"ZeRO {engine.zero_optimization_stage()}, {'bf16' if bf16 else 'fp32'} on {device.type}; "
         f"Tempo {'ON' if tempo.enabled else 'OFF'} ({spec} spec){' ' + json.dumps(tempo.to_dict()) if tempo.enabled else ''}")

    tokens_per_step = job.seq_length * mb * gas * dp
    timed_tokens, timed_s = 0, 0.0
    for step in range(result.start_step, job.steps):
        workload.reseed(args.seed, step)
        t0 = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        for micro in range(gas):
            loss = workload.loss(job.arch, engine, _batch(dataset, step, micro, gas, mb, device))
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().float() / gas
        torch.distributed.all_reduce(step_loss, group=ps.get_data_parallel_group())
        step_loss = step_loss.item() / dp
        elapsed = time.perf_counter() - t0
        # The first step pays for lazy initialization; tokens/s leaves it out.
        if step > result.start_step:
            timed_tokens, timed_s = timed_tokens + tokens_per_step, timed_s + elapsed
        result.losses.append(step_loss)
        if (step + 1) % args.log_interval == 0 or step + 1 == job.steps or step == result.start_step:
            _say(f"step {step + 1:6d}/{job.steps} | loss {step_loss:.4f} | "
                 f"{tokens_per_step / elapsed:,.0f} tokens/s | peak mem {_peak_memory(device) / 2**20:,.0f} MiB"
                 f"{' (RSS)' if device.type == 'cpu' else ''} | tempo {'on' if tempo.enabled else 'off'}")
        if args.save and args.save_interval and (step + 1) % args.save_interval == 0 and step + 1 < job.steps:
            engine.save_checkpoint(args.save, tag=f"global_step{step + 1}", client_state={"step": step + 1})
    result.steps = job.steps - result.start_step
    if args.save and result.steps:
        engine.save_checkpoint(args.save, tag=f"global_step{job.steps}", client_state={"step": job.steps})
        _say(f"tempo_ds: saved DeepSpeed checkpoint to {args.save} (tag global_step{job.steps})")
    result.tokens_per_s = timed_tokens / timed_s if timed_s else 0.0
    result.peak_memory_bytes = _peak_memory(device)

    if args.summary:
        batch = _batch(dataset, 0, 0, gas, mb, device)
        del engine, model
        result.activation_bytes = activation_bytes(job, tokenizer.vocab_size, batch, device)
        _summary(result)
    return result


def _summary(result):
    stock, ours = result.activation_bytes["stock"], result.activation_bytes["tempo"]
    final = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    _say("\n".join([
        "=" * 72,
        f"summary: {result.steps} steps (from step {result.start_step}), final loss {final}, "
        f"{result.tokens_per_s:,.0f} tokens/s, peak memory {result.peak_memory_bytes / 2**20:,.0f} MiB",
        f"Tempo {'ON' if result.tempo.get('enabled') else 'OFF'} ({result.spec} spec)",
        f"activations saved for backward, one micro-batch, per rank: stock spec {stock:,} bytes, "
        f"Tempo {ours:,} bytes ({100 * (1 - ours / stock):.1f}% less)" if stock else "",
        "=" * 72,
    ]))


def main(argv=None):
    args = parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING, format="%(message)s",
                        stream=sys.stdout)
    run(args)


if __name__ == "__main__":
    main()
