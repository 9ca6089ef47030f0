"""What every op returns: a tensor of its own, not a view made inside the autograd.Function.

PyTorch forbids in-place edits of a view created inside a custom Function ("Output 0 of ... is a
view and is being modified inplace"), so a view output broke code that is legal with the stock
op. In-place on an op's output must behave as it does on the stock op's, up to what the op saves:
- ops that keep a seed and not their output (dropout, bias-dropout-add, softmax-dropout-matmul,
  recompute_attention) give the gradients of the stock op after the edit;
- ops that keep their output (GELU, the norms) raise in backward, through the version counter,
  as PyTorch's own output-saving ops (sigmoid, tanh, exp) do. Without grad the edit is legal.
"""
import pytest
import torch

from tempo_ds import ops


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(2, 3, 16, generator=g, dtype=torch.float64),
        "h": torch.randn(16, generator=g, dtype=torch.float64),
        "scores": torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64),
        "q": torch.randn(2, 4, 8, 16, generator=g, dtype=torch.float64),
        "kv": torch.randn(2, 2, 8, 16, generator=g, dtype=torch.float64),  # GQA: 2 groups of 2 heads
    }


# name -> (call on fp32 leaves, inputs it differentiates). p > 0 so that the masks matter.
KEEP_A_SEED = {
    "dropout": (lambda t: ops.dropout(t["x"], 0.3), ("x",)),
    "bias_dropout_add": (lambda t: ops.bias_dropout_add(t["x"], t["h"], t["x"] * 2, 0.3), ("x", "h")),
    "softmax_dropout_matmul": (lambda t: ops.softmax_dropout_matmul(t["scores"], t["kv"], p=0.3), ("scores", "kv")),
    "recompute_attention": (lambda t: ops.recompute_attention(t["q"], t["kv"], t["kv"], p=0.3), ("q", "kv")),
}
KEEP_THE_OUTPUT = {
    "gelu": (lambda t: ops.gelu(t["x"]), ("x",)),
    "layer_norm": (lambda t: ops.layer_norm(t["x"], t["x"].shape[-1:], t["h"] + 1, t["h"]), ("x", "h")),
    "rms_norm": (lambda t: ops.rms_norm(t["x"], t["x"].shape[-1:], t["h"] + 1), ("x", "h")),
}


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _leaves(names, device):
    return {k: v.float().to(device).requires_grad_(k in names) for k, v in _inputs().items()}


def _grads(call, names, edit, device, seed=1):
    leaves = _leaves(names, device)
    torch.manual_seed(seed)  # the same dropout draws in both runs
    y = call(leaves)
    assert y._base is None, "the op returned a view"
    if edit:
        y.mul_(3)
    else:
        y = y * 3
    y.sum().backward()
    return [leaves[n].grad for n in names]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["built", "torch"])
@pytest.mark.parametrize("name", sorted(KEEP_A_SEED))
def test_in_place_on_an_output_that_is_not_saved(name, mode, device, monkeypatch):
    monkeypatch.setenv("TEMPO_DS_OPS", mode)
    call, names = KEEP_A_SEED[name]
    edited, plain = _grads(call, names, True, device), _grads(call, names, False, device)
    for n, a, b in zip(names, edited, plain):
        assert a is not None and a.abs().sum() > 0, n
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["built", "torch"])
@pytest.mark.parametrize("name", sorted(KEEP_THE_OUTPUT))
def test_in_place_on_a_saved_output_raises_in_backward(name, mode, device, monkeypatch):
    monkeypatch.setenv("TEMPO_DS_OPS", mode)
    call, names = KEEP_THE_OUTPUT[name]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _grads(call, names, True, device)
    with torch.no_grad():
        y = call(_leaves(names, device))
        assert y._base is None
        y.mul_(3)  # inference: nothing is saved, the edit is legal
