"""The fused bias-GELU (tempo_ds.ops.bias_gelu): numerics against float64 in every dtype, the bias
gradient, the compiled kernels against the PyTorch fallback, the saving contract and bad input."""
import pytest
import torch
import torch.nn.functional as F

from tempo_ds import ops
from tempo_ds.memory import SavedTensorLedger
from tempo_ds.ops import _backend
from tempo_ds.ops.gelu import TABLE_DTYPES, derivative_table

from .numerics import DTYPES, assert_double_backward_raises, scaled_err, tiny_atol
from .test_gelu import APPROX, exact_output_based_grad, gelu_inputs

ROWS, FEATURES = 64, 96


def bias_gelu_inputs(dtype, rows=ROWS, features=FEATURES, seed=0):
    """x [rows, features] from gelu_inputs (normal values, a band around the minimum, the far left
    tail, large |x|) and a bias [features] of normal values."""
    g = torch.Generator().manual_seed(seed)
    pool = gelu_inputs(1 << 12)
    x = pool[torch.randint(0, pool.numel(), (rows * features,), generator=g)].view(rows, features)
    bias = torch.randn(features, generator=g) * 0.5
    return x.to(dtype), bias.to(dtype)


def run(fn, x, bias, dy):
    """(y, dx, dbias) of fn(x, bias) with upstream gradient dy."""
    x, bias = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    y = fn(x, bias)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, bias.grad


def pytorch_path(approximate):
    """Bias-add then F.gelu: what a stock model without the fusion runs (Megatron's
    bias_gelu_impl computes the same tanh form)."""
    return lambda x, bias: F.gelu(x + bias, approximate=approximate)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_gradients_within_twice_pytorch_error(dtype, approximate, poison):
    """y, dx and dbias against float64: y and dbias against the exact float64 values, dx against
    the exact output-based gradient of what is kept (y and the bit; tests/test_gelu.py bounds the
    inversion's own conditioning near the minimum), each within 2x the error of PyTorch's
    bias-add + F.gelu path in the same dtype."""
    x, bias = bias_gelu_inputs(dtype)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y, dx, db = run(lambda a, b: ops.bias_gelu(a, b, approximate), x, bias, dy)
    y_pt, dx_pt, db_pt = run(pytorch_path(approximate), x, bias, dy)
    y_ref, dx_ref, db_ref = run(pytorch_path(approximate), x.double(), bias.double(), dy.double())
    assert y.dtype == dx.dtype == db.dtype == dtype
    atol = tiny_atol(dtype)
    assert scaled_err(y, y_ref) <= 2 * scaled_err(y_pt, y_ref) + atol
    # the bit of x + bias as the kernel formed it (in its compute dtype)
    target = exact_output_based_grad(dy, y, x.double() + bias.double(), approximate)
    assert scaled_err(dx, target) <= 2 * scaled_err(dx_pt, dx_ref) + atol
    # (against the true float64 dbias the inversion's conditioning near the minimum adds up to
    # 40x PyTorch's fp32 error on these inputs, a quarter of them in a band around the minimum:
    # tests/test_gelu.py::test_backward_error_is_the_conditioning_of_the_output bounds it)
    assert scaled_err(db, target.sum(0)) <= 2 * scaled_err(db_pt, db_ref) + atol


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_compiled_kernel_matches_fallback(dtype, approximate):
    """CPU kernel against the PyTorch fallback: the same branch bits, bit for bit; y within two
    units of the dtype (the same GELU math, different libm tanh / erfc and operation order; float64
    tanh measured 1.5 units); the backward
    from the same saved tensors bit-identical for 16-bit y (one table gather and one multiply,
    the bias gradient the same column sum)."""
    # 33 x 39 = 1287 elements: the last byte of bits is partial
    x, bias = bias_gelu_inputs(dtype, rows=33, features=39)
    compiled, fallback = _backend.ops("core", x.device), _backend.FALLBACKS["core"]
    assert _backend.is_compiled(compiled)
    tanh_form = approximate == "tanh"
    y_c, bits_c = compiled.bias_gelu_fwd(x, bias, tanh_form)
    y_f, bits_f = fallback.bias_gelu_fwd(x, bias, tanh_form)
    assert torch.equal(bits_c, bits_f)
    assert scaled_err(y_c, y_f) <= 2 * torch.finfo(dtype).eps
    if dtype in TABLE_DTYPES:
        dy = torch.randn(x.shape).to(dtype)
        (dx_c, db_c), (dx_f, db_f) = (_backward_from(kernels, dy, y_c, bits_c, tanh_form)
                                      for kernels in (compiled, fallback))
        assert torch.equal(dx_c, dx_f) and torch.equal(db_c, db_f)


def _backward_from(kernels, dy, y, bits, tanh_form):
    """(dx, dbias) as BiasGeluFunction.backward makes them for 16-bit y, with `kernels`."""
    dx = kernels.gelu_bwd_table(dy, y, bits, derivative_table(y.dtype, tanh_form, y.device))
    return dx, dx.reshape(-1, y.shape[-1]).sum(0, dtype=torch.float32).to(y.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_bias_is_the_gelu_kernel(dtype):
    """With a zero bias the fused kernel is the GELU kernel, bit for bit (the same header math)."""
    x, _ = bias_gelu_inputs(dtype)
    kernels = _backend.ops("core", x.device)
    for tanh_form in (False, True):
        y_b, bits_b = kernels.bias_gelu_fwd(x, torch.zeros(FEATURES, dtype=dtype), tanh_form)
        y, bits = kernels.gelu_fwd(x, tanh_form)
        assert torch.equal(bits_b, bits) and torch.equal(y_b, y)


@pytest.mark.parametrize("mode", ["built", "torch"])
@pytest.mark.parametrize("shape", [(0, 8), (3, 5), (7, 9), (2, 3, 17), (1, 1)])
def test_shapes_including_empty_narrow_and_ragged(shape, mode, monkeypatch, poison):
    """Fewer than 8 features (a row wraps inside a byte of bits), ragged lengths, 3-D input."""
    monkeypatch.setenv("TEMPO_DS_OPS", mode)
    x = torch.randn(shape, dtype=torch.float64)
    bias = torch.randn(shape[-1], dtype=torch.float64)
    dy = torch.randn(shape, dtype=torch.float64)
    y, dx, db = run(ops.bias_gelu, x, bias, dy)
    y_ref, dx_ref, db_ref = run(pytorch_path("none"), x, bias, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(db, db_ref, rtol=1e-9, atol=1e-9)


def test_non_contiguous_input():
    base = torch.randn(48, 64, dtype=torch.float64)
    x = base.t()[:, ::2]  # [64, 24], strided
    bias = torch.randn(24, dtype=torch.float64)
    dy = torch.randn(64, 24, dtype=torch.float64)
    assert not x.is_contiguous()
    y, dx, db = run(lambda a, b: ops.bias_gelu(a, b, "tanh"), x, bias, dy)
    y_ref, dx_ref, db_ref = run(pytorch_path("tanh"), x, bias, dy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(db, db_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_saves_output_and_bits_only(dtype):
    """Linear (skip_bias_add, as Megatron's fc1) -> bias-GELU -> Linear: the bias-GELU keeps only
    its bits, since fc2 keeps its output anyway; the bias-add + GELU path keeps x + bias too."""
    h, tokens = 32, 24
    size = torch.finfo(dtype).bits // 8
    fc1 = torch.nn.Linear(h, 4 * h, bias=False).to(dtype)
    fc2 = torch.nn.Linear(4 * h, h).to(dtype)
    bias = torch.nn.Parameter(torch.randn(4 * h, dtype=dtype))
    model = torch.nn.ModuleList([fc1, fc2])
    model.register_parameter("bias", bias)
    x = torch.randn(tokens, h, dtype=dtype, requires_grad=True)
    saved = {}
    for name, act in (("stock", lambda t: F.gelu(t + bias, approximate="tanh")),
                      ("tempo", lambda t: ops.bias_gelu(t, bias, "tanh"))):
        with SavedTensorLedger(model) as ledger:
            out = fc2(act(fc1(x)))
        saved[name] = ledger.report(out)
    intermediate = tokens * 4 * h * size
    assert saved["stock"].total_bytes == tokens * h * size + 2 * intermediate
    assert saved["tempo"].total_bytes == tokens * h * size + intermediate + tokens * 4 * h // 8
    assert saved["tempo"].by_category()["gelu"] == tokens * 4 * h // 8


def test_bad_input_names_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        ops.bias_gelu(x, torch.randn(4))
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.bias_gelu(x, torch.randn(1, 8))
    with pytest.raises(TypeError, match=r"bias must have the dtype of x \(torch.float32\)"):
        ops.bias_gelu(x, torch.randn(8, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="bias must be float16"):
        ops.bias_gelu(x, torch.arange(8))
    with pytest.raises(TypeError, match="x must be"):
        ops.bias_gelu(torch.arange(8), torch.randn(8))
    with pytest.raises(ValueError, match="approximate"):
        ops.bias_gelu(x, torch.randn(8), approximate="fast")
    # the kernels check what they read as well: a direct call cannot overrun the bias
    kernels = _backend.ops("core", x.device)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        kernels.bias_gelu_fwd(x, torch.randn(7), False)
    with pytest.raises(RuntimeError, match="bias must have x's dtype"):
        kernels.bias_gelu_fwd(x, torch.randn(8, dtype=torch.float64), False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_double_backward_raises(dtype):
    x = torch.randn(8, 16, dtype=dtype, requires_grad=True)
    bias = torch.zeros(16, dtype=dtype)
    assert_double_backward_raises(ops.bias_gelu(x, bias), x)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["whole", "ragged", "offset", "narrow"])
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_kernel(dtype, approximate, layout, poison):
    """The CUDA kernel (whole-pack and general paths) against the CPU kernel: the same bits, y
    within one unit, and the op's dx / dbias within two."""
    rows, features = {"whole": (64, 96), "ragged": (31, 97), "offset": (64, 96), "narrow": (40, 5)}[layout]
    x, bias = bias_gelu_inputs(dtype, rows=rows, features=features)
    x_gpu = x.cuda()
    if layout == "offset":  # a view one element in: not pack-aligned
        x_gpu = torch.cat([x_gpu.view(-1)[:1], x_gpu.view(-1)]).narrow(0, 1, x.numel()).view(x.shape)
    tanh_form = approximate == "tanh"
    y_gpu, bits_gpu = _backend.ops("core", "cuda").bias_gelu_fwd(x_gpu, bias.cuda(), tanh_form)
    y_cpu, bits_cpu = _backend.ops("core", "cpu").bias_gelu_fwd(x, bias, tanh_form)
    eps = torch.finfo(dtype).eps
    assert torch.equal(bits_gpu.cpu(), bits_cpu)
    assert scaled_err(y_gpu.cpu(), y_cpu) <= eps
    dy = torch.randn(x.shape).to(dtype)
    _, dx_cpu, db_cpu = run(lambda a, b: ops.bias_gelu(a, b, approximate), x, bias, dy)
    _, dx_gpu, db_gpu = run(lambda a, b: ops.bias_gelu(a, b, approximate), x.cuda(), bias.cuda(), dy.cuda())
    assert scaled_err(dx_gpu.cpu(), dx_cpu) <= 2 * eps
    assert scaled_err(db_gpu.cpu(), db_cpu) <= 2 * eps * rows


@pytest.mark.gpu
def test_cuda_matches_megatron_bias_gelu_impl():
    """On the GPU, against what stock Megatron runs under bias_activation_fusion (bf16)."""
    pytest.importorskip("megatron.core")
    from megatron.core.fusions.fused_bias_gelu import bias_gelu_impl

    x, bias = bias_gelu_inputs(torch.bfloat16)
    dy = torch.randn(x.shape).to(torch.bfloat16).cuda()
    x, bias = x.cuda(), bias.cuda()
    y, dx, db = run(lambda a, b: ops.bias_gelu(a, b, "tanh"), x, bias, dy)
    y_m, dx_m, db_m = run(bias_gelu_impl, x, bias, dy)
    y_ref, dx_ref, db_ref = run(pytorch_path("tanh"), x.double(), bias.double(), dy.double())
    atol = tiny_atol(torch.bfloat16)
    assert scaled_err(y, y_ref) <= 2 * scaled_err(y_m, y_ref) + atol
    assert scaled_err(db, db_ref) <= 2 * scaled_err(db_m, db_ref) + atol
