"""The saved-memory ledger: what autograd keeps for backward, counted and attributed.

During a forward pass, every tensor that autograd saves passes through
torch.autograd.graph.saved_tensors_hooks. The ledger records each one, deduplicates by storage
(a tensor saved by two ops, e.g. the GELU output that the next Linear also saves, is counted
once, for the first op that saved it), leaves out parameters, and attributes each storage to
the innermost module that was running and to the autograd op that saved it.

    with SavedTensorLedger(model) as ledger:
        loss = model(batch)
    report = ledger.report(loss)          # walks loss.grad_fn to name the op of every record
    print(report.table()); report.total_bytes

CLI: python -m tempo_ds.memory (see __main__.py)
"""
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

# Autograd node name (without the trailing Backward<N>) -> op category, first match wins.
CATEGORY_RULES = [
    (r"Gelu", "gelu"),
    (r"LayerNorm|RmsNorm|RMSNorm", "norm"),
    (r"Softmax", "softmax"),
    (r"Dropout|BiasDropoutAdd", "dropout"),
    (r"Attention|Flash|Efficient", "attention"),
    (r"Embedding", "embedding"),
    (r"CrossEntropy|NllLoss|LogSoftmax", "loss"),
    (r"^(Mm|Addmm|Bmm|Matmul|Linear|Baddbmm|Mv)|Linear", "matmul"),
    (r"^(Mul|Div|Add|Sub)", "elementwise"),
]


def category_of(op_name):
    for pattern, category in CATEGORY_RULES:
        if re.search(pattern, op_name):
            return category
    return "other"


def _storage_key(t):
    storage = t.untyped_storage()
    return (t.device.type, t.device.index, storage.data_ptr()), storage.nbytes()


@dataclass
class SavedRecord:
    """One storage kept for backward."""
    key: tuple
    nbytes: int
    module: str
    shape: tuple
    dtype: torch.dtype
    op: str = "unknown"

    @property
    def category(self):
        return category_of(self.op)


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
    __slots__ = ("tensor", "record")

    def __init__(self, tensor, record):
        self.tensor = tensor
        self.record = record


class SavedTensorLedger:
    """Context manager that records every tensor autograd saves during the enclosed forward.

    Args:
        model: optional nn.Module. Its parameters are excluded (by storage) and its submodules'
            qualified names are used for attribution. Without it, only nn.Parameter instances
            are excluded and records are attributed to "".
    """

    def __init__(self, model=None):
        self.model = model
        self._records = OrderedDict()  # storage key -> SavedRecord (first saver)
        self._module_stack = [""]
        self._handles = []
        self._param_keys = set()
        self._hooks = None

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
        key, nbytes = _storage_key(t)
        if key in self._param_keys:
            return t
        record = self._records.get(key)
        if record is None:
            record = SavedRecord(key, nbytes, self._module_stack[-1], tuple(t.shape), t.dtype)
            self._records[key] = record
        return _Packed(t, record)

    # records unpacked while _name_ops reads one node's saved tensors
    _unpacked = []

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, _Packed):
            SavedTensorLedger._unpacked.append(packed.record)
            return packed.tensor
        return packed

    def __enter__(self):
        if self.model is not None:
            self._param_keys = {_storage_key(p)[0] for p in self.model.parameters()}
            self._install_module_hooks()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    # -- naming the ops ------------------------------------------------------------------------
    def _name_ops(self, outputs):
        """Walk the autograd graph from `outputs`, unpacking every saved tensor of every node so
        that the unpack hook tells which record belongs to which node."""
        roots = [o.grad_fn for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
        seen, stack = set(), list(roots)
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            op = re.sub(r"Backward\d*$", "", node.name())
            for tensor_getter in self._saved_getters(node):
                SavedTensorLedger._unpacked = []
                try:
                    tensor_getter()
                except RuntimeError:  # freed already (retain_graph=False after a backward)
                    continue
                for record in SavedTensorLedger._unpacked:
                    if record.op == "unknown":
                        record.op = op
            SavedTensorLedger._unpacked = []
            stack.extend(fn for fn, _ in node.next_functions)

    @staticmethod
    def _saved_getters(node):
        names = [a for a in dir(node) if a.startswith("_saved_") and not a.endswith(("sizes", "strides"))]
        getters = [lambda a=a: getattr(node, a) for a in names]
        if hasattr(node, "saved_tensors"):  # custom autograd.Function
            getters.append(lambda: node.saved_tensors)
        return getters

    def report(self, outputs=None):
        """The report; pass the forward's output(s) to name the saving op of each record."""
        if outputs is not None:
            if isinstance(outputs, torch.Tensor):
                outputs = [outputs]
            self._name_ops(list(outputs))
        return LedgerReport(list(self._records.values()))


def measure(fn, model=None):
    """Run fn() under a ledger and return (output, report)."""
    with SavedTensorLedger(model) as ledger:
        out = fn()
    return out, ledger.report(out)
