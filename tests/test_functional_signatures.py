"""tempo_ds.ops.gelu and tempo_ds.ops.dropout take their torch.nn.functional twins' arguments, so a
call written for F works unchanged: positionally and by keyword, as F is called."""
import inspect

import pytest
import torch
import torch.nn.functional as F

from tempo_ds import ops


@pytest.fixture(autouse=True)
def _compiled_ops(monkeypatch):
    # the compiled kernels, so the PyTorch fallback cannot pass for them
    monkeypatch.setenv("TEMPO_DS_OPS", "built")


def _input(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 500, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("call", [
    lambda f, x: f(x),
    lambda f, x: f(x, approximate="none"),
    lambda f, x: f(x, approximate="tanh"),
], ids=["default", "approximate=none", "approximate=tanh"])
def test_gelu_takes_f_gelu_calls(call):
    x = _input()
    torch.testing.assert_close(call(ops.gelu, x), call(F.gelu, x), rtol=1e-12, atol=1e-12)


def test_gelu_approximate_keyword_selects_the_tanh_form():
    x = _input()
    # the two forms differ by up to ~1e-3 here: an ignored keyword would fail one of these
    assert not torch.allclose(F.gelu(x, approximate="tanh"), F.gelu(x), atol=1e-6)
    torch.testing.assert_close(ops.gelu(x, approximate="tanh"), F.gelu(x, approximate="tanh"),
                               rtol=1e-12, atol=1e-12)


def test_dropout_signature_is_f_dropouts():
    ours = inspect.signature(ops.dropout).parameters
    theirs = inspect.signature(F.dropout).parameters
    assert list(ours)[1:] == list(theirs)[1:]  # the first is named x here, input there
    for name in list(theirs)[1:]:
        assert ours[name].default == theirs[name].default, name


def _kept_mask(y, x, p):
    """Which elements dropout kept, after checking each element is either 0 or x / (1 - p)."""
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-12, atol=0)
    return kept


@pytest.mark.parametrize("call,p", [
    (lambda f, x: f(x), 0.5),
    (lambda f, x: f(x, 0.3), 0.3),
    (lambda f, x: f(x, 0.3, True), 0.3),
    (lambda f, x: f(x, 0.3, True, False), 0.3),
    (lambda f, x: f(x, p=0.3, training=True, inplace=False), 0.3),
    (lambda f, x: f(x, training=True, p=0.2), 0.2),
], ids=["default", "p", "p-training", "positional-all", "keywords", "keywords-reordered"])
def test_dropout_takes_f_dropout_calls_in_training(call, p):
    torch.manual_seed(0)
    x = _input() + 10.0  # no element is 0 before dropout, so y == 0 means dropped
    y = call(ops.dropout, x)
    kept = _kept_mask(y, x, p)
    # 4,000 elements: the drop rate's standard deviation is under 0.008, so 0.05 is > 6 sigma;
    # the same call on F drops at the same rate: p is read as the drop probability
    assert abs((~kept).double().mean().item() - p) < 0.05
    assert abs((call(F.dropout, x) == 0).double().mean().item() - p) < 0.05


@pytest.mark.parametrize("call", [
    lambda f, x: f(x, 0.3, False),
    lambda f, x: f(x, p=0.3, training=False),
    lambda f, x: f(x, 0.3, False, False),
    lambda f, x: f(x, p=0.0),
], ids=["positional-eval", "keyword-eval", "positional-all-eval", "p=0"])
def test_dropout_takes_f_dropout_calls_that_change_nothing(call):
    x = _input()
    torch.testing.assert_close(call(ops.dropout, x), call(F.dropout, x), rtol=0, atol=0)
    assert call(ops.dropout, x) is x


@pytest.mark.parametrize("call", [
    lambda f, x: f(x, 0.3, True, True),
    lambda f, x: f(x, p=0.3, inplace=True),
    lambda f, x: f(x, 0.3, training=False, inplace=True),
], ids=["positional", "keyword", "eval"])
def test_dropout_inplace_true_is_a_clear_error(call):
    x = _input()
    before = x.clone()
    with pytest.raises(ValueError, match="inplace"):
        call(ops.dropout, x)
    assert torch.equal(x, before)  # and x is left as it was
