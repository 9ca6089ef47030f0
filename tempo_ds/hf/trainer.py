"""What training a transformers model with tempo_ds needs beside tempo_ds.hf.apply: the model by
name (built from a config, nothing downloaded), the embedded corpus or a user's data in the
batch names transformers models take, and a Trainer callback that logs tokens/s and peak memory.
launch/train_hf.py and `python -m tempo_ds.bench train --framework hf` both build through here.

The Trainer itself needs nothing from us: `"tempo"` stays in the ds_config handed to
`TrainingArguments(deepspeed=...)` (DeepSpeed and the Trainer ignore the key), and one line,
`tempo_ds.hf.apply(model, "ds_config.json")`, converts the model before the Trainer is built
(docs/hf.md says why this and not a callback). One exception: accelerate refuses any "auto"
string left anywhere in a DeepSpeed config, so `"tempo": {"attention": "auto"}` fails inside
`Trainer.train()`; "auto" is that field's default and can be left out, which deepspeed_config()
below does for a config handed to the Trainer.
"""
import os
import resource
import time
from pathlib import Path

import torch

from .. import workload

# user-facing name -> (family, size of tempo_ds.workload.SIZES): the paper's models at full size
MODELS = {"bert-large": ("bert", "large"), "roberta-large": ("roberta", "large"), "gpt2": ("gpt2", "124m"),
          "bert": ("bert", "base"), "roberta": ("roberta", "base")}
FAMILIES = ("bert", "roberta", "gpt2")
# the released models' vocabularies and norm epsilons (the corpus is byte-tokenized; only the
# vocabulary size is the real one, so the logits and the loss head have their real size)
VOCAB = {"bert": 30522, "roberta": 50265, "gpt2": 50257}
LAYER_PREFIXES = ("bert.encoder.layer.", "roberta.encoder.layer.", "transformer.h.")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def family_config(family, shape, *, vocab_size, seq_length, dropout=0.1):
    """The transformers config of `family` ("bert", "roberta", "gpt2") at a tempo_ds.workload
    Shape, with the released models' other settings (ffn 4h, norm epsilon, GELU form)."""
    from transformers import BertConfig, GPT2Config, RobertaConfig

    common = dict(vocab_size=vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
                  num_attention_heads=shape.num_attention_heads, intermediate_size=4 * shape.hidden_size,
                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if family == "bert":
        return BertConfig(**common, max_position_embeddings=max(512, seq_length), layer_norm_eps=1e-12)
    if family == "roberta":
        # RoBERTa's positions start after its padding id (1): seq + 2 of them
        return RobertaConfig(**common, max_position_embeddings=max(514, seq_length + 2), layer_norm_eps=1e-5,
                             type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if family == "gpt2":
        # no KV cache, as the Trainer sets it: in a training forward the cache copies k and v
        # (torch.cat), and attention keeps the copies for backward (2h values per token and layer)
        return GPT2Config(vocab_size=vocab_size, n_embd=shape.hidden_size, n_layer=shape.num_layers,
                          n_head=shape.num_attention_heads, n_positions=max(1024, seq_length),
                          resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, use_cache=False)
    raise ValueError(f"family {family!r}: expected one of {FAMILIES}")


def task_of(config):
    """"clm" for a causal LM (GPT-2 and other decoders), "mlm" for an encoder (BERT, RoBERTa, ...)."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or config.model_type in ("gpt2", "gpt_neo", "gptj"):
        return "clm"
    return "mlm"


def shape_for(name, size=None, layers=None, hidden=None, heads=None):
    """(family, size name, workload.Shape) of a MODELS name, a size of tempo_ds.workload.SIZES
    overriding the name's own, and layers/hidden/heads overriding the size's."""
    if name not in MODELS:
        raise ValueError(f"--model {name!r}: one of {', '.join(MODELS)} or a local folder with a config.json")
    family, default = MODELS[name]
    sizes = workload.SIZES["gpt" if family == "gpt2" else "bert"]
    size = size or default
    if size not in sizes:
        raise ValueError(f"--size {size!r} for {name}: one of {', '.join(sizes)}")
    base = sizes[size]
    shape = workload.Shape(layers or base.num_layers, hidden or base.hidden_size, heads or base.num_attention_heads)
    if shape.hidden_size % shape.num_attention_heads:
        raise ValueError(f"--hidden {shape.hidden_size} is not divisible by --heads {shape.num_attention_heads}")
    custom = layers or hidden or heads
    return family, "custom" if custom else size, shape


def build_model(name, *, size=None, layers=None, hidden=None, heads=None, seq_length=512, vocab_size=None,
                dropout=0.1, attn_implementation="sdpa"):
    """A stock transformers masked or causal LM; returns (model, task).

    name: a key of MODELS (built from its config at `size`, with layers/hidden/heads overrides,
    initialised from torch's default generator), or a local folder with a config.json (its
    weights are loaded when the folder has them; nothing is downloaded). vocab_size defaults to
    the released model's; the positions cover seq_length (at least the released number).
    attn_implementation: "eager" or "sdpa" (tempo_ds.hf.apply sets "tempo" later). The model is
    in float32 (DeepSpeed casts it for bf16/fp16).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    folder = Path(name)
    if name not in MODELS and folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ValueError(f"--model {name}: the folder has no config.json")
        config = AutoConfig.from_pretrained(folder)
        task = task_of(config)
        auto = AutoModelForCausalLM if task == "clm" else AutoModelForMaskedLM
        if any((folder / f).is_file() for f in WEIGHT_FILES):
            return auto.from_pretrained(folder, attn_implementation=attn_implementation), task
        return auto.from_config(config, attn_implementation=attn_implementation), task
    family, _, shape = shape_for(name, size, layers, hidden, heads)
    config = family_config(family, shape, vocab_size=vocab_size or VOCAB[family], seq_length=seq_length,
                           dropout=dropout)
    task = "clm" if family == "gpt2" else "mlm"
    auto = AutoModelForCausalLM if task == "clm" else AutoModelForMaskedLM
    return auto.from_config(config, attn_implementation=attn_implementation), task


class HFDataset(torch.utils.data.Dataset):
    """A tempo_ds.data dataset (MLMDataset or megatron's GPTDataset; tempo_ds.workload's batch
    names) in the names transformers models take: input_ids, attention_mask, labels (-100 where
    no loss), and token_type_ids for models that have token types. CLM labels are the inputs:
    the model shifts them."""

    def __init__(self, dataset, task, token_types=True):
        self.dataset, self.task, self.token_types = dataset, task, token_types

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        if self.task == "clm":
            return {"input_ids": item["tokens"], "labels": item["tokens"].clone()}
        out = {"input_ids": item["tokens"], "attention_mask": item["attention_mask"],
               "labels": torch.where(item["loss_mask"] > 0, item["labels"], -100)}
        if self.token_types:
            out["token_type_ids"] = item["tokentype_ids"]
        return out


def text_prefix(path, kind, tokenizer):
    """The indexed dataset of a text or JSONL file, written by tempo_ds.data.preprocess on first
    use under $TEMPO_DS_CACHE/hf_text (keyed by the file's path, size and time, and the tokenizer)."""
    import hashlib

    from ..data.corpus import cache_dir
    from ..data.preprocess import preprocess

    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{kind}|"
                         f"{type(tokenizer).__name__}|{tokenizer.vocab_size}".encode()).hexdigest()[:12]
    folder = cache_dir() / "hf_text"
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / f"{Path(path).stem}_{kind}_{key}"
    if not Path(f"{prefix}.idx").exists():
        preprocess([str(path)], str(prefix), kind=kind, tokenizer=tokenizer, progress=False)
    return str(prefix)


def corpus_dataset(task, seq_length, num_samples, seed, *, vocab_size, data_path=None, token_types=True):
    """(HFDataset, tokenizer) for `task` ("mlm" or "clm"): the embedded corpus (byte tokens,
    vocab_size the model's), a prefix written by `python -m tempo_ds.data.preprocess` (its
    sidecar names the tokenizer), or a text/JSONL file (preprocessed with the byte tokenizer on
    first use). Sample i depends only on (seed, i)."""
    from ..data import ByteTokenizer, check_prefix, default_prefix, index_cache_dir, load_prefix_tokenizer
    from ..data.datasets import MLMDataset, gpt_dataset

    kind = "gpt" if task == "clm" else "bert"
    if data_path is None:
        tokenizer = ByteTokenizer(vocab_size)
        prefix = default_prefix(kind, tokenizer)
    elif Path(f"{data_path}.idx").is_file():
        tokenizer = load_prefix_tokenizer(data_path)
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(f"--data-path {data_path}: its tokenizer has {tokenizer.vocab_size} ids, the model's "
                             f"vocabulary {vocab_size}; pass --vocab-size {tokenizer.vocab_size}")
        prefix = data_path
        check_prefix(prefix, vocab_size, kind)
    elif Path(data_path).is_file():
        tokenizer = ByteTokenizer(vocab_size)
        prefix = text_prefix(data_path, kind, tokenizer)
    else:
        raise FileNotFoundError(f"--data-path {data_path}: neither a prefix with {data_path}.bin/.idx nor a file")
    if task == "clm":
        data = gpt_dataset(prefix, tokenizer, seq_length, num_samples, seed, index_cache_dir(prefix))
    else:
        data = MLMDataset(prefix, tokenizer, seq_length, num_samples, seed, nsp=False)
    return HFDataset(data, task, token_types), tokenizer


def peak_memory_bytes(device=None):
    """The allocator's peak on a GPU; the process' peak resident set (parameters and all) on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device)
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def throughput_callback(tokens_per_step, log=print):
    """A transformers TrainerCallback that logs, at every Trainer log, the loss, tokens/s over the
    steps since the last log, and the peak memory; its `records` keep the same as dicts."""
    from transformers import TrainerCallback

    class ThroughputCallback(TrainerCallback):
        def __init__(self):
            self.records, self._t0, self._step0 = [], None, 0

        def on_step_begin(self, args, state, control, **kwargs):
            if self._t0 is None:
                self._t0, self._step0 = time.perf_counter(), state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs or self._t0 is None:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - self._t0
            steps = state.global_step - self._step0
            record = {"step": state.global_step, "loss": float(logs["loss"]),
                      "tokens_per_s": steps * tokens_per_step / seconds if seconds > 0 else 0.0,
                      "peak_memory_bytes": peak_memory_bytes()}
            self.records.append(record)
            self._t0, self._step0 = time.perf_counter(), state.global_step
            if state.is_world_process_zero:
                label = "peak allocated" if torch.cuda.is_available() else "peak RSS"
                log(f"step {record['step']:>5}  loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tokens/s  "
                    f"{label} {record['peak_memory_bytes'] / 2**20:,.0f} MiB")

    return ThroughputCallback()


def deepspeed_config(ds_config):
    """The DeepSpeed config (a path or dict) as a new dict for TrainingArguments(deepspeed=...),
    "tempo" kept, less the "tempo" fields set to "auto": accelerate refuses an "auto" anywhere in
    the config, and "auto" is those fields' default, so the meaning is unchanged. The "tempo"
    entry is validated here (TempoConfigError names a bad field)."""
    from dataclasses import fields

    from ..deepspeed.config import TempoConfig, load_ds_config, tempo_entry

    config = load_ds_config(ds_config)
    tempo_entry(config)
    entry = config.get("tempo")
    if isinstance(entry, dict):
        defaults = {f.name: f.default for f in fields(TempoConfig)}
        config["tempo"] = {k: v for k, v in entry.items() if not (v == "auto" and defaults.get(k) == "auto")}
    return config
