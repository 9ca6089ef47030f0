"""The one workload: megatron-core GPT and BERT models, their batches, their loss and the process
group they run in. The trainer, the ledger CLI, the benchmarks and the tests all build through here.

    with workload.distributed(tp=1) as device:              # process group, parallel state, CPU patches
        config = workload.model_config(workload.shape_of("gpt", "tiny"), dropout=0.1)
        model = workload.build_model("gpt", config, spec="tempo", vocab_size=256, seq_length=128,
                                     device=device)
        batch = workload.make_batch("gpt", 2, 128, 256, device=device)
        workload.loss("gpt", model, batch).backward()

Stock ("stock": megatron-core's local spec) and Tempo ("tempo": tempo_ds.megatron's spec) models
built from the same config and the same torch seed have the same parameters, names and initial
values (the Tempo modules draw no random numbers at construction), so their checkpoints load into
each other and a comparison starts from one model.

A DeepSpeed caller enters launcher_env() before distributed() and reseeds every step with
reseed(seed, step). Architectures are "gpt" and "bert"; arch_of() maps the user-facing name
"gpt2" of the launch scripts and benchmarks.

One batch format (the names of the models' forward arguments):
    GPT   tokens [b, s], labels [b, s], position_ids [b, s], attention_mask bool [1 or b, 1, s, s]
          (True = masked), loss_mask [b, s] (optional; without it every token counts)
    BERT  tokens, labels, attention_mask [b, s] (1 = keep), tokentype_ids [b, s], is_random [b]
          (the next-sentence label, read when the model has its binary head), loss_mask (optional)
tempo_ds.data.datasets yields these names; make_batch makes random ones.
"""
import atexit
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ARCHS = ("gpt", "bert")
SPECS = ("stock", "tempo")
RECOMPUTE = (None, "selective", "full")
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
# User-facing model names (launch scripts, --model / --models options) -> architecture.
_USER_ARCHS = {"gpt2": "gpt", "gpt": "gpt", "bert": "bert"}


def arch_of(name):
    """The architecture ("gpt" or "bert") of a user-facing model name ("gpt2", "gpt" or "bert")."""
    if name not in _USER_ARCHS:
        raise ValueError(f"model {name!r}: expected one of {', '.join(_USER_ARCHS)}")
    return _USER_ARCHS[name]


@dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden_size: int
    num_attention_heads: int


SIZES = {
    "gpt": {
        "tiny": Shape(2, 64, 4),
        "124m": Shape(12, 768, 12),
        "345m": Shape(24, 1024, 16),
        "774m": Shape(36, 1280, 20),
        "1.5b": Shape(48, 1600, 25),
    },
    "bert": {
        "tiny": Shape(2, 64, 4),
        "base": Shape(12, 768, 12),
        "large": Shape(24, 1024, 16),
    },
}


def shape_of(arch, size):
    """The Shape of a named size of `arch` (a key of SIZES[arch]); a Shape passes through."""
    if isinstance(size, Shape):
        return size
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r}: expected one of {ARCHS}")
    if size not in SIZES[arch]:
        raise ValueError(f"size {size!r} for {arch}: expected one of {', '.join(SIZES[arch])}")
    return SIZES[arch][size]


def padded_vocab_size(vocab_size, tp, multiple=128):
    """Megatron splits the embedding rows over tensor-parallel ranks: pad to a multiple of
    `multiple` * tp, as Megatron-LM does."""
    unit = multiple * tp
    return -(-vocab_size // unit) * unit


def _recompute_settings(recompute):
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute {recompute!r}: expected one of {RECOMPUTE}")
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    return {}


def model_config(shape, *, tp=1, dropout=0.0, dtype=torch.float32, recompute=None, cpu_init=True,
                 **overrides):
    """The TransformerConfig of every model here.

    Args:
        shape: a Shape (shape_of(arch, size) gives the named sizes).
        tp: tensor-parallel size (must equal parallel_state's when the model is built).
        dropout: hidden and attention dropout probability.
        dtype: parameter dtype (bf16/fp16 set the matching config flag).
        recompute: None, "selective" (core attention) or "full" (every layer, uniform).
        cpu_init: draw weights whole from the CPU generator and then split them, so a TP=2 model
            equals the TP=1 model of the same seed; on GPU per-rank initialization is faster.
        overrides: further TransformerConfig fields (e.g. normalization="RMSNorm").
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not isinstance(shape, Shape):
        raise TypeError(f"shape {shape!r}: expected a Shape (shape_of(arch, size) names them)")
    settings = dict(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads, ffn_hidden_size=4 * shape.hidden_size,
        tensor_model_parallel_size=tp, hidden_dropout=dropout, attention_dropout=dropout,
        activation_func=F.gelu, layernorm_epsilon=1e-5, init_method_std=0.02,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=cpu_init,
        # The fusions need apex / Megatron extensions that are not installed, or (bias-GELU) save
        # the activation's input and defeat the Tempo GELU.
        bias_activation_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        bias_dropout_fusion=False, persist_layer_norm=False, apply_query_key_layer_scaling=False,
        **_recompute_settings(recompute),
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


def build_model(arch, config, *, spec="stock", attention="auto", vocab_size, seq_length, nsp=True,
                device=None):
    """The GPTModel / BertModel of `config` with the stock local spec or the Tempo spec; the one
    place a model is built. parallel_state must be initialized (distributed()).

    Args:
        arch: "gpt" or "bert".
        config: a TransformerConfig from model_config().
        spec: "stock" (megatron-core's local spec) or "tempo" (tempo_ds.megatron's spec).
        attention: TempoCoreAttention path of the Tempo spec ("auto", "flash" or "tempo").
        vocab_size: the tokenizer's vocabulary; padded here for tensor parallelism.
        seq_length: maximum sequence length (learned absolute positions).
        nsp: BERT only: the binary (next-sentence) head and token types.
        device: where the model goes (None: stays on CPU).

    The model is cast to config.params_dtype (the stock norms are created in float32).
    """
    if arch not in ARCHS or spec not in SPECS:
        raise ValueError(f"arch {arch!r} / spec {spec!r}: expected {ARCHS} / {SPECS}")
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.bert.bert_model import BertModel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from . import megatron as tm
    from .megatron import compat

    vocab = padded_vocab_size(vocab_size, config.tensor_model_parallel_size)
    if arch == "gpt":
        if spec == "stock":
            layer_spec = get_gpt_layer_local_spec()
        else:
            config, layer_spec = tm.tempo_gpt_model_spec(config, attention=attention)
        with compat.quiet_gpt_model_deprecation():
            # the Tempo spec's GPTModel has the fused loss head (tempo_ds.megatron.loss_head)
            model = (GPTModel if spec == "stock" else tm.TempoGPTModel)(
                config=config, transformer_layer_spec=layer_spec, vocab_size=vocab,
                max_sequence_length=seq_length, share_embeddings_and_output_weights=True,
                position_embedding_type="learned_absolute")
    else:
        if spec == "stock":
            cls, layer_spec = BertModel, bert_layer_local_spec
        else:
            cls = tm.TempoBertModel
            config, layer_spec = tm.tempo_bert_model_spec(config, attention=attention)
        model = cls(config=config, num_tokentypes=2 if nsp else 0, transformer_layer_spec=layer_spec,
                    vocab_size=vocab, max_sequence_length=seq_length, add_binary_head=nsp,
                    share_embeddings_and_output_weights=True)
    model = model.to(config.params_dtype)
    return model if device is None else model.to(device)


def make_batch(arch, batch_size, seq, vocab_size, seed=0, device=None):
    """Random tokens and labels in the batch format (module docstring), with explicit masks
    (megatron's default masks assume CUDA). BERT: the last sample has its final quarter padded so
    that the mask matters. No loss_mask: every token counts."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch_size, seq), generator=g)
    labels = torch.randint(0, vocab_size, (batch_size, seq), generator=g)
    if arch == "gpt":
        batch = dict(tokens=tokens, labels=labels,
                     position_ids=torch.arange(seq).expand(batch_size, seq),
                     attention_mask=torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), 1))
    elif arch == "bert":
        padding = torch.ones(batch_size, seq, dtype=torch.long)
        padding[-1, seq - seq // 4:] = 0
        batch = dict(tokens=tokens, labels=labels, attention_mask=padding,
                     tokentype_ids=(torch.arange(seq) >= seq // 2).long().expand(batch_size, seq),
                     is_random=torch.randint(0, 2, (batch_size,), generator=g))
    else:
        raise ValueError(f"arch {arch!r}: expected one of {ARCHS}")
    return batch if device is None else {k: v.to(device) for k, v in batch.items()}


def _at_least_fp32(t):
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _token_mean(per_token, batch):
    """Mean over the tokens loss_mask keeps (all tokens without one)."""
    per_token = _at_least_fp32(per_token)
    mask = batch.get("loss_mask")
    if mask is None:
        return per_token.mean()
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def loss(arch, model, batch, return_logits=False):
    """Forward through the head; the mean token loss (+ the next-sentence loss of a BERT with its
    binary head). `model` may be a DeepSpeed engine.

    With return_logits=False the token losses are megatron's own (vocab-parallel cross-entropy
    inside the model); with return_logits=True the model returns logits, the token losses are
    F.cross_entropy on them (the same math, and the logits can be compared), and (loss, logits)
    comes back.
    """
    labels = None if return_logits else batch["labels"]
    if arch == "gpt":
        lm, binary_logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                                  labels=labels), None
    elif arch == "bert":
        out = model(batch["tokens"], batch["attention_mask"], tokentype_ids=batch["tokentype_ids"],
                    lm_labels=labels)
        lm, binary_logits = out if isinstance(out, tuple) else (out, None)
    else:
        raise ValueError(f"arch {arch!r}: expected one of {ARCHS}")
    if return_logits:
        per_token = F.cross_entropy(_at_least_fp32(lm).flatten(0, -2), batch["labels"].flatten(),
                                    reduction="none").view_as(batch["labels"])
        total = _token_mean(per_token, batch)
    else:
        total = _token_mean(lm, batch)
    if binary_logits is not None:
        total = total + F.cross_entropy(_at_least_fp32(binary_logits), batch["is_random"])
    return (total, lm) if return_logits else total


@contextlib.contextmanager
def distributed(tp=1, seed=1234):
    """The process group and megatron's parallel state for the `with` block; yields the device.

    Makes the process group unless one exists: from the launcher's environment (RANK, ...) when
    there is one, else a one-process group on a free local port (nothing left in os.environ, so
    subprocesses do not inherit it); gloo on CPU, nccl on GPU. Makes megatron's parallel state at
    tensor-parallel size `tp` unless it exists (it must then have that size), and seeds the RNG
    tracker from `seed`, which model-parallel dropout and recomputation draw from. Without CUDA
    the block runs under tempo_ds.megatron.cpu_patches(). On exit, undoes what it set up:
    parallel state and process group it created, and the patches.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from .megatron.cpu import cpu_patches
    from .megatron.parallel import free_local_port

    on_cpu = not torch.cuda.is_available()
    with contextlib.ExitStack() as stack:
        stack.enter_context(cpu_patches())
        if not dist.is_initialized():
            backend = "gloo" if on_cpu else "nccl"
            if "RANK" in os.environ:
                dist.init_process_group(backend)
            else:
                dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_local_port()}",
                                        rank=0, world_size=1)
            stack.callback(dist.destroy_process_group)
        if on_cpu:
            device = torch.device("cpu")
        else:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(tensor_model_parallel_size=tp)
            stack.callback(ps.destroy_model_parallel)
        elif ps.get_tensor_model_parallel_world_size() != tp:
            raise ValueError(f"tp={tp}: megatron's parallel state already exists with tensor-parallel "
                             f"size {ps.get_tensor_model_parallel_world_size()}")
        model_parallel_cuda_manual_seed(seed)
        yield device


@contextlib.contextmanager
def launcher_env():
    """Without a launcher, run as rank 0 of 1 inside the block, for DeepSpeed, which reads RANK,
    LOCAL_RANK and the rest from the environment (and otherwise looks for MPI). Enter it before
    distributed(), which then makes its group from these variables. They are removed on exit, so
    no later subprocess inherits this process group's port."""
    if "RANK" in os.environ:
        yield
        return
    from .megatron.parallel import free_local_port
    # Without RANK no launcher set this process up, so a MASTER_PORT in the environment is a
    # leftover of some other process group: take a free port instead.
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_local_port()))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def reseed(seed, step):
    """Dropout masks of step k depend on (seed, k, data-parallel rank) only: resuming at k
    replays the uninterrupted run. Tensor-parallel ranks share the default generator's seed
    (Megatron forks its tracker for the sharded parts)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    step_seed = seed + 1000003 * step + 7919 * ps.get_data_parallel_rank()
    torch.manual_seed(step_seed)
    model_parallel_cuda_manual_seed(step_seed % (2 ** 31))


# Contexts held until the process exits (hold()).
_HELD = contextlib.ExitStack()
atexit.register(_HELD.close)


def hold(context):
    """Enter `context` (e.g. distributed()) until the process exits and return what it yields.

    For one-shot benchmark processes whose loop is not theirs to put inside a `with` block (the
    ops benchmark calls its cases one by one); everything else uses `with`. Holding the same
    kind of context again nests it (distributed() reuses the group, the CPU patches count)."""
    return _HELD.enter_context(context)
