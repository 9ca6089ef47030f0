"""The ledger counts what autograd saves: deduplicated by storage, parameters excluded,
attributed to module and op."""
import torch

from tempo_ds import ops
from tempo_ds.memory import SavedTensorLedger, category_of, measure


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
    assert category_of("SoftmaxDropoutMatmulFunction") == "softmax"
    assert category_of("Whatever") == "other"
