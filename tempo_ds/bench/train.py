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

For each variant, on a GPU:
  fixed bytes       allocated after a warm-up step with the gradients of a second backward still
                    alive and no activations: parameters, gradients, optimizer state;
  activation bytes  per sample at the common micro-batch, from the allocator ((peak - fixed) / mb)
                    and from tempo_ds.memory.SavedTensorLedger (one forward), side by side;
  largest micro-batch  found by running the step (search.largest_fitting), with its peak;
  throughput        samples/s, tokens/s and model FLOPs utilisation at the largest micro-batch and
                    at the common one; the losses of the timed steps at the common micro-batch
                    (taken first, from the same weights and data in every variant).
`--memory-budget 16GiB` caps the process with torch.cuda.set_per_process_memory_fraction.

Without a GPU the defaults shrink to a CPU-sized configuration (tiny model, short sequence, few
steps, the search capped) and the output says so: there the ledger bytes and their ratios are the
figures, times are not speeds and nothing runs out of memory.

Outputs in --out: train_<tag>.json / .csv (one row per variant), and with matplotlib
train_<tag>_memory.png (ledger bytes per sample by op category) and train_<tag>_throughput.png
(samples/s against micro-batch). `--from-json FILE` redraws the table and plots from a JSON file.
"""
import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from .machine import header, json_safe, machine_info, synchronize

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 2 ** 20


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    tempo: object = False        # the ds_config "tempo" value
    recompute: str = None        # None, "selective" or "full"


VARIANTS = {v.name: v for v in (
    Variant("stock", "megatron-core local spec"),
    Variant("selective", "stock + selective recomputation", recompute="selective"),
    Variant("full", "stock + full recomputation", recompute="full"),
    Variant("tempo-flash", "Tempo spec, flash attention", tempo={"attention": "flash"}),
    Variant("tempo", "Tempo spec, softmax-dropout-matmul attention", tempo={"attention": "tempo"}),
)}


@dataclass(frozen=True)
class Preset:
    size: str           # a key of tempo_ds.training.models.SIZES[model]
    seq: int
    vocab: int          # the real tokenizer's: it sets the size of the logits and the loss head
    common_mb: int


# GPU defaults: GPT-2 345M at s=1024 (the micro-batch of the reference figures, 8) and BERT-Large
# at s=512. The corpus is tokenized to bytes; only the vocabulary size is the real one.
GPU_PRESETS = {"gpt2": Preset("345m", 1024, 50257, 8), "bert": Preset("large", 512, 30522, 16)}
CPU_PRESETS = {"gpt2": Preset("tiny", 64, 50257, 2), "bert": Preset("tiny", 64, 30522, 2)}
CPU_STEPS, CPU_WARMUP, CPU_CAP = 3, 1, 4
GPU_STEPS, GPU_WARMUP, GPU_CAP = 4, 1, 1024

# Dense bf16 tensor-core peak in TFLOP/s, by a substring of torch.cuda.get_device_name(); the
# first match wins, so the more specific names come first. Sources: NVIDIA data sheets.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
)


def bf16_peak_flops(device_name):
    """Dense bf16 peak FLOP/s of a GPU by name, or None when the table does not know it."""
    for key, tflops in BF16_PEAK_TFLOPS:
        if device_name and key in device_name:
            return tflops * 1e12
    return None


def flops_per_token(n_params, layers, hidden, seq):
    """Model FLOPs of one token, forward and backward: 6 N (every parameter in one multiply-add
    forward and two backward; the tied word embedding stands for the output layer's GEMM) plus
    12 L h s for the attention scores and their product with V (PaLM, appendix B). Recomputation
    is not counted: this is model, not hardware, FLOPs utilisation."""
    return 6 * n_params + 12 * layers * hidden * seq


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


# -- model, engine, data -------------------------------------------------------------------------
def setup_distributed():
    """One process, TP=1: DeepSpeed's process group and megatron's parallel state (once per
    process). Returns the device."""
    import deepspeed
    from megatron.core import parallel_state as ps

    from ..megatron.cpu import enable_cpu
    from ..training.train import _single_process_defaults

    _single_process_defaults()
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        enable_cpu()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
    if on_cpu:
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


# Fields TransformerConfig.__post_init__ derives from the shape when they are None; a config
# copied to another shape must have them derived again.
_DERIVED_FIELDS = ("kv_channels", "num_query_groups", "init_method", "output_layer_init_method",
                   "embedding_init_method", "embedding_init_method_std")


def _recompute_settings(recompute):
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    return {}


def build_model(model, layers, hidden, heads, seq, vocab, variant, dropout, bf16, on_cpu, nsp=True):
    """The GPTModel / BertModel of `variant` at any shape.

    tempo_ds.training.models.build_model takes named sizes and no recomputation settings, so the
    config comes from its transformer_config (the same fusion switches as launch/) copied to this
    shape, and the spec is the variant's. Returns (model, attention path asked for or None).
    """
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.bert.bert_model import BertModel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from .. import megatron as tm
    from ..training.models import SIZES, padded_vocab_size, transformer_config

    any_size = next(iter(SIZES[model]))
    config = transformer_config(model, any_size, 1, dropout, bf16, on_cpu)
    config = dataclasses.replace(
        config, num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        ffn_hidden_size=4 * hidden, **{f: None for f in _DERIVED_FIELDS},
        **_recompute_settings(variant.recompute))
    attention = None
    if variant.tempo:
        attention = variant.tempo.get("attention", "auto") if isinstance(variant.tempo, dict) else "auto"
        # Flash attention takes no padding mask, and BERT always passes one: "auto" sends it to
        # the tempo path (tempo_ds.megatron.core_attention), which the result records.
        if model == "bert" and attention == "flash":
            attention = "auto"
        if model == "gpt2":
            config, spec = tm.tempo_gpt_model_spec(config, attention=attention)
        else:
            config, spec = tm.tempo_bert_model_spec(config, attention=attention)
    else:
        spec = get_gpt_layer_local_spec() if model == "gpt2" else bert_layer_local_spec
    padded = padded_vocab_size(vocab, 1)
    if model == "gpt2":
        net = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=padded,
                       max_sequence_length=seq, share_embeddings_and_output_weights=True,
                       position_embedding_type="learned_absolute")
    else:
        cls = tm.TempoBertModel if variant.tempo else BertModel
        net = cls(config=config, num_tokentypes=2 if nsp else 0, transformer_layer_spec=spec,
                  vocab_size=padded, max_sequence_length=seq, add_binary_head=nsp,
                  share_embeddings_and_output_weights=True)
    return net, attention


def build_engine(cfg, variant, device, init_seed, dropout_seed=None):
    """Model of `variant` initialised from `init_seed`, wrapped by tempo_ds.initialize with the
    launch config (configs/ds_config_<model>.json) and this variant's "tempo" key.

    Returns (engine, number of parameters, attention path asked for)."""
    import tempo_ds
    from ..deepspeed.mpu import MegatronMPU
    from ..training.train import _reseed, build_ds_config

    on_cpu = device.type == "cpu"
    launch_args = argparse_namespace(config=None, model=cfg["model"], tempo="off",
                                     micro_batch=cfg["common_mb"], zero_stage=cfg.get("zero_stage"))
    ds_config = build_ds_config(launch_args, on_cpu)
    ds_config["tempo"] = variant.tempo
    bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
    # The trainer's order: the RNG tracker first (megatron's GPU initialisation draws from it),
    # then the default generator that the weights come from.
    _reseed(init_seed if dropout_seed is None else dropout_seed, 0)
    torch.manual_seed(init_seed)
    model, attention = build_model(cfg["model"], cfg["layers"], cfg["hidden"], cfg["heads"], cfg["seq"],
                                   cfg["vocab"], variant, cfg["dropout"], bf16, on_cpu)
    n_params = sum(p.numel() for p in model.parameters())
    engine, _, _, _ = tempo_ds.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config, mpu=MegatronMPU())
    return engine, n_params, attention


def argparse_namespace(**kwargs):
    import argparse
    return argparse.Namespace(**kwargs)


class Batches:
    """Micro-batches of the embedded corpus (tempo_ds.data) in the trainer's format; batch
    (step, mb) depends only on the seed, the step and mb, so every variant sees the same data.

    GPT takes one [1, 1, s, s] causal mask shared by the batch (Megatron's get_ltor_masks_and_
    position_ids without document resets) instead of the dataset's per-sample copies, which would
    put mb x s x s bytes of masks next to the activations being measured.
    """

    def __init__(self, model, seq, vocab, seed, device, num_samples=4096):
        from ..data import ByteTokenizer, default_prefix
        from ..data.datasets import MLMDataset, gpt_dataset

        self.model, self.device = model, device
        tokenizer = ByteTokenizer(vocab)
        if model == "gpt2":
            prefix = default_prefix("gpt", tokenizer)
            cache = os.path.join(os.path.dirname(os.path.abspath(prefix)), "index_cache")
            self.dataset = gpt_dataset(prefix, tokenizer, seq, num_samples, seed, cache)
            self.mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), 1).to(device)
        else:
            self.dataset = MLMDataset(default_prefix("bert", tokenizer), tokenizer, seq, num_samples, seed)

    def get(self, step, mb):
        n = len(self.dataset)
        items = [self.dataset[(step * mb + j) % n] for j in range(mb)]
        keys = [k for k in items[0] if not (self.model == "gpt2" and k == "attention_mask")]
        batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]).to(self.device, non_blocking=True)
                 for k in keys}
        if self.model == "gpt2":
            batch["attention_mask"] = self.mask
        return batch


def train_step(engine, model, batch):
    """One optimizer step (forward, engine.backward, engine.step); returns the detached loss."""
    from ..training.train import _loss
    loss = _loss(model, engine, batch)
    engine.backward(loss)
    engine.step()
    return loss.detach().float()


# -- one variant ---------------------------------------------------------------------------------
def _cleanup(engine, device):
    """After an out-of-memory error: drop half-made gradients and the allocator's cached blocks, so
    the next attempt starts from the fixed state."""
    engine.zero_grad()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _attempt(fn, engine, device):
    """fn() -> value, or None if it ran out of GPU memory (cleaned up)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        pass
    # Outside the except block, so the traceback (and the tensors its frames hold) is gone.
    _cleanup(engine, device)
    return None


def _timed(engine, cfg, data, device, mb, first_step, log, label):
    """cfg["warmup"] untimed then cfg["steps"] timed steps at micro-batch mb; None on OOM."""
    def run():
        from ..training.train import _reseed
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(cfg["warmup"]):
            _reseed(cfg["seed"], first_step + i)
            train_step(engine, cfg["model"], data.get(first_step + i, mb))
        batches = [data.get(first_step + cfg["warmup"] + i, mb) for i in range(cfg["steps"])]
        losses = []
        synchronize(device)
        t0 = time.perf_counter()
        for i, batch in enumerate(batches):
            _reseed(cfg["seed"], first_step + cfg["warmup"] + i)
            losses.append(train_step(engine, cfg["model"], batch))
        synchronize(device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return {"micro_batch": mb, "steps": cfg["steps"], "seconds": seconds,
                "samples_per_s": mb * cfg["steps"] / seconds,
                "tokens_per_s": mb * cfg["steps"] * cfg["seq"] / seconds,
                "losses": [float(x) for x in losses], "peak_bytes": peak}

    out = _attempt(run, engine, device)
    log(f"  {label} mb {mb}: " + ("out of memory" if out is None else
        f"{out['samples_per_s']:.2f} samples/s, loss {out['losses'][0]:.4f} -> {out['losses'][-1]:.4f}"
        + (f", peak {out['peak_bytes'] / MiB:,.0f} MiB" if out["peak_bytes"] else "")))
    return out


def _ledger(engine, cfg, data, mb):
    """Bytes autograd keeps for one forward at micro-batch mb, from SavedTensorLedger."""
    from ..memory import SavedTensorLedger
    from ..training.train import _loss

    with SavedTensorLedger(engine.module) as ledger:
        loss = _loss(cfg["model"], engine, data.get(0, mb))
    report = ledger.report(loss)
    del loss
    layer_prefixes = ("decoder.layers.", "encoder.layers.")
    layers = sum(r.nbytes for r in report.records if r.module.startswith(layer_prefixes))
    def ranked(d):
        return dict(sorted(d.items(), key=lambda kv: -kv[1]))
    return {"micro_batch": mb, "total_bytes": report.total_bytes, "layers_bytes": layers,
            "head_bytes": report.total_bytes - layers, "by_category": ranked(report.by_category()),
            "by_op": ranked(report.by_op())}


def _attention_paths(engine):
    paths = {getattr(m, "last_path", None) for m in engine.module.modules() if hasattr(m, "last_path")}
    return sorted(p for p in paths if p)


def run_variant(cfg, log):
    """Measure one variant (module docstring) in this process; returns its result dict."""
    device = setup_distributed()
    variant = VARIANTS[cfg["variant"]]
    on_gpu = device.type == "cuda"
    budget = cfg.get("memory_budget")
    if budget and on_gpu:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    elif budget:
        log("  --memory-budget applies to the CUDA allocator only; ignored on CPU")

    engine, n_params, attention = build_engine(cfg, variant, device, cfg["seed"])
    data = Batches(cfg["model"], cfg["seq"], cfg["vocab"], cfg["seed"], device)
    result = {"variant": variant.name, "description": variant.description, "n_params": n_params,
              "attention_asked": attention, "memory_budget_bytes": budget if on_gpu else None}
    log(f"[{variant.name}] {variant.description}: {n_params / 1e6:.1f}M parameters")

    # Warm-up (optimizer state exists afterwards), then a backward whose gradients are alive
    # while nothing else is: the fixed bytes.
    from ..training.train import _reseed, _loss
    _reseed(cfg["seed"], 0)
    train_step(engine, cfg["model"], data.get(0, 1))
    fixed = None
    if on_gpu:
        loss = _loss(cfg["model"], engine, data.get(1, 1))
        engine.backward(loss)
        del loss
        synchronize(device)
        fixed = torch.cuda.memory_allocated(device)
        engine.step()
        log(f"  fixed (parameters, gradients, optimizer state): {fixed / MiB:,.0f} MiB")
    result["fixed_bytes"] = fixed

    step = 2
    common = _timed(engine, cfg, data, device, cfg["common_mb"], step, log, "common")
    step += cfg["warmup"] + cfg["steps"]
    result["common"] = common
    result["attention_ran"] = _attention_paths(engine)

    peaks = {}

    def fits(mb):
        def probe():
            nonlocal step
            if on_gpu:
                torch.cuda.reset_peak_memory_stats(device)
            _reseed(cfg["seed"], step)
            train_step(engine, cfg["model"], data.get(step, mb))
            step += 1
            synchronize(device)
            return torch.cuda.max_memory_allocated(device) if on_gpu else 0
        peak = _attempt(probe, engine, device)
        if peak is not None and on_gpu:
            peaks[mb] = peak
        log(f"  search mb {mb}: " + ("fits" if peak is not None else "out of memory")
            + (f", peak {peak / MiB:,.0f} MiB" if peak else ""))
        return peak is not None

    from .search import largest_fitting
    search = largest_fitting(fits, start=1, cap=cfg["cap"])
    result["largest_micro_batch"] = search.largest
    result["search_capped"] = search.capped
    result["search_trials"] = search.trials
    result["peak_at_largest_bytes"] = peaks.get(search.largest)

    best = None
    if search.largest == cfg["common_mb"] and common is not None:
        best = common
    elif search.largest:
        best = _timed(engine, cfg, data, device, search.largest, step, log, "largest")
    result["best"] = best
    result["sweep"] = []
    for mb in cfg.get("sweep") or []:
        if mb <= search.largest and mb not in (cfg["common_mb"], search.largest):
            step += cfg["warmup"] + cfg["steps"]
            point = _timed(engine, cfg, data, device, mb, step, log, "sweep")
            if point:
                result["sweep"].append(point)

    ledger_mb = cfg["common_mb"] if common is not None else max(1, min(search.largest, cfg["common_mb"]))
    ledger = _attempt(lambda: _ledger(engine, cfg, data, ledger_mb), engine, device)
    result["ledger"] = ledger
    result["activation_per_sample_ledger_bytes"] = ledger and ledger["total_bytes"] / ledger_mb
    if on_gpu and common is not None:
        result["activation_per_sample_allocator_bytes"] = (common["peak_bytes"] - fixed) / common["micro_batch"]
    else:
        result["activation_per_sample_allocator_bytes"] = None

    peak_flops = bf16_peak_flops(torch.cuda.get_device_name(device)) if on_gpu else None
    fpt = flops_per_token(n_params, cfg["layers"], cfg["hidden"], cfg["seq"])
    for point in (common, best, *result["sweep"]):
        if point is not None:
            point["mfu"] = fpt * point["tokens_per_s"] / peak_flops if peak_flops else None
    result["flops_per_token"] = fpt
    return result


# -- the driver ----------------------------------------------------------------------------------
def resolve_config(args):
    """The run's settings: the command line over the GPU or the CPU-sized defaults."""
    on_gpu = torch.cuda.is_available()
    preset = (GPU_PRESETS if on_gpu else CPU_PRESETS)[args.model]
    from ..training.models import SIZES
    size = args.size or preset.size
    if size not in SIZES[args.model]:
        raise SystemExit(f"--size {size!r} for {args.model}: one of {', '.join(SIZES[args.model])}")
    shape = SIZES[args.model][size]
    cfg = {
        "model": args.model,
        "size": size if not (args.layers or args.hidden or args.heads) else "custom",
        "layers": args.layers or shape.num_layers,
        "hidden": args.hidden or shape.hidden_size,
        "heads": args.heads or shape.num_attention_heads,
        "seq": args.seq_length or preset.seq,
        "vocab": args.vocab_size or preset.vocab,
        "common_mb": args.common_micro_batch or preset.common_mb,
        "steps": args.steps or (GPU_STEPS if on_gpu else CPU_STEPS),
        "warmup": args.warmup_steps if args.warmup_steps is not None else (GPU_WARMUP if on_gpu else CPU_WARMUP),
        "cap": args.max_micro_batch or (GPU_CAP if on_gpu else CPU_CAP),
        "memory_budget": parse_bytes(args.memory_budget),
        "dropout": args.dropout,
        "seed": args.seed,
        "zero_stage": args.zero_stage,
        "sweep": args.sweep or [],
        "device": "cuda" if on_gpu else "cpu",
        "cpu_sized": not on_gpu,
    }
    if cfg["hidden"] % cfg["heads"]:
        raise SystemExit(f"--hidden {cfg['hidden']} is not divisible by --heads {cfg['heads']}")
    return cfg


def tag_of(cfg):
    budget = f"_budget{cfg['memory_budget'] / 2**30:g}GiB" if cfg["memory_budget"] else ""
    return f"{cfg['model']}_{cfg['size']}_s{cfg['seq']}{budget}{'_cpu' if cfg['cpu_sized'] else ''}"


def _worker_command(cfg, out_path):
    return [sys.executable, "-m", "tempo_ds.bench.train", "--worker", json.dumps(cfg), out_path]


def _run_isolated(cfg, log):
    """run_variant in a child process; returns its result, or a row saying why it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
        # The child's progress lines go to our stderr as they come.
        proc = subprocess.run(_worker_command(cfg, out_path), cwd=REPO, env=env, stdout=sys.stderr)
        if proc.returncode == 0 and os.path.exists(out_path):
            with open(out_path) as f:
                return json.load(f)
    log(f"[{cfg['variant']}] failed (exit status {proc.returncode}); see the lines above")
    return {"variant": cfg["variant"], "description": VARIANTS[cfg["variant"]].description,
            "error": f"worker exited with status {proc.returncode}"}


def run(args, log=None):
    """All variants of args.variants; returns the report dict (also written to args.out)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    cfg = resolve_config(args)
    info = machine_info()
    if cfg["cpu_sized"]:
        log(f"no GPU: CPU-sized configuration ({cfg['model']} L{cfg['layers']} h{cfg['hidden']} "
            f"s{cfg['seq']}, {cfg['steps']} steps, search capped at {cfg['cap']}): the figures are "
            "ledger bytes and ratios, not speeds, and nothing runs out of memory")
    report = {"machine": info, "config": cfg, "results": [], "tag": tag_of(cfg)}
    for name in args.variants:
        variant_cfg = dict(cfg, variant=name)
        t0 = time.perf_counter()
        if args.isolation == "process":
            row = _run_isolated(variant_cfg, log)
        else:
            row = run_variant(variant_cfg, log)
        row["wall_s"] = time.perf_counter() - t0
        report["results"].append(row)
        # Written after every variant, so a run stopped by a time limit keeps what it measured.
        write_outputs(report, args.out, plots=False)
    write_outputs(report, args.out, plots=not args.no_plots, log=log)
    print(format_report(report))
    return report


# -- output --------------------------------------------------------------------------------------
def _get(row, *keys):
    for k in keys:
        if row is None:
            return None
        row = row.get(k)
    return row


def csv_rows(report):
    """One flat row per variant (the CSV's columns)."""
    rows = []
    for r in report["results"]:
        rows.append({
            "variant": r["variant"],
            "memory_budget_bytes": report["config"]["memory_budget"],
            "n_params": r.get("n_params"),
            "attention_ran": "+".join(r.get("attention_ran") or []),
            "fixed_bytes": r.get("fixed_bytes"),
            "activation_per_sample_allocator_bytes": r.get("activation_per_sample_allocator_bytes"),
            "activation_per_sample_ledger_bytes": r.get("activation_per_sample_ledger_bytes"),
            "ledger_head_bytes": _get(r, "ledger", "head_bytes"),
            "largest_micro_batch": r.get("largest_micro_batch"),
            "search_capped": r.get("search_capped"),
            "peak_at_largest_bytes": r.get("peak_at_largest_bytes"),
            "best_samples_per_s": _get(r, "best", "samples_per_s"),
            "best_tokens_per_s": _get(r, "best", "tokens_per_s"),
            "best_mfu": _get(r, "best", "mfu"),
            "common_micro_batch": report["config"]["common_mb"],
            "common_samples_per_s": _get(r, "common", "samples_per_s"),
            "common_mfu": _get(r, "common", "mfu"),
            "first_loss": (_get(r, "common", "losses") or [None])[0],
            "last_loss": (_get(r, "common", "losses") or [None])[-1],
            "error": r.get("error"),
        })
    return rows


# Targets of the issue (H100, bf16, same run), checked against whatever the report holds.
# (model, name, numerator variant, denominator variant, quantity, bound, budgeted run?)
TARGETS = (
    ("gpt2", "activation bytes/sample (allocator)", "tempo-flash", "stock", "activation_per_sample_allocator_bytes", ("<=", 0.25), False),
    ("gpt2", "largest micro-batch", "tempo-flash", "stock", "largest_micro_batch", (">=", 4.0), False),
    ("gpt2", "samples/s at own largest micro-batch", "tempo-flash", "stock", "best_samples_per_s", (">=", 1.5), False),
    ("gpt2", "samples/s at own largest micro-batch", "tempo-flash", "selective", "best_samples_per_s", (">=", 2.0), False),
    ("bert", "largest micro-batch", "tempo-flash", "stock", "largest_micro_batch", (">=", 2.5), False),
    ("bert", "samples/s at own largest micro-batch", "tempo-flash", "stock", "best_samples_per_s", (">=", 1.3), False),
    ("gpt2", "samples/s under the budget", "tempo-flash", "stock", "best_samples_per_s", (">=", 1.16), True),
    ("bert", "samples/s under the budget", "tempo-flash", "stock", "best_samples_per_s", (">=", 1.16), True),
)


def check_targets(report):
    """[(target, ratio or None, bound, met or None)] for the targets this report can speak to."""
    cfg = report["config"]
    rows = {r["variant"]: r for r in csv_rows(report)}
    out = []
    for model, name, num, den, key, (op, bound), budgeted in TARGETS:
        if model != cfg["model"] or budgeted != bool(cfg["memory_budget"]):
            continue
        a, b = _get(rows.get(num), key), _get(rows.get(den), key)
        ratio = a / b if a is not None and b else None
        met = None if ratio is None or cfg["cpu_sized"] else (ratio <= bound if op == "<=" else ratio >= bound)
        out.append((f"{num} / {den}: {name}", ratio, f"{op} {bound:g}", met))
    return out


def _fmt(x, scale=1.0, spec=",.0f"):
    return "-" if x is None else format(x / scale, spec)


def format_report(report):
    cfg = report["config"]
    lines = [header(report["machine"]),
             f"{cfg['model']} {cfg['size']} (L{cfg['layers']} h{cfg['hidden']} a{cfg['heads']}), "
             f"seq {cfg['seq']}, vocab {cfg['vocab']}, {cfg['steps']} timed steps after {cfg['warmup']}, "
             f"common micro-batch {cfg['common_mb']}"
             + (f", memory budget {cfg['memory_budget'] / 2**30:g} GiB" if cfg["memory_budget"] else "")]
    if cfg["cpu_sized"]:
        lines.append("CPU-sized configuration: ledger bytes and ratios only; times are not speeds; "
                     f"the search stops at {cfg['cap']}.")
    cols = (f"{'variant':<12}{'act/sample MiB':>15}{'ledger MiB':>11}{'x stock':>8}{'largest mb':>11}"
            f"{'peak MiB':>10}{'samples/s':>10}{'tokens/s':>11}{'MFU':>6}{'@common':>9}{'loss':>16}")
    lines += [cols, "-" * len(cols)]
    rows = csv_rows(report)
    stock = next((r for r in rows if r["variant"] == "stock"), None)
    for r in rows:
        if r["error"]:
            lines.append(f"{r['variant']:<12} {r['error']}")
            continue
        base = stock and stock["activation_per_sample_ledger_bytes"]
        ratio = r["activation_per_sample_ledger_bytes"] / base if base else None
        largest = f"{'>=' if r['search_capped'] else ''}{r['largest_micro_batch']}"
        loss = "-" if r["first_loss"] is None else f"{r['first_loss']:.3f}->{r['last_loss']:.3f}"
        lines.append(
            f"{r['variant']:<12}{_fmt(r['activation_per_sample_allocator_bytes'], MiB):>15}"
            f"{_fmt(r['activation_per_sample_ledger_bytes'], MiB, ',.1f'):>11}{_fmt(ratio, 1, '.3f'):>8}"
            f"{largest:>11}{_fmt(r['peak_at_largest_bytes'], MiB):>10}"
            f"{_fmt(r['best_samples_per_s'], 1, ',.1f'):>10}{_fmt(r['best_tokens_per_s']):>11}"
            f"{_fmt(r['best_mfu'], 0.01, '.0f'):>6}{_fmt(r['common_samples_per_s'], 1, ',.1f'):>9}{loss:>16}")
    lines.append("act/sample: (peak - fixed) / mb from the allocator at the common micro-batch; ledger: "
                 "bytes saved for backward / mb; x stock: ledger ratio; samples/s, tokens/s, MFU (%) "
                 "at the largest micro-batch; @common: samples/s at the common one.")
    paths = {r["variant"]: r.get("attention_ran") for r in report["results"] if r.get("attention_ran")}
    if paths:
        lines.append("attention path that ran: " + ", ".join(f"{k}: {'+'.join(v)}" for k, v in paths.items()))
    lines.append("ledger by op category, MiB per sample (head = embeddings, final norm, logits, loss):")
    for r in report["results"]:
        ledger = r.get("ledger")
        if ledger:
            mb = ledger["micro_batch"]
            cats = ", ".join(f"{k} {v / mb / MiB:,.2f}" for k, v in ledger["by_category"].items())
            per_layer = ledger["layers_bytes"] / (mb * cfg["seq"] * cfg["layers"])
            lines.append(f"  {r['variant']:<12} layers {per_layer:,.0f} B/token/layer, head "
                         f"{ledger['head_bytes'] / mb / MiB:,.2f} of {ledger['total_bytes'] / mb / MiB:,.2f} | {cats}")
    targets = check_targets(report)
    if targets:
        lines.append("targets (H100 bf16):" + (" not judged on a CPU-sized run" if cfg["cpu_sized"] else ""))
        for name, ratio, bound, met in targets:
            verdict = "" if met is None else ("  met" if met else "  NOT met")
            lines.append(f"  {name:<62}{_fmt(ratio, 1, '.2f'):>7} (target {bound}){verdict}")
    return "\n".join(lines)


def write_outputs(report, out_dir, plots=True, log=None):
    """train_<tag>.json and .csv in out_dir, and the plots unless plots=False."""
    import csv

    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"train_{report['tag']}")
    with open(base + ".json", "w") as f:
        json.dump(json_safe(report), f, indent=1, default=str)
    rows = csv_rows(report)
    if rows:
        with open(base + ".csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if plots:
        from . import plots as plotting
        written = plotting.train_plots(report, base)
        if log:
            log(plotting.describe(written))


def from_json(path, out_dir, plots=True):
    """Table and plots again from a stored train_<tag>.json (e.g. one a GPU machine wrote)."""
    with open(path) as f:
        report = json.load(f)
    write_outputs(report, out_dir, plots=plots, log=lambda line: print(line, file=sys.stderr))
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
    p.add_argument("--model", choices=("gpt2", "bert"), default="gpt2")
    p.add_argument("--size", default=None, help="named size (tempo_ds.training.models.SIZES); "
                   "default 345m / large on GPU, tiny on CPU")
    p.add_argument("--layers", type=positive_int, default=None, help="override the size's layers")
    p.add_argument("--hidden", type=positive_int, default=None, help="override the size's hidden size")
    p.add_argument("--heads", type=positive_int, default=None, help="override the size's attention heads")
    p.add_argument("--seq-length", type=positive_int, default=None, help="default 1024 GPT / 512 BERT on GPU, 64 on CPU")
    p.add_argument("--vocab-size", type=positive_int, default=None, help="default 50257 GPT / 30522 BERT")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
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
    return 1 if any(r.get("error") for r in report["results"]) else 0


def _worker_main(argv):
    """`python -m tempo_ds.bench.train --worker CONFIG_JSON OUT_JSON`: one variant (run_variant)."""
    import logging
    # DeepSpeed and tempo_ds log through `logging`; their INFO lines would drown the progress.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    cfg, out_path = json.loads(argv[1]), argv[2]
    result = run_variant(cfg, lambda line: print(line, file=sys.stderr, flush=True))
    with open(out_path, "w") as f:
        json.dump(json_safe(result), f, default=str)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[1:]))
    sys.exit("run `python -m tempo_ds.bench train`")
