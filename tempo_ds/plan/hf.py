"""The planner's Hugging Face models (--framework hf): the models, batch and loss of
`python -m tempo_ds.bench train --framework hf` (tempo_ds/bench/train_hf_model.py), on the meta
device, for tempo_ds.plan.walk.

The model is tempo_ds.hf.trainer.build_model's (from config, the variant's attention), cast to
bf16 as DeepSpeed's bf16 engine casts it, with transformers' reentrant gradient checkpointing for
sdpa-ckpt and tempo_ds.hf.apply for tempo, as the bench builds it. The batch is full-length
sequences without an attention mask: transformers drops an all-ones mask before SDPA (it
decides so from the mask's values, which a meta tensor has none of), so a packed batch runs the
fused kernel as here; a padded batch would run SDPA's memory-efficient kernel with the mask.
"""
import contextlib
from unittest import mock

import torch

META = torch.device("meta")


def family_of(name):
    """The transformers family ("bert", "roberta", "gpt2") of a tempo_ds.hf.trainer.MODELS name."""
    from ..hf.trainer import MODELS
    if name not in MODELS:
        raise ValueError(f"{name!r} with --framework hf: one of {', '.join(MODELS)}")
    return MODELS[name][0]


def default_shape(name, size=None):
    """(size name, workload.Shape) of a MODELS name at `size` (default: the name's own)."""
    from ..hf.trainer import shape_for
    _, size, shape = shape_for(name, size)
    return size, shape


def default_vocab(name):
    from ..hf.trainer import VOCAB
    return VOCAB[family_of(name)]


def build_meta_model(name, shape, seq, vocab, variant, dropout, bf16):
    """The variant's transformers model (a tempo_ds.bench.train_types.HF_VARIANTS row) as the
    bench runs it, on the meta device."""
    import tempo_ds.hf
    from ..hf.trainer import build_model

    with torch.device(META):
        net, _ = build_model(name, layers=shape.num_layers, hidden=shape.hidden_size, heads=shape.num_attention_heads,
                             seq_length=seq, vocab_size=vocab, dropout=dropout,
                             attn_implementation=variant.attn_implementation)
    if bf16:
        net = net.to(torch.bfloat16)
    net.train()
    if variant.recompute:
        # the bench's: reentrant, so the ledger sees what each checkpoint keeps
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if variant.tempo:
        tempo_ds.hf.apply(net, variant.tempo, log=False, build_ops=False)
    return net


def meta_batch(name, mb, seq):
    """The bench's batch names (tempo_ds.hf.trainer.HFDataset) on meta: input_ids, labels, and
    token_type_ids for BERT; no attention mask (module docstring)."""
    ids = torch.empty(mb, seq, dtype=torch.long, device=META)
    batch = {"input_ids": ids, "labels": torch.empty(mb, seq, dtype=torch.long, device=META)}
    if family_of(name) == "bert":
        batch["token_type_ids"] = torch.empty(mb, seq, dtype=torch.long, device=META)
    return batch


def loss(net, batch):
    """The model's own loss (masked LM or causal LM), as train_hf_model.loss."""
    return net(**batch).loss


@contextlib.contextmanager
def on_meta(fused_eligible):
    """Scoped patches for the walk of a transformers model on meta: the "tempo" attention's
    fused-kernel check answers as on a GPU (`fused_eligible`, without a mask), and transformers'
    search for packed sequences in the position ids (it reads their values) answers what it
    answers for the bench's batch, one sequence per sample."""
    from transformers import masking_utils

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch(
            "tempo_ds.hf.attention.sdpa_runs_fused_kernel",
            lambda q, k, v, p, causal, scale, enable_gqa=False, mask=None:
            mask is None and fused_eligible(q, k, v, p, causal, scale, enable_gqa)))
        if hasattr(masking_utils, "find_packed_sequence_indices"):
            stack.enter_context(mock.patch.object(masking_utils, "find_packed_sequence_indices",
                                                  lambda position_ids: None))
        yield
