"""The model, engine, data and step of `python -m tempo_ds.bench train` and `convergence`:
one process (TP=1), a megatron-core GPT-2 or BERT of any shape in a variant's spec, built by
tempo_ds.workload, wrapped by tempo_ds.initialize with the launch config, fed micro-batches every
variant sees alike. `model` below is the user-facing name ("gpt2" or "bert")."""
import argparse

import torch

from .. import workload


def setup_distributed():
    """One process, TP=1: workload.launcher_env() and workload.distributed(), held until the
    process exits (a benchmark process measures one run and ends). Returns the device."""
    workload.hold(workload.launcher_env())
    return workload.hold(workload.distributed(tp=1))


def build_model(model, layers, hidden, heads, seq, vocab, variant, dropout, bf16, on_cpu, nsp=True, tp=1):
    """The GPTModel / BertModel of `variant` (its "tempo" value and recomputation) at any shape,
    with the launch scripts' config, at tensor-parallel size `tp` (parallel_state's). Returns
    (model, attention path asked for or None)."""
    arch = workload.arch_of(model)
    config = workload.model_config(workload.Shape(layers, hidden, heads), tp=tp, dropout=dropout,
                                   dtype=torch.bfloat16 if bf16 else torch.float32,
                                   recompute=variant.recompute, cpu_init=on_cpu)
    attention = None
    if variant.tempo:
        attention = variant.tempo.get("attention", "auto") if isinstance(variant.tempo, dict) else "auto"
        # Flash attention takes no padding mask, and BERT always passes one: "auto" sends it to
        # the tempo path (tempo_ds.megatron.core_attention), which the result records.
        if arch == "bert" and attention == "flash":
            attention = "auto"
    net = workload.build_model(arch, config, spec="tempo" if variant.tempo else "stock",
                               attention=attention or "auto", vocab_size=vocab, seq_length=seq, nsp=nsp)
    return net, attention


def build_engine(cfg, variant, device, init_seed, dropout_seed=None):
    """Model of `variant` initialised from `init_seed`, wrapped by tempo_ds.initialize with the
    launch config (configs/ds_config_<model>.json) and this variant's "tempo" key.

    Returns (engine, number of parameters, attention path asked for)."""
    import tempo_ds
    from ..deepspeed.config import split_config
    from ..deepspeed.mpu import MegatronMPU
    from ..training.train import build_ds_config

    on_cpu = device.type == "cpu"
    launch_args = argparse_namespace(config=None, model=cfg["model"], tempo="off",
                                     micro_batch=cfg["common_mb"], zero_stage=cfg.get("zero_stage"))
    ds_config = build_ds_config(launch_args, on_cpu)
    ds_config["tempo"] = variant.tempo
    tempo, rest = split_config(ds_config)
    bf16 = bool(rest.get("bf16", {}).get("enabled"))
    # The trainer's order: the RNG tracker first (megatron's GPU initialisation draws from it),
    # then the default generator that the weights come from.
    workload.reseed(init_seed if dropout_seed is None else dropout_seed, 0)
    torch.manual_seed(init_seed)
    model, attention = build_model(cfg["model"], cfg["layers"], cfg["hidden"], cfg["heads"], cfg["seq"],
                                   cfg["vocab"], variant, cfg["dropout"], bf16, on_cpu)
    n_params = sum(p.numel() for p in model.parameters())
    engine, _, _, _ = tempo_ds.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=rest, mpu=MegatronMPU(), tempo=tempo)
    return engine, n_params, attention


def argparse_namespace(**kwargs):
    return argparse.Namespace(**kwargs)


class Batches:
    """Micro-batches of the embedded corpus (tempo_ds.data) in tempo_ds.workload's batch format;
    batch (step, mb) depends only on the seed, the step and mb, so every variant sees the same data.

    GPT takes one [1, 1, s, s] causal mask shared by the batch (Megatron's get_ltor_masks_and_
    position_ids without document resets) instead of the dataset's per-sample copies, which would
    put mb x s x s bytes of masks next to the activations being measured.
    """

    def __init__(self, model, seq, vocab, seed, device, num_samples=4096):
        from ..data import ByteTokenizer, default_prefix, index_cache_dir
        from ..data.datasets import MLMDataset, gpt_dataset

        self.arch, self.device = workload.arch_of(model), device
        tokenizer = ByteTokenizer(vocab)
        if self.arch == "gpt":
            prefix = default_prefix("gpt", tokenizer)
            self.dataset = gpt_dataset(prefix, tokenizer, seq, num_samples, seed, index_cache_dir(prefix))
            self.mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), 1).to(device)
        else:
            self.dataset = MLMDataset(default_prefix("bert", tokenizer), tokenizer, seq, num_samples, seed)

    def get(self, step, mb):
        n = len(self.dataset)
        items = [self.dataset[(step * mb + j) % n] for j in range(mb)]
        keys = [k for k in items[0] if not (self.arch == "gpt" and k == "attention_mask")]
        batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]).to(self.device, non_blocking=True)
                 for k in keys}
        if self.arch == "gpt":
            batch["attention_mask"] = self.mask
        return batch


def train_step(engine, model, batch):
    """One optimizer step (forward, engine.backward, engine.step); returns the detached loss."""
    loss = workload.loss(workload.arch_of(model), engine, batch)
    engine.backward(loss)
    engine.step()
    return loss.detach().float()
