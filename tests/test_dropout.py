"""Seeded dropout and bias-dropout-add: masks, numerics, recomputation and the saving contract."""
import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tempo_ds import ops
from tempo_ds.memory import SavedTensorLedger
from tempo_ds.modules import TempoDropout
from tempo_ds.modules.swap import swap_modules
from tempo_ds.ops import _backend, reference_dropout
from tempo_ds.ops.dropout import record_dropout_masks

from .numerics import DTYPES, assert_double_backward_raises, assert_within_pytorch_error


@pytest.fixture
def kernels():
    """The compiled CPU kernels (loaded first so that the poison fixture reaches them)."""
    return _backend.ops("dropout", "cpu")


@pytest.fixture
def poisoned(kernels, poison):
    yield kernels


def test_philox_known_answer():
    # Random123's known-answer vector for philox4x32_10 with zero counter and key
    words = reference_dropout.philox4x32_10(torch.tensor([0]), 0)[0].tolist()
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1, -7, 2 ** 62 + 3])
def test_cpu_build_and_fallback_draw_identical_masks(kernels, seed, p):
    s = torch.tensor([seed])
    assert torch.equal(kernels.dropout_mask(s, 1001, p), reference_dropout.keep_mask(s, 1001, p))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate_is_binomial(p):
    n = 1 << 18
    with record_dropout_masks() as masks:
        ops.dropout(torch.ones(n), p)
    dropped = int((~masks[0][1]).sum())
    # 6 standard deviations: a false alarm once in 10^9 runs
    assert abs(dropped - n * p) < 6 * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_grad_apply_the_reported_mask(poisoned, dtype):
    p = 0.3
    x = torch.randn(37, 129, dtype=dtype).requires_grad_()
    with record_dropout_masks() as masks:
        y = ops.dropout(x, p)
    (name, keep), = masks
    assert name == "dropout" and keep.shape == x.shape and keep.dtype == torch.bool
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    scale = 1 / (1 - p)
    ref_y = x.detach().double() * keep * scale
    ref_dx = dy.double() * keep * scale
    assert_within_pytorch_error(y.detach(), x.detach() * keep * scale, ref_y, "y")
    assert_within_pytorch_error(dx, dy * keep * scale, ref_dx, "dx")


def test_noncontiguous_input(kernels):
    base = torch.randn(64, 48)
    x = base.t()
    with record_dropout_masks() as masks:
        y = ops.dropout(x, 0.25)
    assert torch.equal(y, x * masks[0][1] / 0.75)


def test_identity_without_dropout_draws_nothing():
    x = torch.randn(10)
    state = torch.get_rng_state()
    assert ops.dropout(x, 0.0) is x
    assert ops.dropout(x, 0.5, training=False) is x
    assert torch.equal(torch.get_rng_state(), state)


def test_manual_seed_repeats_and_differs_between_calls():
    x = torch.randn(4096)
    torch.manual_seed(3)
    a, b = ops.dropout(x, 0.5), ops.dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(ops.dropout(x, 0.5), a)
    assert not torch.equal(a, b)


def _stack(p):
    return nn.Sequential(nn.Linear(32, 64), TempoDropout(p), nn.Tanh(), nn.Linear(64, 32), TempoDropout(p))


def test_checkpoint_recomputation_gives_bit_identical_gradients():
    model = _stack(0.4)
    x = torch.randn(8, 32, requires_grad=True)
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(11)
        out = checkpoint(model, x, use_reentrant=False) if use_checkpoint else model(x)
        grads.append(torch.autograd.grad(out.square().sum(), [x, *model.parameters()]))
    for plain, recomputed in zip(*grads):
        assert torch.equal(plain, recomputed)


def test_fallback_matches_cpu_build(monkeypatch):
    x = torch.randn(999)
    torch.manual_seed(5)
    built = ops.dropout(x, 0.2)
    monkeypatch.setenv("TEMPO_DS_OPS", "torch")
    torch.manual_seed(5)
    assert torch.equal(ops.dropout(x, 0.2), built)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_dropout_add(poisoned, dtype, with_bias):
    p = 0.2
    x = torch.randn(6, 5, 40, dtype=dtype, requires_grad=True)
    bias = torch.randn(40, dtype=dtype, requires_grad=True) if with_bias else None
    residual = torch.randn(6, 5, 40, dtype=dtype, requires_grad=True)
    with record_dropout_masks() as masks:
        out = ops.bias_dropout_add(x, bias, residual, p)
    (name, keep), = masks
    assert name == "bias_dropout_add"
    dy = torch.randn_like(out)
    leaves = [x, residual] + ([bias] if with_bias else [])
    grads = torch.autograd.grad(out, leaves, dy)

    def stock(x, bias, residual):
        # Megatron's unfused bias_dropout_add with the same mask
        return residual + (x + bias if bias is not None else x) * keep / (1 - p)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = stock(leaves64[0], leaves64[2] if with_bias else None, leaves64[1])
    ref_grads = torch.autograd.grad(ref, leaves64, dy.double())
    pt_leaves = [t.detach().requires_grad_() for t in leaves]
    pt = stock(pt_leaves[0], pt_leaves[2] if with_bias else None, pt_leaves[1])
    pt_grads = torch.autograd.grad(pt, pt_leaves, dy)
    assert_within_pytorch_error(out.detach(), pt.detach(), ref.detach(), "out")
    for name, g, pg, rg in zip(["dx", "dresidual", "dbias"], grads, pt_grads, ref_grads):
        assert_within_pytorch_error(g, pg, rg, name)


def test_bias_dropout_add_eval_is_plain_sum():
    x, bias, residual = torch.randn(3, 8), torch.randn(8), torch.randn(3, 8)
    assert torch.equal(ops.bias_dropout_add(x, bias, residual, 0.5, training=False), residual + (x + bias))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, "0.1"])
def test_bad_probability_is_named(p):
    with pytest.raises(ValueError, match=r"\bp must be"):
        ops.dropout(torch.randn(4), p)
    with pytest.raises(ValueError, match=r"\bp must be"):
        ops.bias_dropout_add(torch.randn(4), None, torch.randn(4), p)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="residual"):
        ops.bias_dropout_add(torch.randn(2, 4), None, torch.randn(4, 2), 0.1)
    with pytest.raises(ValueError, match="bias"):
        ops.bias_dropout_add(torch.randn(2, 4), torch.randn(3), torch.randn(2, 4), 0.1)
    with pytest.raises(TypeError, match="residual must have the dtype of x"):
        ops.bias_dropout_add(torch.randn(2, 4), None, torch.randn(2, 4).double(), 0.1)
    with pytest.raises(TypeError, match="x must"):
        ops.dropout(torch.arange(4), 0.1)


@pytest.mark.parametrize("training", [True, False])
def test_bias_of_the_wrong_shape_dtype_or_device_is_named(training):
    """bias must be exactly [h]: a [h, 1] bias has h elements, but the eval path (a plain sum)
    would broadcast it to [h, h] or fail, so training and eval would disagree; it is refused in
    both. A wrong dtype is a TypeError, a wrong shape or device a ValueError, as in the norms."""
    x, residual = torch.randn(2, 3), torch.randn(2, 3)
    for bias in (torch.randn(3, 1), torch.randn(1, 3), torch.randn(3, 3), torch.randn(4)):
        with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
            ops.bias_dropout_add(x, bias, residual, 0.1, training=training)
    with pytest.raises(TypeError, match="bias must have the dtype of x"):
        ops.bias_dropout_add(x, torch.randn(3, dtype=torch.float64), residual, 0.1, training=training)
    # meta stands in for a second device
    with pytest.raises(ValueError, match="bias must be on the device of x"):
        ops.bias_dropout_add(x, torch.randn(3, device="meta"), residual, 0.1, training=training)
    with pytest.raises(ValueError, match="residual must be on the device of x"):
        ops.bias_dropout_add(x, None, residual.to("meta"), 0.1, training=training)


@pytest.mark.parametrize("mode", ["built", "torch"])
@pytest.mark.parametrize("op", ["dropout", "bias_dropout_add"])
def test_double_backward_raises(mode, op, monkeypatch):
    monkeypatch.setenv("TEMPO_DS_OPS", mode)
    x = torch.randn(4, 8, requires_grad=True)
    bias, residual = torch.randn(8, requires_grad=True), torch.randn(4, 8)
    out = ops.dropout(x, 0.3) if op == "dropout" else ops.bias_dropout_add(x, bias, residual, 0.3)
    assert_double_backward_raises(out, x)


def test_mask_block_kernel_checks_its_arguments(kernels):
    """Direct calls into the extension: a negative offset, size or stride, a bad p or a bad seed
    are refused by name before any kernel runs."""
    seed = torch.tensor([7], dtype=torch.int64)
    assert kernels.dropout_mask_block(seed, 0.1, 0, 2, 12, 3, 4, 4).shape == (2, 3, 4)
    with pytest.raises(RuntimeError, match="dropout_mask_block: offset, sizes and strides must be non-negative"):
        kernels.dropout_mask_block(seed, 0.1, -1, 2, 12, 3, 4, 4)
    with pytest.raises(RuntimeError, match="dropout_mask_block: offset, sizes and strides must be non-negative"):
        kernels.dropout_mask_block(seed, 0.1, 0, 2, 12, 3, -4, 4)
    with pytest.raises(RuntimeError, match=r"dropout_mask_block: p must be in \[0, 1\)"):
        kernels.dropout_mask_block(seed, 1.0, 0, 2, 12, 3, 4, 4)
    with pytest.raises(RuntimeError, match="dropout_mask_block: seed must be an int64 tensor"):
        kernels.dropout_mask_block(seed.int(), 0.1, 0, 2, 12, 3, 4, 4)


def test_memory_contract_keeps_only_the_seed():
    x = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(256, dtype=torch.bfloat16, requires_grad=True)
    residual = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    with SavedTensorLedger() as ledger:
        y = ops.dropout(x, 0.1)
    assert ledger.report(y).total_bytes == 8
    with SavedTensorLedger() as ledger:
        out = ops.bias_dropout_add(x, bias, residual, 0.1)
    report = ledger.report(out)
    assert report.total_bytes == 8 and set(report.by_op()) == {"BiasDropoutAddFunction"}
    # stock dropout keeps a bool mask on CUDA (1 byte per element) and its scaled noise in x's
    # dtype on CPU (2 bytes per element here)
    with SavedTensorLedger() as ledger:
        y = nn.functional.dropout(x, 0.1)
    assert ledger.report(y).total_bytes == x.numel() * (1 if x.is_cuda else x.element_size())


def test_module_from_torch_and_swap():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3), nn.Dropout(1.0)).eval()
    counts = swap_modules(model).swapped
    assert counts == {"dropout": 1}
    assert isinstance(model[1], TempoDropout) and model[1].p == 0.3 and not model[1].training
    assert isinstance(model[2], nn.Dropout)
    with pytest.raises(TypeError, match="nn.Dropout"):
        TempoDropout.from_torch(nn.ReLU())
    assert "p=0.3" in repr(model[1])


@pytest.mark.gpu
def test_cuda_masks_match_cpu():
    cuda = _backend.ops("dropout", "cuda")
    cpu = _backend.ops("dropout", "cpu")
    for seed in (0, -3, 2 ** 61 + 9):
        s = torch.tensor([seed])
        assert torch.equal(cuda.dropout_mask(s.cuda(), 4099, 0.3).cpu(), cpu.dropout_mask(s, 4099, 0.3))
    x = torch.randn(4099)
    s = torch.tensor([42])
    assert torch.equal(cuda.dropout_fwd(x.cuda(), s.cuda(), 0.3).cpu(), cpu.dropout_fwd(x, s, 0.3))
