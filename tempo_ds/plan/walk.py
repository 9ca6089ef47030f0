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

Both are exact for the walked (layers, micro-batch). The step is also cut into segments at the
layer boundaries (_segment_marks; Walk.segments holds each one's peak), from which
tempo_ds.plan.scale gives the counts of a deep model from walks at two small depths.
"""
import contextlib
import dataclasses
import gc
import importlib
import re
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
        # the step cut into labelled segments (mark()): each label's most bytes alive
        self.segments = {}
        self._label, self._segment_peak = "pre", 0

    def mark(self, label):
        """End the current segment of the step and start one named `label`."""
        self._close()
        self._label, self._segment_peak = label, self.live

    def _close(self):
        self.segments[self._label] = max(self.segments.get(self._label, 0), self._segment_peak)

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
        self._segment_peak = max(self._segment_peak, self.live)
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
    at once during forward and backward beyond what was alive before, `attention_ran`;
    `segments` the peak of each part of the step (_segment_marks)."""
    layers: int
    micro_batch: int
    kept: int
    kept_layers: int
    peak: int
    kept_by_category: dict = field(default_factory=dict)
    attention_ran: tuple = ()
    segments: dict = field(default_factory=dict)


_LAYER_NAME = re.compile(r"(?:.*\.)?(?:layers|layer|h)\.\d+")
# a ledger record's module inside a transformer layer (megatron's decoder/encoder.layers.<k>,
# transformers' encoder.layer.<k> and h.<k>)
_LAYER_RECORD = re.compile(r"(?:.*\.)?(?:layers|layer|h)\.\d+(?:\.|$)")


def transformer_layers(net):
    """The transformer layers of a megatron-core or Hugging Face model, in order."""
    return [m for name, m in net.named_modules() if _LAYER_NAME.fullmatch(name)]


@contextlib.contextmanager
def _segment_marks(net, live):
    """Cut the step into segments at the layer boundaries (LiveBytes.mark): "pre" (embedding),
    ("fwd", k) the forward of layer k < L-1, "turn" (the last layer's forward, the head, the
    loss, and back through the last layer), ("bwd", k) the backward of layer k < L-1, "post"
    (the embedding's backward and the end). Forward marks come from the layers' forward
    pre-hooks, backward marks from a hook on each layer's input (it fires when the gradient of
    that input is made, i.e. the layer's backward is over). Yields a function that ends the
    forward phase: a recomputing backward runs the layers' forwards again, which mark nothing."""
    layers = transformer_layers(net)
    forward = [True]

    def pre_hook(k):
        def hook(module, args, kwargs):
            if not forward[0]:
                return
            live.mark(("fwd", k) if k < len(layers) - 1 else "turn")
            x = kwargs.get("hidden_states", args[0] if args else None)
            if isinstance(x, torch.Tensor) and x.requires_grad:
                x.register_hook(lambda grad: live.mark(("bwd", k - 1) if k else "post"))
        return hook
    handles = [layer.register_forward_pre_hook(pre_hook(k), with_kwargs=True) for k, layer in enumerate(layers)]
    try:
        yield lambda: forward.__setitem__(0, False)
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def tensor_parallel(tp=1):
    """workload.distributed(tp) for the walk. At tp > 1, in a process without a process group,
    over torch's "fake" backend at world size tp: one process is rank 0 of tp, megatron builds
    the rank's shards (its columns, rows and vocabulary rows), and a collective returns at once
    (a meta tensor has no values to reduce; the buffers a collective fills are made and counted
    as on a GPU). A process that has a group (a launched trainer) walks in it, at its TP."""
    import torch.distributed as dist

    with contextlib.ExitStack() as stack:
        if tp > 1 and not dist.is_initialized():
            from torch.testing._internal.distributed.fake_pg import FakeStore
            dist.init_process_group("fake", rank=0, world_size=tp, store=FakeStore())
            stack.callback(dist.destroy_process_group)
        yield stack.enter_context(workload.distributed(tp=tp))


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


_SDPA = torch.nn.functional.scaled_dot_product_attention


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as it runs on a GPU: for the inputs _gpu_flash_eligible
    passes (without a mask), the flash kernel, which keeps q, k, v, its output and the row
    logsumexp; on meta, SDPA itself would pick its math kernel (the s x s probabilities), which no
    GPU runs here. Other inputs (fp32, a mask) run SDPA as it is (transformers' SDPA in fp32)."""
    if attn_mask is not None or not _gpu_flash_eligible(query, key, value, dropout_p, is_causal, scale, enable_gqa):
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)
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
    random words of a dropout mask, are registers in the kernel).

    On meta a kernel's outputs depend only on its arguments' shapes, strides and dtypes and its
    other arguments, never on values (there are none). So a call whose arguments match an
    earlier call of the same walk (`memo`: every layer, every chunk of the loss head) makes
    outputs of the recorded layout without running the implementation again, each either a new
    storage or the same view of the same argument as before (_recipe); a call whose outputs do
    not fit that description is run every time."""

    def __init__(self, module, live, memo=None):
        self._module, self._live, self._memo = module, live, memo

    def __getattr__(self, name):
        fn = getattr(self._module, name)

        def call(*args, **kwargs):
            key = None if self._memo is None else _signature(name, args, kwargs)
            recipe = self._memo.get(key) if key is not None else None
            if recipe is not None:
                out = recipe(args)
            else:
                with self._live.paused():
                    out = fn(*args, **kwargs)
                    if key is not None and key not in self._memo:
                        # None: this call's outputs cannot be made from a recipe; it runs every time
                        self._memo[key] = _recipe(out, args)
            self._live.count(out)
            return out
        return call


def _layout(t):
    return (tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype, t.device.type)


def _signature(name, args, kwargs):
    """The memo key of a kernel call: each tensor's layout, each other argument's value; None
    (no memo) for an argument of another kind."""
    key = [name]
    for value in list(args) + sorted(kwargs.items()):
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
            key.append(value[0])
            value = value[1]
        if isinstance(value, torch.Tensor):
            key.append(_layout(value))
        elif value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
            key.append(value)
        else:
            return None
    return tuple(key)


def _recipe(out, args):
    """A function of the arguments that makes outputs laid out as `out`, or None when an output
    shares a storage with another output, or has a storage larger than its layout."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    inputs = {a.untyped_storage()._cdata: i for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    steps, seen = [], set()
    for o in outs:
        if not isinstance(o, torch.Tensor):
            if o is not None:
                return None
            steps.append(None)
            continue
        storage = o.untyped_storage()._cdata
        if storage in inputs:
            steps.append(("alias", inputs[storage], tuple(o.shape), tuple(o.stride()), o.storage_offset()))
            continue
        if storage in seen or o.storage_offset() or o.untyped_storage().nbytes() != torch.empty_strided(
                o.shape, o.stride(), dtype=o.dtype, device=META).untyped_storage().nbytes():
            return None
        seen.add(storage)
        steps.append(("new", tuple(o.shape), tuple(o.stride()), o.dtype))

    def make(args):
        # below the ledger's TorchFunctionMode, as the kernel's own allocations are
        with torch._C.DisableTorchFunction():
            made = [None if s is None else args[s[1]].as_strided(*s[2:]) if s[0] == "alias"
                    else torch.empty_strided(s[1], s[2], dtype=s[3], device=META) for s in steps]
        return made[0] if sequence is None else sequence(made)
    # the type only: the recipe must not keep this call's outputs alive
    sequence = type(out) if isinstance(out, (tuple, list)) else None
    return make


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
def _as_on_gpu(live, memo=True, framework="megatron"):
    """Scoped patches that make the meta walk take the GPU's paths: megatron's buffers on the
    walk's device (it allocates on torch.cuda.current_device()), SDPA's flash kernel where a GPU
    runs it, dropout's fused kernel, Tempo's ops as kernels (outputs counted, no temporaries; the dropout mask's values,
    which a meta seed cannot give, are not needed for its shape)."""
    from ..ops import _backend

    memo = {} if memo else None

    def meta_ops(family, device):
        # the PyTorch implementation whatever TEMPO_DS_OPS says: no kernels run on meta
        return _Kernels(_backend.FALLBACKS[family], live, memo)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("torch.cuda.current_device", lambda: META))
        stack.enter_context(mock.patch("tempo_ds.megatron.core_attention.sdpa_runs_fused_kernel",
                                       _gpu_flash_eligible))
        if framework == "hf":
            from . import hf
            stack.enter_context(hf.on_meta(_gpu_flash_eligible))
        stack.enter_context(mock.patch("torch.nn.functional.scaled_dot_product_attention", _flash_sdpa))
        stack.enter_context(mock.patch("torch.nn.functional.dropout", _fused_dropout))
        stack.enter_context(mock.patch("tempo_ds.ops.reference_dropout.keep_mask", _shape_only_keep_mask))
        stack.enter_context(mock.patch("tempo_ds.ops.cross_entropy._check", _check_shapes_only))
        stack.enter_context(mock.patch("tempo_ds.ops._backend.ops", meta_ops))
        # GELU's derivative table is built on a device's first backward and kept: built afresh
        # in every walk, so that each counts it alike (the first walk in a process would count
        # it alone, and the next ones not at all)
        gelu = importlib.import_module("tempo_ds.ops.gelu")  # the module (tempo_ds.ops.gelu is also a function)
        stack.enter_context(mock.patch.dict(gelu._tables, clear=True))
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


def build_meta_model(model, shape, seq, vocab, variant, dropout, bf16, tp=1, framework="megatron"):
    """The variant's model as `bench train` runs it (tempo_ds.bench.train_model.build_model, then
    the engine's swap of the stock parts its "tempo" value turns on), on the meta device, at
    tensor-parallel size `tp` (build inside tensor_parallel(tp)); framework "hf": the transformers
    model of tempo_ds.plan.hf (`model` a tempo_ds.hf.trainer.MODELS name)."""
    if framework == "hf":
        from . import hf
        return hf.build_meta_model(model, shape, seq, vocab, variant, dropout, bf16)
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
                             vocab, built, dropout, bf16, on_cpu=True, tp=tp)
    if variant.tempo:
        swap_model(net, TempoConfig.parse(variant.tempo), log=False)
    return net


def walk(model, shape, seq, vocab, variant, micro_batch, dropout=0.1, bf16=True, net=None, ledger=True, tp=1,
         memo=True, framework="megatron"):
    """One training step (forward, backward) of `variant` (a tempo_ds.bench.train_types.Variant)
    for `model` ("gpt2" or "bert") of `shape` (workload.Shape) at `micro_batch`, on the meta
    device; call inside tensor_parallel(tp). Returns a Walk.

    net: the model of build_meta_model() to walk (built here when None; walks of one model at
    several micro-batches share it). ledger: count the kept bytes (False: the peak only, and
    kept=0; the ledger's graph walk is most of a walk's time). memo: make the outputs of a kernel
    call that repeats an earlier one without running its implementation (_Kernels). framework:
    "megatron", or "hf" (`model` a tempo_ds.hf.trainer.MODELS name, tempo_ds.plan.hf)."""
    from ..memory import SavedTensorLedger
    from . import hf

    if framework == "hf":
        make_batch, step_loss = (lambda mb: hf.meta_batch(model, mb, seq)), hf.loss
    else:
        arch = workload.arch_of(model)
        make_batch, step_loss = (lambda mb: _meta_batch(arch, mb, seq, vocab)), (
            lambda net, batch: workload.loss(arch, net, batch))
    with warnings.catch_warnings():
        # the ops' "no kernels for meta, using the PyTorch implementation" notice, once per family
        warnings.simplefilter("ignore")
        if net is None:
            net = build_meta_model(model, shape, seq, vocab, variant, dropout, bf16, tp=tp, framework=framework)
        batch = make_batch(micro_batch)
        for p in net.parameters():
            p.grad = None
        gc.collect()
        live = LiveBytes()
        with _as_on_gpu(live, memo, framework), _fresh_megatron_buffer(), live, _segment_marks(net, live) as end_forward:
            with SavedTensorLedger(net) if ledger else contextlib.nullcontext() as book:
                loss = step_loss(net, batch)
            with live.paused():
                # the ledger's reading of the graph is bookkeeping, not the step
                report = book.report(loss) if ledger else None
            end_forward()
            loss.backward()
            del loss
            live.mark("end")
        for p in net.parameters():
            p.grad = None
    layer_records = [r for r in report.records if _LAYER_RECORD.match(r.module)] if ledger else []
    ran = tuple(sorted({m.last_path for m in net.modules() if getattr(m, "last_path", None)}))
    return Walk(layers=shape.num_layers, micro_batch=micro_batch, kept=report.total_bytes if ledger else 0,
                kept_layers=sum(r.nbytes for r in layer_records), peak=live.peak,
                kept_by_category=dict(report.by_category()) if ledger else {}, attention_ran=ran,
                segments=dict(live.segments))
