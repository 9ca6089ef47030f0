"""In-place GELU: numerics against float64, the saving contract, and edge cases."""
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

from tempo_ds import ops
from tempo_ds.memory import SavedTensorLedger
from tempo_ds.modules import TempoGELU
from tempo_ds.ops import _backend, reference
from tempo_ds.ops.gelu import TABLE_DTYPES, derivative_table

from .numerics import DTYPES, assert_double_backward_raises, assert_within_pytorch_error, max_err, scaled_err, tiny_atol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPROX = ["none", "tanh"]
X_STAR = {"none": reference.GELU_FORMS[False].x_star, "tanh": reference.GELU_FORMS[True].x_star}


def gelu_inputs(n=1 << 14):
    """Normal values, a dense band around the GELU minimum, the far left tail and large |x|."""
    return torch.cat([
        torch.randn(n) * 2,
        -0.7518 + torch.linspace(-0.05, 0.05, n // 4),
        torch.linspace(-12.0, -3.0, n // 8),
        torch.tensor([-20.0, -8.0, -1e-3, 0.0, 1e-3, 8.0, 30.0, 1e4]),
    ])


def exact_output_based_grad(dy, y, x, approximate):
    """dx in float64 from what Tempo keeps (the rounded y and the branch bit): the best any
    output-based backward can do, i.e. our kernel's target."""
    tanh_form = approximate == "tanh"
    left = x.double() < reference.GELU_FORMS[tanh_form].x_star
    d = reference.gelu_derivative_from_output(y.double(), left, tanh_form, steps=60)
    return dy.double() * d


def newton_gelu(x, approximate):
    """ops.gelu with the Newton inversion in backward for every dtype (no derivative table)."""
    return ops.GeluFunction.apply(x, approximate == "tanh", False)


def run_both(x, approximate, dy, ours=ops.gelu):
    """(our y, our dx, PyTorch's y, PyTorch's dx, float64 y, float64 dx)."""
    results = []
    for fn, inp in ((ours, x), (F.gelu, x), (F.gelu, x.double())):
        leaf = inp.detach().clone().requires_grad_()
        out = fn(leaf, approximate=approximate)
        out.backward(dy.to(out.dtype))
        results += [out.detach(), leaf.grad]
    return results


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_within_pytorch_error(dtype, approximate, poison):
    x = gelu_inputs().to(dtype)
    y = ops.gelu(x, approximate)
    assert_within_pytorch_error(y, F.gelu(x, approximate=approximate),
                                F.gelu(x.double(), approximate=approximate), "y", err=scaled_err)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_is_faithful_for_every_16_bit_input(dtype, approximate, device):
    """For every finite 16-bit x, y is within one unit in the last place of the exact GELU(x)
    (float64, in the forms without cancellation), down to the far left tail where PyTorch's
    1 + erf / 1 + tanh cancels to zero. The fp32 math behind it uses tempo::normal_tail's fitted
    tail (erf form) and the exp2 sigmoid (tanh form) instead of erfcf and a division."""
    x = _every_16_bit_output(dtype)
    x = x[torch.isfinite(x)]
    tanh_form = approximate == "tanh"
    y, _ = _backend.ops("core", device).gelu_fwd(x.to(device), tanh_form)
    y = y.cpu()
    exact = reference.gelu_value(x.double(), tanh_form)
    info = torch.finfo(dtype)
    ulp = info.eps * exact.abs() + info.smallest_normal * info.eps
    err = (y.double() - exact).abs()
    assert float((err / ulp).max()) <= 1.0


def _normal_tail_fit():
    """csrc/includes/tempo/normal_tail_fit.py, which derives the constants of tempo::normal_tail."""
    import importlib.util
    path = os.path.join(ROOT, "csrc", "includes", "tempo", "normal_tail_fit.py")
    spec = importlib.util.spec_from_file_location("normal_tail_fit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_normal_tail_constants_are_the_fit():
    """The constants written in gelu.h reach the error of a fresh fit with its coefficients rounded
    to fp32 (1e-7 relative): a mistyped or truncated coefficient fails."""
    fit = _normal_tail_fit()
    with open(os.path.join(ROOT, "csrc", "includes", "tempo", "gelu.h")) as f:
        header = f.read()
    body = header[header.index("TEMPO_HD float normal_tail(float u)"):]
    b = float(re.search(r"kB = ([-+0-9.e]+)f;", body).group(1))
    coef = [float(c) for c in re.findall(r"([-+0-9.e]+)f", re.search(r"kP\[\] = \{([^}]*)\}", body).group(1))]
    assert len(coef) == fit.DEGREE + 1
    assert b == pytest.approx(fit.B, rel=1e-8)
    fresh = fit.max_error(fit.fit().float().double())
    assert fit.max_error(torch.tensor(coef, dtype=torch.float64)) <= 1.05 * fresh


@pytest.mark.parametrize("path", ["table", "newton"])
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_exact_output_based_gradient(dtype, approximate, path, poison):
    """Our dx against float64 math on the same saved (y, bit): within 2x PyTorch's own error.
    "table" is the default path (a derivative table for 16-bit y, Newton for fp32); "newton"
    forces the inversion for every dtype."""
    x = gelu_inputs().to(dtype)
    dy = torch.randn_like(x)
    y, dx, _, dx_pt, _, dx_ref = run_both(x, approximate, dy, ops.gelu if path == "table" else newton_gelu)
    target = exact_output_based_grad(dy, y, x, approximate)
    assert scaled_err(dx, target) <= 2 * scaled_err(dx_pt, dx_ref) + tiny_atol(dtype)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_error_is_the_conditioning_of_the_output(dtype, approximate):
    """Against the true float64 gradient, the only extra error is that of inverting a rounded
    output near the minimum, where GELU' = 0: |dGELU'| <= sqrt(2 c h) for a rounding error h of
    y, c = GELU''(x*). Away from the minimum the error stays near PyTorch's own."""
    x = gelu_inputs().to(dtype)
    dy = torch.ones_like(x)
    y, dx, _, dx_pt, _, dx_ref = run_both(x, approximate, dy)
    form = reference.GELU_FORMS[approximate == "tanh"]
    half_ulp = torch.finfo(dtype).eps / 2 * abs(form.y_min)
    bound = math.sqrt(2 * form.curvature * half_ulp)
    err = (dx.double() - dx_ref).abs()
    pt_max = max_err(dx_pt, dx_ref)
    assert float(err.max()) <= bound + 2 * pt_max
    far = (x.double() - form.x_star).abs() > 0.5
    assert float(err[far].max()) <= 4 * pt_max + torch.finfo(dtype).eps / 16


def test_bf16_gradient_rms_error_within_twice_pytorch():
    """In bf16, Tempo's target precision, the overall gradient error is within 2x PyTorch's."""
    x = (torch.randn(1 << 16) * 2).to(torch.bfloat16)
    dy = torch.randn_like(x)
    _, dx, _, dx_pt, _, dx_ref = run_both(x, "none", dy)
    rms = lambda a: float((a.double() - dx_ref).pow(2).mean().sqrt())  # noqa: E731
    assert rms(dx) <= 2 * rms(dx_pt)


@pytest.mark.parametrize("approximate", APPROX)
def test_branch_bits_are_packed_and_mark_the_left_branch(approximate):
    x = torch.tensor([-3.0, -0.9, -0.76, -0.74, -0.5, 0.0, 1.0, -2.0, -1.0])
    kernels = _backend.ops("core", x.device)
    y, bits = kernels.gelu_fwd(x, approximate == "tanh")
    assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(x.numel() / 8)
    expected = reference.pack_bits(x < X_STAR[approximate])
    assert torch.equal(bits, expected)


@pytest.mark.parametrize("shape", [(0,), (3, 0, 5), (1,), (7,), (9,), (4, 1023), (2, 3, 1500)])
def test_shapes_including_empty_and_ragged(shape, poison):
    x = torch.randn(shape, requires_grad=True)
    y = ops.gelu(x)
    y.backward(torch.ones_like(y))
    ref = x.detach().clone().requires_grad_()
    F.gelu(ref).backward(torch.ones_like(y))
    assert y.shape == x.shape
    torch.testing.assert_close(y, F.gelu(ref.detach()))
    # atol: the fp32 conditioning bound near the minimum (see the conditioning test), 8e-5
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_newton_backward_does_not_depend_on_an_elements_neighbours(dtype, approximate, poison):
    """The CPU kernel inverts the 8 elements of a byte of bits in lockstep; each element's result
    must be its own, bit for bit, whichever byte and lane it falls in and however full that byte
    is. Shifting the tensor by 1 to 7 elements moves every element to another lane (and the last
    byte's fill changes)."""
    x = torch.cat([gelu_inputs(1 << 10), torch.tensor([float("nan"), float("inf"), -float("inf")])])
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))].to(dtype)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    tanh_form = approximate == "tanh"
    kernels = _backend.ops("core", x.device)
    y, bits = kernels.gelu_fwd(x, tanh_form)
    left = reference.unpack_bits(bits, x.numel())
    dx = kernels.gelu_bwd(dy, y, bits, tanh_form)
    for shift in range(1, 8):
        part_bits = reference.pack_bits(left[shift:])
        part = kernels.gelu_bwd(dy[shift:].contiguous(), y[shift:].contiguous(), part_bits, tanh_form)
        assert torch.equal(part.view(-1).view(torch.uint8), dx[shift:].view(-1).view(torch.uint8)), shift


def test_non_contiguous_input():
    base = torch.randn(64, 48, requires_grad=True)
    x = base.t()[::2]
    assert not x.is_contiguous()
    y = ops.gelu(x)
    y.backward(torch.ones_like(y))
    ref = base.detach().clone().requires_grad_()
    F.gelu(ref.t()[::2]).backward(torch.ones_like(y))
    torch.testing.assert_close(y, F.gelu(x.detach()))
    torch.testing.assert_close(base.grad, ref.grad, rtol=1e-5, atol=1e-4)


def test_nan_and_inf_propagate_like_pytorch():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0], requires_grad=True)
    ops.gelu(x).backward(torch.ones(4))
    ref = x.detach().clone().requires_grad_()
    F.gelu(ref).backward(torch.ones(4))
    assert torch.isnan(x.grad[0])
    torch.testing.assert_close(x.grad, ref.grad, equal_nan=True)


def test_nan_gradient_is_never_zeroed():
    x = torch.randn(100, requires_grad=True)
    ops.gelu(x).backward(torch.full((100,), float("nan")))
    assert torch.isnan(x.grad).all()


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_kernel_matches_pytorch_fallback(dtype, approximate, monkeypatch):
    x = gelu_inputs(1 << 12).to(dtype)
    dy = torch.randn_like(x)
    compiled = _backend.ops("core", x.device)
    fallback = _backend.FALLBACKS["core"]
    assert _backend.is_compiled(compiled)
    tanh_form = approximate == "tanh"
    y_c, bits_c = compiled.gelu_fwd(x, tanh_form)
    y_f, bits_f = fallback.gelu_fwd(x, tanh_form)
    assert torch.equal(bits_c, bits_f)
    assert scaled_err(y_c, y_f) <= torch.finfo(dtype).eps
    dx_c = compiled.gelu_bwd(dy, y_c, bits_c, tanh_form)
    dx_f = fallback.gelu_bwd(dy, y_c, bits_c, tanh_form)
    assert scaled_err(dx_c, dx_f) <= 2 * torch.finfo(dtype).eps
    if dtype in TABLE_DTYPES:
        table = derivative_table(dtype, tanh_form, x.device)
        # one gather and one multiply in fp32, rounded once: the same bits in both
        assert torch.equal(compiled.gelu_bwd_table(dy, y_c, bits_c, table),
                           fallback.gelu_bwd_table(dy, y_c, bits_c, table))


def _every_16_bit_output(dtype):
    pattern = torch.arange(1 << 16, dtype=torch.int32)
    return torch.where(pattern >= 1 << 15, pattern - (1 << 16), pattern).to(torch.int16).view(dtype)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_derivative_table_is_the_float64_output_based_derivative(dtype, approximate):
    """Every entry: GELU'(x) for the x with GELU(x) = y on the row's branch, from a 60-step float64
    inversion, rounded once to float32 (non-finite y give the derivative of themselves)."""
    tanh_form = approximate == "tanh"
    table = derivative_table(dtype, tanh_form, "cpu")
    assert table.shape == (2, 1 << 16) and table.dtype == torch.float32
    assert derivative_table(dtype, tanh_form, "cpu") is table  # built once
    y = _every_16_bit_output(dtype).double()
    for row, left in enumerate((False, True)):
        exact = reference.gelu_derivative_from_output(y, torch.full_like(y, left, dtype=torch.bool),
                                                      tanh_form, steps=60)
        torch.testing.assert_close(table[row], exact.float(), rtol=2 ** -22, atol=1e-9, equal_nan=True)
    # y = 1.0 on the right branch: x = 1.0 + ..., GELU' there is about 1.08
    one = int(torch.tensor(1.0, dtype=dtype).view(torch.int16)) & 0xFFFF
    assert 1.0 < float(table[0, one]) < 1.2


def test_table_kernel_rejects_bad_tables():
    kernels = _backend.ops("core", torch.device("cpu"))
    y, bits = kernels.gelu_fwd(torch.randn(17, dtype=torch.bfloat16), False)
    table = derivative_table(torch.bfloat16, False, "cpu")
    with pytest.raises(RuntimeError, match="table must be a contiguous float32"):
        kernels.gelu_bwd_table(torch.ones_like(y), y, bits, table[:, :100])
    with pytest.raises(RuntimeError, match="table must be a contiguous float32"):
        kernels.gelu_bwd_table(torch.ones_like(y), y, bits, table.double())
    with pytest.raises(RuntimeError, match="y must be float16 or bfloat16"):
        kernels.gelu_bwd_table(torch.ones(17), y.float(), bits, table)
    with pytest.raises(TypeError, match="dtype must be float16 or bfloat16"):
        derivative_table(torch.float32, False, "cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_saves_output_and_packed_bits_only(dtype):
    """Linear -> GELU -> Linear: stock keeps 2h + 8h + 8h elements-bytes per token in bf16 (fc1
    input, GELU input, fc2 input); Tempo drops the GELU input (4h elements) and adds 4h/8 bytes."""
    h, tokens = 64, 24
    size = torch.finfo(dtype).bits // 8
    fc1, fc2 = torch.nn.Linear(h, 4 * h).to(dtype), torch.nn.Linear(4 * h, h).to(dtype)
    x = torch.randn(tokens, h, dtype=dtype, requires_grad=True)
    stock = torch.nn.Sequential(fc1, torch.nn.GELU(), fc2)
    tempo = torch.nn.Sequential(fc1, TempoGELU(), fc2)
    saved = {}
    for name, model in (("stock", stock), ("tempo", tempo)):
        with SavedTensorLedger(model) as ledger:
            out = model(x)
        saved[name] = ledger.report(out)
    assert saved["stock"].total_bytes == tokens * (h + 4 * h + 4 * h) * size
    assert saved["tempo"].total_bytes == tokens * (h + 4 * h) * size + tokens * 4 * h // 8
    assert saved["stock"].total_bytes - saved["tempo"].total_bytes == tokens * (4 * h * size - 4 * h // 8)
    assert saved["tempo"].by_category()["gelu"] == tokens * 4 * h // 8


def test_module_from_torch_and_repr():
    for approximate in APPROX:
        m = TempoGELU.from_torch(torch.nn.GELU(approximate=approximate))
        assert m.approximate == approximate and repr(approximate) in repr(m)
    with pytest.raises(TypeError, match="nn.GELU"):
        TempoGELU.from_torch(torch.nn.ReLU())


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="x must be"):
        ops.gelu(torch.arange(4))
    with pytest.raises(ValueError, match="approximate"):
        ops.gelu(torch.randn(4), approximate="fast")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.gelu([1.0, 2.0])


@pytest.mark.parametrize("mode", ["built", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # Newton and table backwards
def test_double_backward_raises(mode, dtype, monkeypatch):
    monkeypatch.setenv("TEMPO_DS_OPS", mode)
    x = torch.randn(64, dtype=dtype, requires_grad=True)
    assert_double_backward_raises(ops.gelu(x), x)


def test_auto_mode_falls_back_on_a_device_type_without_kernels(monkeypatch):
    """tempo_ds has no kernels for meta tensors: "built" mode raises, "auto" warns once and runs
    the PyTorch implementation (which meta tensors support: shapes and dtypes, no values)."""
    monkeypatch.setattr(_backend, "_cache", {})  # restored afterwards, with no meta entry in it
    x = torch.randn(4, 8, device="meta", requires_grad=True)
    monkeypatch.setenv("TEMPO_DS_OPS", "built")
    with pytest.raises(NotImplementedError, match="no 'core' kernels for device type 'meta'"):
        ops.gelu(x)
    monkeypatch.setenv("TEMPO_DS_OPS", "auto")
    with pytest.warns(RuntimeWarning, match="could not build op 'core' for device type 'meta'"):
        y = ops.gelu(x)
    assert not _backend.is_compiled(_backend.ops("core", x.device))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per family and device type
        dx, = torch.autograd.grad(ops.gelu(x), [x], torch.ones_like(y))
    assert (y.shape, y.dtype, y.device.type) == (x.shape, x.dtype, "meta")
    assert (dx.shape, dx.dtype, dx.device.type) == (x.shape, x.dtype, "meta")


def _over_2_31(device):
    """2^31 + 9 elements (4 GiB in bf16): the last ones sit beyond int32 offsets."""
    n = (1 << 31) + 9
    tail = torch.tensor([-2.0, -0.9, -0.5, 0.25, 1.0, 3.0, -0.1, 0.7, -4.0], dtype=torch.bfloat16)
    try:
        x = torch.zeros(n, dtype=torch.bfloat16, device=device)
    except (RuntimeError, MemoryError):
        pytest.skip("not enough memory for a 2^31-element tensor")
    x[-9:] = tail.to(device)
    return x, tail.to(device)


@pytest.mark.slow
def test_forward_over_2_31_elements_cpu():
    x, tail = _over_2_31("cpu")
    kernels = _backend.ops("core", x.device)
    y, bits = kernels.gelu_fwd(x, False)
    assert bits.numel() == (x.numel() + 7) // 8
    torch.testing.assert_close(y[-9:], F.gelu(tail))
    assert int(bits[-1]) == int(bool(tail[-1] < X_STAR["none"]))


@pytest.mark.gpu
def test_forward_and_backward_over_2_31_elements_cuda():
    x, tail = _over_2_31("cuda")
    kernels = _backend.ops("core", x.device)
    y, bits = kernels.gelu_fwd(x, False)
    torch.testing.assert_close(y[-9:], F.gelu(tail))
    ref = tail.float().requires_grad_()
    F.gelu(ref).backward(tail.float())
    dx = kernels.gelu_bwd(x, y, bits, False)  # dy = x: any values do
    torch.testing.assert_close(dx[-9:].float(), ref.grad, rtol=2e-2, atol=2e-2)
    del dx
    table = derivative_table(torch.bfloat16, False, x.device)
    dx = kernels.gelu_bwd_table(x, y, bits, table)
    torch.testing.assert_close(dx[-9:].float(), ref.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_derivative_table_matches_cpu(dtype, approximate):
    tanh_form = approximate == "tanh"
    cpu = derivative_table(dtype, tanh_form, "cpu")
    gpu = derivative_table(dtype, tanh_form, "cuda")
    # float64 libm on host and device may differ in the last bits before the rounding to fp32
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=2 ** -22, atol=1e-9, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_kernel(dtype, approximate, poison):
    x = gelu_inputs().to(dtype)
    dy = torch.randn_like(x)
    y_cpu, dx_cpu = run_both(x, approximate, dy)[:2]
    y_gpu, dx_gpu = run_both(x.cuda(), approximate, dy.cuda())[:2]
    eps = torch.finfo(dtype).eps
    assert scaled_err(y_gpu.cpu(), y_cpu) <= eps
    assert scaled_err(dx_gpu.cpu(), dx_cpu) <= 2 * eps


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["whole", "ragged", "offset"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_whole_and_partial_packs_agree(dtype, layout, poison):
    """16-bit tensors of whole, aligned packs of 8 run a kernel without the partial-pack path; a
    ragged length or a view at an odd offset runs the general one. Both match the CPU kernel."""
    base = gelu_inputs().to(dtype)
    cut = {"whole": slice(0, 4096), "ragged": slice(0, 4093), "offset": slice(1, 4097)}[layout]
    x_gpu = base.cuda()[cut]
    x_cpu = base[cut]
    assert (x_gpu.data_ptr() % 16 == 0) == (layout != "offset")
    cuda, cpu = _backend.ops("core", "cuda"), _backend.ops("core", "cpu")
    y, bits = cuda.gelu_fwd(x_gpu, False)
    y_cpu, bits_cpu = cpu.gelu_fwd(x_cpu, False)
    assert torch.equal(bits.cpu(), bits_cpu)
    eps = torch.finfo(dtype).eps
    assert scaled_err(y.cpu(), y_cpu) <= eps
    dy = torch.randn(x_cpu.shape).to(dtype)
    dx = cuda.gelu_bwd_table(dy.cuda(), y, bits, derivative_table(dtype, False, "cuda"))
    dx_cpu = cpu.gelu_bwd_table(dy, y.cpu(), bits_cpu, derivative_table(dtype, False, "cpu"))
    assert scaled_err(dx.cpu(), dx_cpu) <= 2 * eps


def test_kernel_rejects_inconsistent_saved_tensors():
    """Direct calls into the extension check what they read, so a short `bits` cannot be overrun."""
    kernels = _backend.ops("core", torch.device("cpu"))
    y, bits = kernels.gelu_fwd(torch.randn(17), False)
    with pytest.raises(RuntimeError, match="bits must be uint8"):
        kernels.gelu_bwd(torch.ones(17), y, bits[:-1], False)
    with pytest.raises(RuntimeError, match="dy must match y"):
        kernels.gelu_bwd(torch.ones(16), y, bits, False)
