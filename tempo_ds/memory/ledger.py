"""The saved-memory ledger: what autograd keeps for backward, counted and attributed.

During a forward pass, every tensor that autograd saves passes through
torch.autograd.graph.saved_tensors_hooks. The ledger records each one, deduplicates by storage
(a tensor saved by two ops, e.g. the GELU output that the next Linear also saves, is counted
once, for the last op that saved it: the consumer that keeps it as its input, as a stock model's
Linear does, so an op that keeps its own output adds nothing for it), leaves out parameters, and
attributes each storage to the innermost module that was running, to the outermost torch function
that was running (F.dropout, F.softmax, ...) and to the autograd op that saved it. Its category is
the kind of op that keeps it (attention, matmul, gelu, norm, dropout, ...), the same kind for a
stock op and its Tempo twin (CATEGORY_RULES).

    with SavedTensorLedger(model) as ledger:
        loss = model(batch)
    report = ledger.report(loss)          # walks loss.grad_fn to name the op of every record
    print(report.table()); report.total_bytes

The report counts what is kept when it is made: a storage counts while some graph still holds
it, so make the report before backward frees the graph. A storage whose graphs are all gone does
not count, and a new storage that the allocator puts at its address counts afresh.

Saved-tensor hooks entered inside the ledger (torch.autograd.graph.save_on_cpu, non-reentrant
torch.utils.checkpoint, any saved_tensors_hooks) take the tensors saved under them: the innermost
hooks win, so the ledger never sees those tensors. The report warns, once per ledger, when the
graph it walks holds such tensors.

CLI: python -m tempo_ds.memory (see __main__.py)
"""
import re
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

# (what is matched, pattern, category); the first match wins. Categories are kinds of op, so a
# stock op and its Tempo twin fall in the same one whatever tensors each keeps:
#   "module"    a component of the saving module's qualified name: everything the attention core
#               keeps (stock: scores' q and k, softmax output, mask, dropout mask and dropped
#               probabilities; Tempo: its one Function's tensors) is attention;
#   "function"  the outermost torch function running at the save: stock dropout on CPU saves its
#               mask as a plain Mul's operand, known as dropout only by F.dropout running;
#   "op"        the autograd node's name without the trailing Backward<N>.
CATEGORY_RULES = [
    ("module", r"^core_attention$", "attention"),
    ("op", r"Attention|Flash|Efficient|SoftmaxDropoutMatmul", "attention"),
    ("function", r"^scaled_dot_product_attention$", "attention"),
    ("op", r"Gelu", "gelu"),
    ("op", r"LayerNorm|RmsNorm|RMSNorm", "norm"),
    ("function", r"^(layer_norm|rms_norm)$", "norm"),
    ("op", r"Dropout|BiasDropoutAdd", "dropout"),
    ("function", r"dropout", "dropout"),
    ("module", r"dropout", "dropout"),
    ("op", r"Softmax", "softmax"),
    ("op", r"Embedding", "embedding"),
    ("op", r"CrossEntropy|NllLoss|LogSoftmax", "loss"),
    ("op", r"^(Mm|Addmm|Bmm|Matmul|Linear|Baddbmm|Mv)|Linear", "matmul"),
    ("op", r"^(Mul|Div|Add|Sub)", "elementwise"),
]


def category_of(op_name, module="", function=""):
    """The kind of op that keeps a saved tensor: the first CATEGORY_RULES match for the autograd
    op `op_name`, the qualified name of the `module` saving it (each dotted component is tried)
    and the outermost torch `function` running then; "other" when none matches."""
    components = module.split(".") if module else []
    for what, pattern, category in CATEGORY_RULES:
        if what == "op":
            hit = re.search(pattern, op_name)
        elif what == "function":
            hit = bool(function) and re.search(pattern, function)
        else:
            hit = any(re.search(pattern, c) for c in components)
        if hit:
            return category
    return "other"


class _OutermostFunction(TorchFunctionMode):
    """Keeps the name of the outermost torch function running (F.dropout, F.softmax, a Tensor
    method), for the pack hook. A mode is off while its handler runs, so the calls that function
    makes are not seen: the name stays the outermost one."""

    name = ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        outer, self.name = self.name, getattr(func, "__name__", "")
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.name = outer


def _storage_key(t):
    storage = t.untyped_storage()
    # Every meta storage has address 0: its StorageImpl's address stands for it (tempo_ds.plan
    # walks models on the meta device).
    address = storage._cdata if t.device.type == "meta" else storage.data_ptr()
    return (t.device.type, t.device.index, address), storage.nbytes()


@dataclass
class SavedRecord:
    """One storage kept for backward."""
    key: tuple
    nbytes: int
    module: str
    shape: tuple
    dtype: torch.dtype
    op: str = "unknown"
    function: str = ""  # the outermost torch function running when it was saved ("" for none)
    declared: str = ""  # the category its saving autograd.Function declares (ledger_categories)

    @property
    def category(self):
        return self.declared or category_of(self.op, self.module, self.function)


@dataclass
class LedgerReport:
    """Saved storages of one forward pass, deduplicated, parameters excluded."""
    records: list = field(default_factory=list)

    @property
    def total_bytes(self):
        return sum(r.nbytes for r in self.records)

    def bytes_by(self, attribute):
        out = OrderedDict()
        for r in self.records:
            k = getattr(r, attribute)
            out[k] = out.get(k, 0) + r.nbytes
        return out

    def by_category(self):
        return self.bytes_by("category")

    def by_module(self):
        return self.bytes_by("module")

    def by_op(self):
        return self.bytes_by("op")

    def table(self, title="saved for backward"):
        lines = [f"{title}: {self.total_bytes:,} bytes", f"{'category':<14}{'bytes':>16}"]
        for k, v in sorted(self.by_category().items(), key=lambda kv: -kv[1]):
            lines.append(f"{k:<14}{v:>16,}")
        return "\n".join(lines)

    def to_dict(self):
        return {
            "total_bytes": self.total_bytes,
            "by_category": dict(self.by_category()),
            "by_op": dict(self.by_op()),
            "by_module": dict(self.by_module()),
        }


class _Packed:
    """What the pack hook returns, so what the graph holds until it frees the saving node: the
    saved tensor and where it was saved. The ledger keeps only weak references to these, so a
    storage counts exactly as long as some graph still holds it."""
    __slots__ = ("tensor", "module", "function", "op", "declared", "__weakref__")

    def __init__(self, tensor, module, function=""):
        # Detached: a node that saves its own output hands the pack hook that output, grad_fn and
        # all. Holding it here would make node -> packed -> tensor -> node, a cycle through C++
        # that Python's gc cannot break: the graph, and the storage, would never be freed.
        self.tensor = tensor.detach()
        self.module = module
        self.function = function
        self.op = "unknown"  # named by report(), when its walk reaches the saving node
        self.declared = ""  # a category the saving autograd.Function declares (_declare)


class SavedTensorLedger:
    """Context manager that records every tensor autograd saves during the enclosed forward.

    Args:
        model: optional nn.Module. Its parameters are excluded (by storage) and its submodules'
            qualified names are used for attribution. Without it, only nn.Parameter instances
            are excluded and records are attributed to "".

    The report counts storages that a graph still holds when it is made (so make it before
    backward). Tensors saved under saved-tensor hooks entered inside the ledger (save_on_cpu,
    non-reentrant checkpoint) are not seen; the report warns once when its graph holds some.
    """

    def __init__(self, model=None):
        self.model = model
        # storage key -> weak references to the _Packed saves of the storage now at that
        # address, in pack order (the last live one is the storage's owner)
        self._saved = OrderedDict()
        self._module_stack = [""]
        self._handles = []
        self._param_keys = set()
        self._hooks = None
        self._functions = None
        self._warned_inner_hooks = False

    # -- module attribution --------------------------------------------------------------------
    def _install_module_hooks(self):
        for name, module in self.model.named_modules():
            def pre(_mod, _args, name=name):
                self._module_stack.append(name)

            def post(_mod, _args, _out):
                self._module_stack.pop()

            self._handles.append(module.register_forward_pre_hook(pre))
            self._handles.append(module.register_forward_hook(post, always_call=True))

    # -- saved tensor hooks --------------------------------------------------------------------
    def _pack(self, t):
        if isinstance(t, torch.nn.Parameter):
            return t
        key, _ = _storage_key(t)
        if key in self._param_keys:
            return t
        saves = self._saved.get(key)
        if saves is not None and all(ref() is None for ref in saves):
            # Every graph that held the storage at this address has freed it, so this is a new
            # storage (a caching allocator reuses addresses at once): count it, for this saver.
            del self._saved[key]
            saves = None
        if saves is None:
            saves = self._saved[key] = []
        packed = _Packed(t, self._module_stack[-1], self._functions.name if self._functions else "")
        saves.append(weakref.ref(packed))
        return packed

    # what the unpack hook returns while _name_ops reads one node's saved tensors; None the rest
    # of the time, so that backward's unpacks keep nothing alive
    _unpacked = None

    @staticmethod
    def _unpack(packed):
        # Every tensor the ledger packed comes back through here (parameters as themselves), so
        # a saved tensor that does not was packed by other hooks.
        if SavedTensorLedger._unpacked is not None:
            SavedTensorLedger._unpacked.append(packed)
        return packed.tensor if isinstance(packed, _Packed) else packed

    def __enter__(self):
        if self.model is not None:
            self._param_keys = {_storage_key(p)[0] for p in self.model.parameters()}
            self._install_module_hooks()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        self._functions = _OutermostFunction()
        self._functions.__enter__()
        return self

    def __exit__(self, *exc):
        self._functions.__exit__(*exc)
        self._functions = None
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    # -- naming the ops ------------------------------------------------------------------------
    def _name_ops(self, outputs):
        """Walk the autograd graph from `outputs`, unpacking every saved tensor of every node so
        that the unpack hook tells which of the ledger's saves belongs to which node.

        Returns the number of saved tensors that other hooks packed in nodes made while the
        ledger was packing: nodes whose sequence numbers (per thread, increasing with creation)
        lie among those of the nodes the ledger packed for, or any node if it packed for none.
        Nodes made before the ledger (a graph it extends) come before all of its own."""
        roots = [o.grad_fn for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
        seen, stack = set(), list(roots)
        ours, others = [], []  # sequence numbers; (sequence number, tensors) for the others
        try:
            while stack:
                node = stack.pop()
                if node is None or node in seen:
                    continue
                seen.add(node)
                op = re.sub(r"Backward\d*$", "", node.name())
                n_ours = n_others = 0
                for tensor_getter in self._saved_getters(node):
                    SavedTensorLedger._unpacked = []
                    try:
                        saved = tensor_getter()
                    except RuntimeError:  # freed already (retain_graph=False after a backward)
                        continue
                    for packed in SavedTensorLedger._unpacked:
                        if isinstance(packed, _Packed):
                            packed.op = op
                    _declare(node, saved, SavedTensorLedger._unpacked)
                    n_ours += len(SavedTensorLedger._unpacked)
                    # A Python scalar operand (x * 2) is saved as a 0-dim "wrapped number", which
                    # autograd saves without any hooks: only tensors with dimensions that did not
                    # come through the ledger are evidence of other hooks.
                    ours_with_dims = sum((p.tensor if isinstance(p, _Packed) else p).dim() > 0
                                         for p in SavedTensorLedger._unpacked)
                    n_others += sum(t.dim() > 0 for t in _tensors(saved)) - ours_with_dims
                if n_ours:
                    ours.append(node._sequence_nr())
                if n_others:
                    others.append((node._sequence_nr(), n_others))
                stack.extend(fn for fn, _ in node.next_functions)
        finally:
            SavedTensorLedger._unpacked = None  # hold no saved tensor past the walk
        if not ours:
            return sum(n for _, n in others)
        return sum(n for seq, n in others if min(ours) < seq < max(ours))

    @staticmethod
    def _saved_getters(node):
        names = [a for a in dir(node) if a.startswith("_saved_") and not a.endswith(("sizes", "strides"))]
        getters = [lambda a=a: getattr(node, a) for a in names]
        if hasattr(node, "saved_tensors"):  # custom autograd.Function
            getters.append(lambda: node.saved_tensors)
        return getters

    def report(self, outputs=None):
        """The report of the storages still held for backward; pass the forward's output(s) to
        name the saving op of each record (a record whose saver the walk does not reach keeps
        op "unknown")."""
        if outputs is not None:
            if isinstance(outputs, torch.Tensor):
                outputs = [outputs]
            hidden = self._name_ops(list(outputs))
            if hidden and not self._warned_inner_hooks:
                self._warned_inner_hooks = True
                warnings.warn(
                    f"SavedTensorLedger: {hidden} saved tensor(s) in this graph were packed by "
                    "other saved-tensor hooks entered inside the ledger (save_on_cpu, non-reentrant "
                    "checkpoint, ...); the innermost hooks win, so the report leaves them out",
                    stacklevel=2)
        records = []
        for key, saves in list(self._saved.items()):
            live = [p for p in (ref() for ref in saves) if p is not None]
            if not live:  # every graph that held it is gone: not kept for backward
                del self._saved[key]
                continue
            # The last live save names the storage, module and op alike: the last op that keeps
            # it, the consumer that saves its input (Linear after Tempo's GELU or norm, which
            # keep their outputs), so each op's figure is what it adds to the others.
            owner = live[-1]
            t = owner.tensor
            records.append(SavedRecord(key, t.untyped_storage().nbytes(), owner.module, tuple(t.shape),
                                       t.dtype, owner.op, owner.function, owner.declared))
        return LedgerReport(records)


def _declare(node, saved, unpacked):
    """A fused autograd.Function keeps tensors of several kinds: its class may declare the
    category of some (`ledger_categories`, {index in ctx.saved_tensors: category}), e.g. the
    fused linear cross-entropy's hidden, which stock code's Linear keeps as "matmul"."""
    declared = getattr(getattr(node, "_forward_cls", None), "ledger_categories", None)
    if not declared or not isinstance(saved, tuple):
        return
    present = [i for i, t in enumerate(saved) if t is not None]
    for index, packed in zip(present, unpacked):
        if isinstance(packed, _Packed) and index in declared:
            packed.declared = declared[index]


def _tensors(saved):
    """The tensors in what a node's saved-tensor getter returned (a tensor, None, a list, ...)."""
    if isinstance(saved, torch.Tensor):
        return [saved]
    if isinstance(saved, (tuple, list)):
        return [t for t in saved if isinstance(t, torch.Tensor)]
    return []


def measure(fn, model=None):
    """Run fn() under a ledger and return (output, report)."""
    with SavedTensorLedger(model) as ledger:
        out = fn()
    return out, ledger.report(out)
