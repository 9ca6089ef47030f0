"""The model walk: one training step of the real layer shapes on the meta device, counted.

A meta tensor has a shape, a dtype and a storage of the right size, and no data: megatron-core's
layers and Tempo's PyTorch implementations of its ops (tempo_ds.ops.reference*, the same saving
contract as the kernels; tempo_ds.ops._backend hands them out on meta) run on it in milliseconds
at any shape. One walk builds the variant's model (tempo_ds.bench.train_model.build_model, then
the engine's module swap, tempo_ds.deepspeed.apply.swap_model) and runs forward and backward on a
batch of the real sequence length and vocabulary, counting:

  kept    what autograd keeps for backward at the end of the forward
          (tempo_ds.memory.SavedTensorLedger, deduplicated by storage);
  peak    the most bytes alive at once during the step beyond those alive before it, from every
          storage an op makes (LiveBytes: a dispatch mode that counts each new storage until it
          is freed), so it holds the kept bytes, the temporaries of forward and backward (the
          logits and their gradient, the attention's and MLP's intermediates in backward, a
          recomputed layer's activations, the input gradients in flight) and the parameter
          gradients made by then.

Both are exact for the walked (layers, micro-batch). The kept bytes are bilinear in the two
(every layer is the same, and every activation has one batch dimension): a + b L + c mb + d L mb,
so four walks at L, mb in {1, 2} give them at any L and mb (count(), fit_bilinear), as
tests/test_plan.py checks against a direct walk. Constant: tensors without a batch dimension
(GPT's [1, 1, s, s] causal mask) and scalars; linear in L: per-layer tensors (Tempo's seeds);
in mb: everything else. The peak is not bilinear at small depth (which phase of the step peaks
changes with L and mb), so tempo_ds.plan.estimate walks the full depth for it.
"""
import contextlib
import dataclasses
import gc
import warnings
import weakref
from unittest import mock
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import workload

META = torch.device("meta")


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages that ops create while it is on, until each is freed.

    Storages alive before it started (parameters, the batch) are not counted; the peak is the
    most counted bytes alive at once. A storage is counted once however many views share it."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes = {}

    def _free(self, key):
        self.live -= self._sizes.pop(key)

    def _count(self, t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    _paused = 0

    @contextlib.contextmanager
    def paused(self):
        """Count nothing made inside the block (a kernel's temporaries)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def count(self, out):
        """Count the storages of the tensors in `out` (a tensor or a nest of them) not yet counted."""
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_nested:
                self._count(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self._paused:
            self.count(out)
        return out


@dataclass(frozen=True)
class Walk:
    """One walked step: `kept` bytes autograd keeps at the end of the forward (`kept_layers` of
    them saved inside the transformer layers, `kept_by_category` by op kind), `peak` bytes alive
    at once during forward and backward beyond what was alive before, `attention_ran`."""
    layers: int
    micro_batch: int
    kept: int
    kept_layers: int
    peak: int
    kept_by_category: dict = field(default_factory=dict)
    attention_ran: tuple = ()


@contextlib.contextmanager
def _fresh_megatron_buffer():
    """Megatron's stock attention borrows a persistent buffer from parallel_state's global memory
    buffer: empty it around the walk, so that the walk counts its allocation (on a GPU it is made
    in the first step and stays, so it is part of every step's peak)."""
    from megatron.core import parallel_state as ps

    def reset():
        ps.destroy_global_memory_buffer()
        ps._set_global_memory_buffer()
    reset()
    try:
        yield
    finally:
        reset()


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as it runs on a GPU for the shapes sdpa_runs_fused_kernel
    passes: the flash kernel, which keeps q, k, v, its output and the row logsumexp. On meta, SDPA
    itself would pick its math kernel (the s x s probabilities), which no GPU runs here."""
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                             False, scale=scale)[0]


def _gpu_flash_eligible(q, k, v, p, causal, scale, enable_gqa):
    """Whether SDPA runs a fused kernel for these inputs on a current NVIDIA GPU: half precision,
    a head dimension of at most 256 and equal for q, k and v, no grouped heads."""
    return (q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and q.shape[-1] == k.shape[-1] == v.shape[-1] and not enable_gqa)


class _Kernels:
    """An op family's PyTorch implementation standing for its kernels: while one runs, LiveBytes
    counts only what it returns (a kernel's outputs; the implementation's temporaries, e.g. the
    random words of a dropout mask, are registers in the kernel)."""

    def __init__(self, module, live):
        self._module, self._live = module, live

    def __getattr__(self, name):
        fn = getattr(self._module, name)

        def call(*args, **kwargs):
            with self._live.paused():
                out = fn(*args, **kwargs)
            self._live.count(out)
            return out
        return call


def _fused_dropout(input, p=0.5, training=True, inplace=False):
    """F.dropout as CUDA runs it: aten's native_dropout, which keeps a bool mask (a byte per
    element). Elsewhere (CPU, meta) aten decomposes dropout into a mask in the input's dtype."""
    if not training or p == 0.0:
        return input
    return torch.ops.aten.native_dropout(input, p, True)[0]


def _shape_only_keep_mask(seed, n, p, device=None):
    """keep_mask's bool [n] without its values (a meta seed has none to draw from)."""
    return torch.empty(n, dtype=torch.bool, device=device if device is not None else seed.device)


def _check_shapes_only(*args, **kwargs):
    """linear_cross_entropy's argument check reads the labels' values, which a meta batch lacks."""


@contextlib.contextmanager
def _as_on_gpu(live):
    """Scoped patches that make the meta walk take the GPU's paths: megatron's buffers on the
    walk's device (it allocates on torch.cuda.current_device()), SDPA's flash kernel where a GPU
    runs it, dropout's fused kernel, Tempo's ops as kernels (outputs counted, no temporaries; the dropout mask's values,
    which a meta seed cannot give, are not needed for its shape)."""
    from ..ops import _backend

    def meta_ops(family, device):
        # the PyTorch implementation whatever TEMPO_DS_OPS says: no kernels run on meta
        return _Kernels(_backend.FALLBACKS[family], live)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("torch.cuda.current_device", lambda: META))
        stack.enter_context(mock.patch("tempo_ds.megatron.core_attention.sdpa_runs_fused_kernel",
                                       _gpu_flash_eligible))
        stack.enter_context(mock.patch("torch.nn.functional.scaled_dot_product_attention", _flash_sdpa))
        stack.enter_context(mock.patch("torch.nn.functional.dropout", _fused_dropout))
        stack.enter_context(mock.patch("tempo_ds.ops.reference_dropout.keep_mask", _shape_only_keep_mask))
        stack.enter_context(mock.patch("tempo_ds.ops.cross_entropy._check", _check_shapes_only))
        stack.enter_context(mock.patch("tempo_ds.ops._backend.ops", meta_ops))
        # The fused loss head selects the labelled tokens (nonzero), whose count a meta tensor
        # does not know: take every token as labelled (GPT: exact; BERT's masked LM labels about
        # 15%, so its fused head is over-counted, never under).
        import torch.fx.experimental._config as fx_config
        stack.enter_context(mock.patch.object(fx_config, "meta_nonzero_assume_all_nonzero", True))
        yield


def _meta_batch(arch, mb, seq, vocab):
    """workload.make_batch's batch on the meta device. A GPT mask carries the causal verdict the
    Tempo attention would compute from its values (it reads it from the mask's cache), since a
    meta tensor has no values to compare."""
    from ..megatron.core_attention import _CAUSAL_VERDICT, is_causal_mask

    cpu = workload.make_batch(arch, mb, seq, vocab)
    # same sizes and strides (an expanded tensor keeps its one row of storage)
    batch = {k: torch.empty_strided(v.size(), v.stride(), dtype=v.dtype, device=META) for k, v in cpu.items()}
    if arch == "gpt":
        mask = batch["attention_mask"]
        setattr(mask, _CAUSAL_VERDICT, (mask._version, seq, seq, is_causal_mask(cpu["attention_mask"], seq, seq)))
    return batch


def build_meta_model(model, shape, seq, vocab, variant, dropout, bf16):
    """The variant's model as `bench train` runs it (tempo_ds.bench.train_model.build_model, then
    the engine's swap of the stock parts its "tempo" value turns on), on the meta device."""
    from ..bench.train_model import build_model
    from ..deepspeed.apply import swap_model
    from ..deepspeed.config import TempoConfig

    built = variant
    if isinstance(variant.tempo, dict) and variant.tempo.get("loss") is False:
        # The Tempo spec has the fused loss head built in: without it, a stock model swapped to
        # Tempo's modules (what tempo_ds.initialize does to a stock model) is the variant.
        built = dataclasses.replace(variant, tempo=False)
    with torch.device(META):
        net, _ = build_model(model, shape.num_layers, shape.hidden_size, shape.num_attention_heads, seq,
                             vocab, built, dropout, bf16, on_cpu=True)
    if variant.tempo:
        swap_model(net, TempoConfig.parse(variant.tempo), log=False)
    return net


def walk(model, shape, seq, vocab, variant, micro_batch, dropout=0.1, bf16=True, net=None, ledger=True):
    """One training step (forward, backward) of `variant` (a tempo_ds.bench.train_types.Variant)
    for `model` ("gpt2" or "bert") of `shape` (workload.Shape) at `micro_batch`, on the meta
    device; call inside workload.distributed(). Returns a Walk.

    net: the model of build_meta_model() to walk (built here when None; walks of one model at
    several micro-batches share it). ledger: count the kept bytes (False: the peak only, and
    kept=0; the ledger's graph walk is most of a walk's time)."""
    from ..memory import SavedTensorLedger
    from ..memory.__main__ import _split

    arch = workload.arch_of(model)
    with warnings.catch_warnings():
        # the ops' "no kernels for meta, using the PyTorch implementation" notice, once per family
        warnings.simplefilter("ignore")
        if net is None:
            net = build_meta_model(model, shape, seq, vocab, variant, dropout, bf16)
        batch = _meta_batch(arch, micro_batch, seq, vocab)
        for p in net.parameters():
            p.grad = None
        gc.collect()
        live = LiveBytes()
        with _as_on_gpu(live), _fresh_megatron_buffer(), live:
            with SavedTensorLedger(net) if ledger else contextlib.nullcontext() as book:
                loss = workload.loss(arch, net, batch)
            report = book.report(loss) if ledger else None
            loss.backward()
            del loss
        for p in net.parameters():
            p.grad = None
    layer_records = _split(report)[0] if ledger else []
    ran = tuple(sorted({m.last_path for m in net.modules() if getattr(m, "last_path", None)}))
    return Walk(layers=shape.num_layers, micro_batch=micro_batch, kept=report.total_bytes if ledger else 0,
                kept_layers=sum(r.nbytes for r in layer_records), peak=live.peak,
                kept_by_category=dict(report.by_category()) if ledger else {}, attention_ran=ran)


@dataclass(frozen=True)
class Bilinear:
    """a + b L + c mb + d L mb: a count at any layer count L and micro-batch mb."""
    a: float
    b: float
    c: float
    d: float

    def __call__(self, layers, micro_batch):
        return self.a + self.b * layers + self.c * micro_batch + self.d * layers * micro_batch

    def per_sample(self, layers):
        """Bytes each further sample adds at `layers` layers."""
        return self.c + self.d * layers


def fit_bilinear(values):
    """The Bilinear through {(L, mb): value} at L, mb in {1, 2}."""
    v11, v21, v12, v22 = values[1, 1], values[2, 1], values[1, 2], values[2, 2]
    d = v22 - v21 - v12 + v11
    b = v21 - v11 - d
    c = v12 - v11 - d
    return Bilinear(v11 - b - c - d, b, c, d)


@dataclass(frozen=True)
class Counts:
    """A variant's counts at any (L, mb): kept, kept inside the layers, peak; `by_category` the
    kept bytes per op kind at the walk's (L, mb) = (2, 2); `attention_ran` the attention path."""
    kept: Bilinear
    kept_layers: Bilinear
    peak: Bilinear
    by_category: dict
    attention_ran: tuple


def count(model, shape, seq, vocab, variant, dropout=0.1, bf16=True):
    """The four walks at L, mb in {1, 2} of `shape`'s hidden size and heads, fitted (Counts)."""
    walks = {}
    for layers in (1, 2):
        small = workload.Shape(layers, shape.hidden_size, shape.num_attention_heads)
        for mb in (1, 2):
            walks[layers, mb] = walk(model, small, seq, vocab, variant, mb, dropout, bf16)
    last = walks[2, 2]
    return Counts(kept=fit_bilinear({k: w.kept for k, w in walks.items()}),
                  kept_layers=fit_bilinear({k: w.kept_layers for k, w in walks.items()}),
                  peak=fit_bilinear({k: w.peak for k, w in walks.items()}),
                  by_category=last.kept_by_category, attention_ran=last.attention_ran)
