"""The model, engine, data and step of `python -m tempo_ds.bench train --framework hf`: a Hugging
Face BERT, RoBERTa or GPT-2 (tempo_ds.hf.trainer.build_model, from config) in one variant, wrapped
by tempo_ds.initialize with the launch config of its architecture (configs/ds_config_bert.json or
ds_config_gpt2.json, as the Megatron benchmark), fed micro-batches every variant sees alike.

The same interface as train_model (Megatron): build_engine, Batches, train_step, and loss; the
variants are train_types.HF_VARIANTS: stock eager, stock SDPA, stock SDPA + gradient checkpointing
(transformers' own, every layer), and Tempo (tempo_ds.hf.apply through tempo_ds.initialize).
"""
import torch

from ..hf.trainer import LAYER_PREFIXES, MODELS, VOCAB, build_model, corpus_dataset, shape_for
from .train import Preset
from .train_model import argparse_namespace, setup_distributed  # noqa: F401 (setup_distributed: one process group)

__all__ = ["LAYER_PREFIXES", "Batches", "build_engine", "loss", "presets", "setup_distributed", "train_step"]


def presets(name, on_gpu):
    """(Preset, sizes) of a MODELS name: BERT/RoBERTa at s=512 and GPT-2 124M at s=1024 on a GPU
    (the issue's reference runs), tiny at s=64 on CPU; sizes are tempo_ds.workload.SIZES'."""
    from .. import workload

    if name not in MODELS:
        raise SystemExit(f"--model {name!r} with --framework hf: one of {', '.join(MODELS)}")
    family, size = MODELS[name]
    sizes = workload.SIZES["gpt" if family == "gpt2" else "bert"]
    if not on_gpu:
        return Preset("tiny", 64, VOCAB[family], 2), sizes
    return Preset(size, 1024 if family == "gpt2" else 512, VOCAB[family], 8 if family == "gpt2" else 16), sizes


def build_engine(cfg, variant, device, init_seed, dropout_seed=None):
    """The model of `variant` (its attention implementation, gradient checkpointing and "tempo"
    value), initialised from `init_seed`, wrapped by tempo_ds.initialize with the launch config of
    its architecture. Returns (engine, number of parameters, attention implementation asked for)."""
    import tempo_ds
    from .. import workload
    from ..deepspeed.config import split_config
    from ..training.train import build_ds_config

    on_cpu = device.type == "cpu"
    family = MODELS[cfg["model"]][0]
    launch_args = argparse_namespace(config=None, model="gpt2" if family == "gpt2" else "bert", tempo="off",
                                     micro_batch=cfg["common_mb"], zero_stage=cfg.get("zero_stage"))
    ds_config = build_ds_config(launch_args, on_cpu)
    ds_config["tempo"] = variant.tempo
    tempo, rest = split_config(ds_config)
    workload.reseed(init_seed if dropout_seed is None else dropout_seed, 0)
    torch.manual_seed(init_seed)
    _, _, shape = shape_for(cfg["model"], cfg["size"] if cfg["size"] != "custom" else None,
                            cfg["layers"], cfg["hidden"], cfg["heads"])
    model, _ = build_model(cfg["model"], layers=shape.num_layers, hidden=shape.hidden_size,
                           heads=shape.num_attention_heads, seq_length=cfg["seq"], vocab_size=cfg["vocab"],
                           dropout=cfg["dropout"], attn_implementation=variant.attn_implementation)
    if variant.recompute:
        # reentrant: the checkpoint saves each layer's input with save_for_backward, which the
        # ledger sees (non-reentrant checkpointing hides its tensors behind its own hooks)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    engine, _, _, _ = tempo_ds.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                          config=rest, tempo=tempo)
    return engine, n_params, model.config._attn_implementation


class Batches:
    """Micro-batches of the embedded corpus (tempo_ds.hf.trainer.corpus_dataset: masked LM for
    BERT/RoBERTa, causal LM for GPT-2); batch (step, mb) depends only on the seed, the step and
    mb, so every variant sees the same data."""

    def __init__(self, model, seq, vocab, seed, device, num_samples=4096):
        family = MODELS[model][0]
        task = "clm" if family == "gpt2" else "mlm"
        self.device = device
        self.dataset, _ = corpus_dataset(task, seq, num_samples, seed, vocab_size=vocab,
                                         token_types=family == "bert")

    def get(self, step, mb):
        n = len(self.dataset)
        items = [self.dataset[(step * mb + j) % n] for j in range(mb)]
        return {k: torch.stack([torch.as_tensor(it[k]) for it in items]).to(self.device, non_blocking=True)
                for k in items[0]}


def loss(engine, batch):
    """The model's own loss on `batch` (MLM at the labelled positions, or CLM)."""
    return engine(**batch).loss


def train_step(engine, model, batch):
    """One optimizer step (forward, engine.backward, engine.step); returns the detached loss."""
    value = loss(engine, batch)
    engine.backward(value)
    engine.step()
    return value.detach().float()
