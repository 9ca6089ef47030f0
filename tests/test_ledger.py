"""The ledger counts what autograd saves: deduplicated by storage, parameters excluded,
attributed to module and op."""
import gc
import warnings
import weakref

import pytest
import torch

from tempo_ds import ops
from tempo_ds.memory import SavedTensorLedger, category_of, measure
from tempo_ds.memory.ledger import _storage_key
from tempo_ds.modules import TempoDropout, TempoGELU


class Block(torch.nn.Module):
    def __init__(self, h):
        super().__init__()
        self.norm = torch.nn.LayerNorm(h)
        self.fc = torch.nn.Linear(h, h)

    def forward(self, x):
        return ops.gelu(self.fc(self.norm(x)))


def test_every_saved_tensor_of_a_custom_function_is_named():
    """A custom Function saving several tensors (GELU: y and bits) names all of them."""
    x = torch.randn(8, 16, requires_grad=True)
    y, report = measure(lambda: ops.gelu(x))
    assert {r.op for r in report.records} == {"GeluFunction"}
    assert report.by_category() == {"gelu": 8 * 16 * 4 + 8 * 16 // 8}


def test_dedup_by_storage_and_parameters_excluded():
    h, tokens = 16, 4
    block = Block(h)
    x = torch.randn(tokens, h, requires_grad=True)
    with SavedTensorLedger(block) as ledger:
        out = block(x)
    report = ledger.report(out)
    keys = [r.key for r in report.records]
    assert len(keys) == len(set(keys))
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    assert not params & {k[2] for k in keys}
    # norm input x, mean+rstd; the norm output (Linear's input); GELU's y (+ bits)
    assert report.by_module()["norm"] == tokens * h * 4 + 2 * tokens * 4
    assert report.by_module()["fc"] == tokens * h * 4
    assert report.by_category()["gelu"] == tokens * h * 4 + tokens * h // 8


def test_shared_storage_counts_once():
    x = torch.randn(32, requires_grad=True)
    y = x * 2

    def fwd():
        return (y.sin() * y.cos()).sum()  # sin and cos both save y

    _, report = measure(fwd)
    assert sum(1 for r in report.records if r.nbytes == 32 * 4) == len({r.key for r in report.records})
    assert report.total_bytes == 32 * 4 * 3  # y once, sin(y), cos(y)


def test_categories():
    assert category_of("NativeLayerNorm") == "norm"
    assert category_of("GeluFunction") == "gelu"
    assert category_of("Addmm") == "matmul"
    # attention, not "softmax": Tempo's softmax-dropout-matmul keeps what stock attention's
    # softmax, dropout and matmul keep, so the two are compared in one row
    assert category_of("SoftmaxDropoutMatmulFunction") == "attention"
    assert category_of("Whatever") == "other"


def test_categories_by_module_and_function():
    # everything the attention core keeps is attention, whichever op saves it
    for op in ("Bmm", "Softmax", "Mul", "MaskedFill"):
        assert category_of(op, "decoder.layers.0.self_attention.core_attention.attention_dropout") == "attention"
    # stock dropout on CPU saves its mask as a Mul's operand: dropout by the function running...
    assert category_of("Mul", "decoder.layers.0", "dropout") == "dropout"
    # ...or by the module saving it
    assert category_of("Mul", "embedding.embedding_dropout") == "dropout"
    assert category_of("Mul", "decoder.layers.0", "__mul__") == "elementwise"
    assert category_of("NativeLayerNorm", "decoder.layers.0.input_layernorm", "layer_norm") == "norm"


@pytest.mark.parametrize("stock,tempo", [
    (lambda: torch.nn.Dropout(0.5), lambda: TempoDropout(0.5)),
    (lambda: torch.nn.GELU(), lambda: TempoGELU()),
], ids=["dropout", "gelu"])
def test_stock_and_tempo_ops_fall_in_the_same_categories(stock, tempo):
    """Linear -> op -> Linear with the stock op and with its Tempo twin: the same category rows,
    though each side keeps different tensors in them (stock dropout on CPU keeps a float mask as
    a Mul's operand, Tempo's a seed; stock GELU its input, Tempo's branch bits)."""
    h, tokens = 16, 8
    by_category = []
    for make in (stock, tempo):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(h, 4 * h), make(), torch.nn.Linear(4 * h, h))
        x = torch.randn(tokens, h, requires_grad=True)
        with SavedTensorLedger(model) as ledger:
            out = model(x)
        by_category.append(ledger.report(out).by_category())
    assert set(by_category[0]) == set(by_category[1]) and len(by_category[0]) == 2, by_category
    assert by_category[0] != by_category[1]  # the same rows, other bytes


def test_the_ledger_leaves_no_torch_function_mode_behind():
    x = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="inside"):
        with SavedTensorLedger():
            torch.nn.functional.dropout(x, 0.5)
            raise RuntimeError("inside")
    assert not torch._C._is_torch_function_mode_enabled()


def test_shared_storage_goes_to_its_last_saver():
    """Linear -> GELU -> Linear: the GELU output is saved by the GELU and then by fc2's addmm; it
    belongs to fc2 (module and op alike), the consumer that keeps its input as in the stock model,
    so by_category shows what the GELU adds: its branch bits."""
    h, tokens = 16, 8
    model = torch.nn.Sequential(torch.nn.Linear(h, 4 * h), TempoGELU(), torch.nn.Linear(4 * h, h))
    x = torch.randn(tokens, h, requires_grad=True)
    with SavedTensorLedger(model) as ledger:
        y = model[1](model[0](x))
        out = model[2](y)
    report = ledger.report(out)
    (y_record,) = [r for r in report.records if r.key == _storage_key(y)[0]]
    assert (y_record.module, y_record.op, y_record.category) == ("2", "Addmm", "matmul")
    assert y_record.nbytes == tokens * 4 * h * 4
    # fc1 keeps its input x, fc2 its input y; the GELU adds one branch bit per element
    assert report.by_category() == {"matmul": tokens * h * 4 + tokens * 4 * h * 4, "gelu": tokens * 4 * h // 8}
    assert report.by_module() == {"0": tokens * h * 4, "1": tokens * 4 * h // 8, "2": tokens * 4 * h * 4}


def test_a_freed_graph_counts_nothing():
    """A tensor saved by a graph that is gone by report time is not kept for backward."""
    x = torch.randn(64, 64, requires_grad=True)
    with SavedTensorLedger() as ledger:
        t = x.sigmoid()  # saves its 16 KiB output...
        del t  # ...which goes with the graph
    report = ledger.report()
    assert report.records == [] and report.total_bytes == 0
    with SavedTensorLedger() as ledger:
        kept = x.exp()
        t = x.sigmoid()
        del t
    report = ledger.report(kept)
    assert report.total_bytes == 64 * 64 * 4 and set(report.by_op()) == {"Exp"}
    kept.sum().backward()  # frees the graph: nothing is kept any more
    assert ledger.report().total_bytes == 0


class _Apply(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_a_storage_goes_to_the_last_saver_still_holding_it():
    """y saved by sin (module "first") and then cos ("second"); once cos's graph is gone, y is
    kept by sin alone and is counted for it."""
    x = torch.randn(32, 32, requires_grad=True)
    model = torch.nn.ModuleDict({"first": _Apply(torch.sin), "second": _Apply(torch.cos)})
    with SavedTensorLedger(model) as ledger:
        y = x * 2
        s, c = model["first"](y), model["second"](y)
    report = ledger.report([s, c])
    assert [(r.module, r.op) for r in report.records] == [("second", "Cos")]
    del c
    report = ledger.report(s)
    assert [(r.module, r.op, r.nbytes) for r in report.records] == [("first", "Sin", 32 * 32 * 4)]


def test_a_reused_address_is_a_new_storage():
    """Freed and reallocated at the same address (as a caching allocator does at once), a storage
    saved again counts once, for its new saver: the freed one is not kept, and the new one is not
    deduplicated away as if it were the old one."""
    n = 64
    block = bytearray(n * n * 4)  # one block of memory, handed out twice, like an allocator's

    def allocate():
        return torch.frombuffer(block, dtype=torch.float32).view(n, n).requires_grad_()

    model = torch.nn.ModuleDict({"first": _Apply(torch.sin), "second": _Apply(torch.cos)})
    with SavedTensorLedger(model) as ledger:
        a = allocate()
        freed = a.untyped_storage().data_ptr()
        out = model["first"](a)  # sin saves a
        del a, out  # the graph goes, and a's storage with it
        b = allocate()
        kept = model["second"](b)  # cos saves b: a new storage at the freed address
    assert b.untyped_storage().data_ptr() == freed
    report = ledger.report(kept)
    (record,) = report.records
    assert (record.key, record.nbytes) == (_storage_key(b)[0], n * n * 4)
    assert (record.module, record.op) == ("second", "Cos")


def test_inner_saved_tensor_hooks_warn_once():
    """save_on_cpu inside the ledger takes every saved tensor: the report sees none, and says so,
    once per ledger."""
    x = torch.randn(8, 16, requires_grad=True)
    with SavedTensorLedger() as ledger:
        with torch.autograd.graph.save_on_cpu():
            out = ops.gelu(x)
    with pytest.warns(UserWarning, match="other saved-tensor hooks"):
        report = ledger.report(out)
    assert report.total_bytes == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ledger.report(out)


def test_inner_hooks_around_part_of_the_forward_warn():
    """Offloading one op (as per-layer activation offloading does) hides only that op's tensors;
    the warning still fires because the hidden node was created while the ledger was packing."""
    h, tokens = 16, 8
    fc1, fc2 = torch.nn.Linear(h, 4 * h), torch.nn.Linear(4 * h, h)
    x = torch.randn(tokens, h, requires_grad=True)
    with SavedTensorLedger(torch.nn.ModuleList([fc1, fc2])) as ledger:  # weights excluded
        a = fc1(x)
        with torch.autograd.graph.save_on_cpu():
            y = ops.gelu(a)
        out = fc2(y)
    with pytest.warns(UserWarning, match="other saved-tensor hooks"):
        report = ledger.report(out)
    # x for fc1, y for fc2 (the GELU's own save of y and its bits went to save_on_cpu)
    assert report.by_op() == {"Addmm": tokens * h * 4 + tokens * 4 * h * 4}


def test_no_warning_for_a_graph_begun_before_the_ledger():
    """Saved tensors of nodes made before the ledger are not the ledger's, and not a warning."""
    x = torch.randn(32, requires_grad=True)
    y = x.sigmoid()  # saves its output without the ledger's hooks
    with SavedTensorLedger() as ledger:
        # between two saves of the ledger, x * 2 saves the 0-dim "wrapped number" 2, which
        # autograd saves without any hooks: not a sign of other hooks either
        out = ((y * y) * 2).exp().sum()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = ledger.report(out)
    # y for the first Mul, exp's output
    assert report.by_op() == {"Mul": 32 * 4, "Exp": 32 * 4}


def test_the_ledger_does_not_keep_a_graph_alive():
    """A node that saves its own output (here the GELU's y) must not hold it with its grad_fn:
    that cycle runs through C++, gc cannot break it, and the graph and y would never be freed."""
    x = torch.randn(8, 16, requires_grad=True)
    with SavedTensorLedger() as ledger:
        y = ops.gelu(x)
        node = weakref.ref(y.grad_fn)
        del y
    gc.collect()
    assert node() is None
    assert ledger.report().total_bytes == 0
