"""Real megatron-core GPT and BERT models, stock local spec or Tempo spec, for the ledger CLI and
the tests.

    init_distributed()                                  # gloo, one process, TP=1 (if not done)
    config = model_config(layers=2, hidden=256, heads=4)
    model = build_model("gpt", "tempo", config, vocab_size=1024, max_seq=128)
    batch = make_batch("gpt", batch_size=1, seq=128, vocab_size=1024)
    loss = forward_loss("gpt", model, batch)           # the head included: logits and loss

Both specs are built from the same config, so with the same torch seed they get the same weights.
"""

import torch
import torch.nn.functional as F

ARCHS = ("gpt", "bert")
SPECS = ("stock", "tempo")
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


def init_distributed(tensor_parallel=1):
    """Make a one-process group (gloo; nccl with CUDA) unless one exists, and megatron's parallel
    state.

    On a machine without CUDA this also calls tempo_ds.megatron.enable_cpu() and seeds the RNG
    tracker, which megatron's model-parallel dropout and recomputation need.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from ..megatron import enable_cpu
    from ..megatron.parallel import free_local_port
    enable_cpu()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_local_port()}",
                                rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)
    model_parallel_cuda_manual_seed(1234)


def model_config(layers=2, hidden=256, heads=4, dtype=torch.float32, dropout=0.0, **overrides):
    """A TransformerConfig for small CPU/GPU runs: no apex/TE fusions, no jit-compiled fusions
    (torch.compile on CPU would take longer than the run), weights initialised on CPU from the
    global torch seed so that TP=1 and TP=2 start from the same full matrices."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    settings = dict(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        hidden_dropout=dropout, attention_dropout=dropout,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=True, gradient_accumulation_fusion=False,
        masked_softmax_fusion=False, bias_dropout_fusion=False, bias_activation_fusion=False,
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


def build_model(arch, spec, config, vocab_size, max_seq, attention="auto"):
    """GPTModel or BertModel with the stock local spec ("stock") or the Tempo spec ("tempo").

    The model is cast to config.params_dtype (the stock norms are created in float32) and, where
    CUDA is available, moved to the current GPU. BERT gets its binary (sentence-order) head.
    """
    if arch not in ARCHS or spec not in SPECS:
        raise ValueError(f"arch {arch!r} / spec {spec!r}: expected {ARCHS} / {SPECS}")
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.bert.bert_model import BertModel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from .. import megatron as tm

    if arch == "gpt":
        if spec == "stock":
            layer_spec = get_gpt_layer_local_spec()
        else:
            config, layer_spec = tm.tempo_gpt_model_spec(config, attention=attention)
        model = GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=vocab_size,
                         max_sequence_length=max_seq)
    else:
        if spec == "stock":
            cls, layer_spec = BertModel, bert_layer_local_spec
        else:
            cls = tm.TempoBertModel
            config, layer_spec = tm.tempo_bert_model_spec(config, attention=attention)
        model = cls(config=config, transformer_layer_spec=layer_spec, vocab_size=vocab_size,
                    max_sequence_length=max_seq, num_tokentypes=2, add_binary_head=True)
    model = model.to(config.params_dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    return model


def make_batch(arch, batch_size, seq, vocab_size, seed=0, device=None):
    """Random tokens and labels with explicit masks (megatron's default masks assume CUDA).

    GPT: causal mask [1, 1, s, s], True = masked. BERT: padding mask [b, s], 1 = keep; the last
    sample has its final quarter padded so that the mask matters.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch_size, seq), generator=g)
    labels = torch.randint(0, vocab_size, (batch_size, seq), generator=g)
    if arch == "gpt":
        batch = dict(tokens=tokens, labels=labels,
                     position_ids=torch.arange(seq).expand(batch_size, seq),
                     attention_mask=torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), 1))
    else:
        padding = torch.ones(batch_size, seq, dtype=torch.long)
        padding[-1, seq - seq // 4:] = 0
        batch = dict(tokens=tokens, labels=labels, attention_mask=padding,
                     tokentype_ids=(torch.arange(seq) >= seq // 2).long().expand(batch_size, seq),
                     sop_labels=torch.randint(0, 2, (batch_size,), generator=g))
    return {k: v.to(device) for k, v in batch.items()}


def _at_least_fp32(t):
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def forward_loss(arch, model, batch, return_logits=False):
    """Forward through the head; returns the mean loss (and the LM logits if asked).

    With return_logits=False the loss is megatron's own (vocab-parallel cross-entropy inside the
    model); with return_logits=True the model returns logits and the loss is F.cross_entropy on
    them (identical math, and the logits can be compared). BERT adds the sentence-order loss.
    """
    labels = None if return_logits else batch["labels"]
    if arch == "gpt":
        out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=labels)
        lm = out
    else:
        lm, binary_logits = model(batch["tokens"], batch["attention_mask"],
                                  tokentype_ids=batch["tokentype_ids"], lm_labels=labels)
    if return_logits:
        logits = lm
        loss = F.cross_entropy(_at_least_fp32(logits).reshape(-1, logits.shape[-1]),
                               batch["labels"].reshape(-1))
    else:
        logits, loss = None, _at_least_fp32(lm).mean()
    if arch == "bert":
        loss = loss + F.cross_entropy(_at_least_fp32(binary_logits), batch["sop_labels"])
    return (loss, logits) if return_logits else loss
