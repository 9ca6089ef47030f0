"""Output-saving LayerNorm and RMSNorm: numerics against float64, the gamma fallback, determinism,
argument errors, the PyTorch fallback, and the memory contract (what is saved, in bytes)."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tempo_ds.memory import SavedTensorLedger
from tempo_ds.modules import TempoLayerNorm, TempoRMSNorm
from tempo_ds.modules.swap import swap_modules
from tempo_ds.ops import _backend, layer_norm, rms_norm
from tempo_ds.ops import norm as norm_ops
from tempo_ds.ops.reference import recover_bound, unrecoverable_features

from .numerics import DTYPES, assert_within_pytorch_error, scaled_err

HALF_DTYPES = [torch.float16, torch.bfloat16]
# (leading dims, hidden): hidden sizes that are not powers of two, a row longer than any block,
# and 3-D input. Row counts stay small so that the CPU run is quick.
SHAPES = [((16,), 1023), ((8,), 1500), ((4,), 12288), ((2, 5), 256)]


def _stock(op):
    """PyTorch's op. Mixed precision (fp32 parameters, 16-bit x) runs as x.float() -> op -> cast
    back, the semantics of a mixed-precision norm on every device (not every native kernel
    accepts mixed dtypes; where CPU's does, its y and dx are the same)."""
    native = {"layer_norm": lambda x, w, b, eps: F.layer_norm(x, (x.shape[-1],), w, b, eps),
              "rms_norm": lambda x, w, b, eps: F.rms_norm(x, (x.shape[-1],), w, eps)}[op]

    def run(x, w, b, eps):
        if w is not None and w.dtype != x.dtype:
            return native(x.float(), w, b, eps).to(x.dtype)
        return native(x, w, b, eps)
    return run


def _ours(op, recover_check="clamp"):
    return {"layer_norm": lambda x, w, b, eps: layer_norm(x, x.shape[-1:], w, b, eps, recover_check=recover_check),
            "rms_norm": lambda x, w, b, eps: rms_norm(x, x.shape[-1:], w, eps, recover_check=recover_check)}[op]


def _make(lead, hidden, dtype, param_dtype=None, device="cpu", affine=("weight", "bias")):
    """x and trained-looking parameters: gamma around 1, beta around 0 (as in real checkpoints)."""
    param_dtype = param_dtype or dtype
    x = (torch.randn(*lead, hidden, device=device) * 2 + 0.5).to(dtype)
    w = (1 + 0.2 * torch.randn(hidden, device=device)).to(param_dtype) if "weight" in affine else None
    b = (0.1 * torch.randn(hidden, device=device)).to(param_dtype) if "bias" in affine else None
    dy = torch.randn(*lead, hidden, device=device).to(dtype)
    return x, w, b, dy


def _run(fn, x, w, b, dy, eps=1e-5, cast=None):
    """Output and gradients of fn; `cast` converts the inputs first (float64 reference)."""
    leaves = [None if t is None else (t.detach().to(cast) if cast else t.detach()).requires_grad_()
              for t in (x, w, b)]
    y = fn(*leaves, eps)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy.to(y.dtype))
    it = iter(grads)
    return [y.detach()] + [None if t is None else next(it) for t in leaves]


def _compare(op, x, w, b, dy, eps=1e-5, baseline_params=None, recover_check="clamp"):
    """Our output and gradients within twice PyTorch's error (same dtype) of float64.

    baseline_params: dtype of the parameters of the PyTorch baseline for the parameter gradients
    (see test_mixed_precision)."""
    ours = _run(_ours(op, recover_check), x, w, b, dy, eps)
    stock = _run(_stock(op), x, w, b, dy, eps)
    ref = _run(_stock(op), x, w, b, dy, eps, cast=torch.float64)
    if baseline_params is not None:
        cast = [None if t is None else t.to(baseline_params) for t in (w, b)]
        low = _run(_stock(op), x, *cast, dy, eps)
        stock = stock[:2] + [None if g is None else g.to(w.dtype) for g in low[2:]]
    errors = {}
    for name, o, s, r in zip(("y", "dx", "dweight", "dbias"), ours, stock, ref):
        if r is None:
            assert o is None, f"{name} should be None"
            continue
        errors[name] = assert_within_pytorch_error(o, s, r, name=name)
    return errors


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,hidden", SHAPES, ids=lambda v: str(v))
def test_matches_float64_within_pytorch_error(op, dtype, lead, hidden, poison):
    x, w, b, dy = _make(lead, hidden, dtype)
    _compare(op, x, w, b if op == "layer_norm" else None, dy)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("rows,hidden", [(300, 1024), (4096, 256)])
def test_parameter_gradients_over_many_rows(op, rows, hidden):
    """dgamma and dbeta sum over every row, so over hundreds or thousands of rows the order of the
    sum sets their fp32 error. PyTorch's RMSNorm backward sums by cascade; with a plain loop over
    each chunk's rows this test measured RMSNorm's dgamma at 2.84 and 2.45 times its error (CPU
    build, 2026-11-27). Rows are now summed by cascade within a chunk and chunks pairwise (at most
    0.68 of the bound over seeds 0-9, docs/norm.md)."""
    x, w, b, dy = _make((rows,), hidden, torch.float32)
    _compare(op, x, w, b if op == "layer_norm" else None, dy)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("affine", [(), ("weight",), ("bias",)], ids=["none", "weight", "bias"])
def test_optional_parameters(op, affine, poison):
    if op == "rms_norm" and affine == ("bias",):
        pytest.skip("RMSNorm has no bias")
    x, w, b, dy = _make((12,), 1023, torch.bfloat16, affine=affine)
    _compare(op, x, w, b, dy)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_mixed_precision(op, dtype, poison):
    """fp32 gamma/beta next to 16-bit x. y and dx are held to PyTorch's mixed-precision error.
    dgamma is computed from x_hat recovered from the 16-bit output, so it carries the rounding of
    y: it is held to the error of PyTorch with 16-bit parameters (the information the saved
    output holds), not to PyTorch's fp32 dgamma from the exact input (docs/norm.md)."""
    x, w, b, dy = _make((16,), 1500, dtype, param_dtype=torch.float32)
    b = b if op == "layer_norm" else None
    ours = _run(_ours(op), x, w, b, dy)
    assert ours[0].dtype == dtype and ours[2].dtype == torch.float32
    _compare(op, x, w, b, dy, baseline_params=dtype)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_many_row_chunks(op, poison):
    """Enough rows that dgamma / dbeta are summed over many chunks on every device."""
    x, w, b, dy = _make((1200,), 96, torch.float32)
    _compare(op, x, w, b if op == "layer_norm" else None, dy)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_non_contiguous_input(op, poison):
    x, w, b, dy = _make((16,), 640, torch.bfloat16)
    b = b if op == "layer_norm" else None
    strided = torch.randn(640, 16).to(torch.bfloat16).t()
    assert not strided.is_contiguous()
    got = _run(_ours(op), strided, w, b, dy)
    want = _run(_ours(op), strided.contiguous(), w, b, dy)
    for g, e in zip(got, want):
        if e is not None:
            assert torch.equal(g, e)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
def test_empty_rows(op, lead, poison):
    """No rows: empty output and dx, and parameter gradients that are exact zeros (not NaN)."""
    x, w, b, dy = _make(lead, 64, torch.bfloat16)
    b = b if op == "layer_norm" else None
    y, dx, dw, db = _run(_ours(op), x, w, b, dy)
    assert y.shape == x.shape and dx.shape == x.shape
    assert torch.equal(dw, torch.zeros_like(w))
    if b is not None:
        assert torch.equal(db, torch.zeros_like(b))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_input_propagates(op, bad, poison):
    """A NaN or Inf in a row gives non-finite output and gradients wherever stock PyTorch does:
    never silent zeros. A NaN makes that row's dx and all of dgamma NaN."""
    x, w, b, dy = _make((6,), 300, torch.float32)
    b = b if op == "layer_norm" else None
    x[2, 17] = bad
    ours = _run(_ours(op), x, w, b, dy)
    stock = _run(_stock(op), x, w, b, dy)
    for name, o, s in zip(("y", "dx", "dweight", "dbias"), ours, stock):
        if s is not None:
            assert not (o.isfinite() & ~s.isfinite()).any(), f"{name}: finite where PyTorch is not"
    dx, dw = ours[1], ours[2]
    assert not dx[2].isfinite().all() and dx[[0, 1, 3, 4, 5]].isfinite().all()
    if math.isnan(bad):
        assert dx[2].isnan().all() and dw.isnan().all()


def test_unrecoverable_features_rule():
    w = torch.tensor([1.0, 0.0, -1e-3, 0.5, 1e-3, float("nan")])
    b = torch.tensor([5.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    bound = recover_bound(torch.bfloat16)
    assert bound == 1 / (16 * torch.finfo(torch.bfloat16).eps)
    # |gamma| * R <= |beta| (R = 8 for bf16) or gamma == 0; NaN stays on the kernel path
    assert unrecoverable_features(w, b, torch.bfloat16).tolist() == [False, True, True, False, False, False]
    assert unrecoverable_features(w, None, torch.bfloat16).tolist() == [False, True, False, False, False, False]
    assert not unrecoverable_features(w, b, torch.float32)[2]


def test_unrecoverable_features_rule_subnormal_outputs():
    """|beta_j| is floored at the smallest normal number: in fp16 a gamma_j at or below
    tiny / R = 2^-14 / 64 makes y_j subnormal, whose fixed spacing would cost x_hat_j more than
    the rule allows, even with beta_j = 0. bf16 and fp32 share fp32's exponent range."""
    floor = torch.finfo(torch.float16).tiny / recover_bound(torch.float16)
    assert floor == 2.0 ** -20
    w = torch.tensor([1.0, 1.01 * floor, floor, 1e-7, -1e-7])
    expected = [False, False, True, True, True]
    assert unrecoverable_features(w, None, torch.float16).tolist() == expected
    assert unrecoverable_features(w, torch.zeros(5), torch.float16).tolist() == expected
    for dtype in (torch.bfloat16, torch.float32):
        assert not unrecoverable_features(w, torch.zeros(5), dtype).any()


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_gamma_with_subnormal_outputs_falls_back(op, monkeypatch):
    """fp16, beta = 0, one gamma_j = 1e-7: y_j is subnormal. With recover_check="exact" the call
    falls back to PyTorch and stays within twice its error. On the kernel path without the clamp
    (recover_check=False) the error of dgamma_j is many times PyTorch's (CPU build, 2026-11-27:
    LayerNorm 0.198 against 2.6e-3, RMSNorm 0.742 against 6.7e-4), which shows that the check is
    what keeps the error down."""
    monkeypatch.setattr(norm_ops, "_warned_ops", set())
    x, w, b, dy = _make((64,), 256, torch.float16)
    w[:] = 1
    w[0] = 1e-7
    b = torch.zeros_like(w) if op == "layer_norm" else None
    with pytest.warns(RuntimeWarning, match="smallest normal"):
        _compare(op, x, w, b, dy, recover_check="exact")
    ref = _run(_stock(op), x, w, b, dy, cast=torch.float64)
    stock = _run(_stock(op), x, w, b, dy)
    kernel = _run(_ours(op, recover_check=False), x, w, b, dy)
    kernel_err = (kernel[2][0].double() - ref[2][0]).abs().item()
    stock_err = (stock[2][0].double() - ref[2][0]).abs().item()
    assert kernel_err > 20 * stock_err


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_gamma_falls_back_to_stock(op, dtype, poison, monkeypatch):
    """recover_check="exact", gamma with exact zeros: the call keeps the input and runs PyTorch's
    own op, warning once."""
    monkeypatch.setattr(norm_ops, "_warned_ops", set())
    x, w, b, dy = _make((8,), 1023, dtype)
    b = b if op == "layer_norm" else None
    w[::7] = 0
    with pytest.warns(RuntimeWarning, match="keeps the input"):
        _compare(op, x, w, b, dy, recover_check="exact")
    module = (TempoLayerNorm if op == "layer_norm" else TempoRMSNorm)(1023, dtype=dtype, recover_check="exact")
    with torch.no_grad():
        module.weight.copy_(w)
    with pytest.warns(RuntimeWarning, match="keeps the input"):
        module(x.requires_grad_()).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(x).sum().backward()  # the warning is once per module
        with torch.no_grad():
            module(x)  # inference: nothing to recover, no check, no warning
    with SavedTensorLedger(module) as ledger:
        y = module(x)
    ops_used = set(ledger.report(y).by_op())
    assert not ops_used & {"LayerNormFunction", "RMSNormFunction"}, "the fallback runs PyTorch's op"


def test_recover_check_off_skips_the_fallback():
    """recover_check=False trusts gamma: no check, no warning, and a zero gamma then makes the
    gradients non-finite (documented cost of skipping the check)."""
    x, w, b, dy = _make((4,), 64, torch.float32)
    w[3] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xr = x.requires_grad_()
        layer_norm(xr, (64,), w, b, recover_check=False).backward(dy)
    assert not xr.grad.isfinite().all()


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_backward_is_deterministic(op):
    """Two backward runs, and runs with 1 or 2 threads, give bit-identical gradients."""
    x, w, b, dy = _make((600,), 1023, torch.bfloat16, param_dtype=torch.float32)
    b = b if op == "layer_norm" else None
    first = _run(_ours(op), x, w, b, dy)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _run(_ours(op), x, w, b, dy)
    finally:
        torch.set_num_threads(threads)
    again = _run(_ours(op), x, w, b, dy)
    for a, s, c in zip(first, single, again):
        if a is not None:
            assert torch.equal(a, c) and torch.equal(a, s)


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w, b: layer_norm(x.int(), (64,), w, b), TypeError, "x must be"),
    (lambda x, w, b: layer_norm(x, (64,), w[:-1], b), ValueError, "weight must have shape"),
    (lambda x, w, b: layer_norm(x, (64,), w, b[:-1]), ValueError, "bias must have shape"),
    (lambda x, w, b: layer_norm(x, (64,), w.half(), b), TypeError, "weight must have the dtype"),
    (lambda x, w, b: layer_norm(x, (64,), w, b.double()), TypeError, "bias must have the dtype"),
    (lambda x, w, b: layer_norm(x, (64,), w, b.float()), TypeError, "bias must have the dtype of weight"),
    (lambda x, w, b: layer_norm(x, (64,), w.long(), b), TypeError, "weight must be"),
    (lambda x, w, b: layer_norm(x, (64,), w, b, eps=-1.0), ValueError, "eps must be"),
    (lambda x, w, b: layer_norm(x[:, :0], (0,), None, None), ValueError, "x must have a non-empty"),
    (lambda x, w, b: rms_norm(x, (64,), w.view(2, -1)), ValueError, "weight must have shape"),
    (lambda x, w, b: rms_norm(x, (64,), w.to(torch.float16)), TypeError, "weight must have the dtype"),
    (lambda x, w, b: layer_norm(x, (4, 16), w, b), ValueError, "normalized_shape must be one positive size"),
    (lambda x, w, b: layer_norm(x, (63,), w, b), ValueError, "normalized_shape must be the last dimension"),
    (lambda x, w, b: rms_norm(x, 32, w), ValueError, "normalized_shape must be the last dimension"),
    (lambda x, w, b: rms_norm(x, "64", w), ValueError, "normalized_shape must be one positive size"),
    (lambda x, w, b: layer_norm(x, (64,), w, b, recover_check="maybe"), ValueError, "recover_check must be"),
    (lambda x, w, b: TempoRMSNorm(64, recover_check="yes"), ValueError, "recover_check must be"),
    (lambda x, w, b: TempoLayerNorm(32)(x), ValueError, "x must have last dimension"),
    (lambda x, w, b: TempoRMSNorm(32)(x), ValueError, "x must have last dimension"),
    (lambda x, w, b: TempoLayerNorm((4, 16)), ValueError, "normalized_shape"),
])
def test_bad_arguments_name_the_culprit(call, error, match):
    x, w, b, _ = _make((4,), 64, torch.bfloat16)
    with pytest.raises(error, match=match):
        call(x, w, b)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_compiled_kernel_matches_pytorch_fallback(op, dtype, monkeypatch):
    x, w, b, dy = _make((8,), 1500, dtype)
    b = b if op == "layer_norm" else None
    compiled = _run(_ours(op), x, w, b, dy)
    assert _backend.is_compiled(_backend.ops("core", x.device))
    monkeypatch.setenv("TEMPO_DS_OPS", "torch")
    monkeypatch.setattr(_backend, "_cache", {})
    assert not _backend.is_compiled(_backend.ops("core", x.device))
    fallback = _run(_ours(op), x, w, b, dy)
    for name, c, f in zip(("y", "dx", "dweight", "dbias"), compiled, fallback):
        if c is not None:
            # the two differ only in summation order: one rounding step of the output dtype
            torch.testing.assert_close(c, f, msg=name)


def _storage(t):
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


@pytest.mark.parametrize("cls,stock_cls", [(TempoLayerNorm, nn.LayerNorm), (TempoRMSNorm, nn.RMSNorm)])
def test_memory_contract(cls, stock_cls):
    """Ours saves exactly y (M*N*2 bytes, the storage the next layer keeps) and rstd (M*4); the
    stock LayerNorm saves x and two statistics per row."""
    M, N = 24, 320
    x = torch.randn(M, N, dtype=torch.bfloat16, requires_grad=True)
    ours = cls(N, dtype=torch.bfloat16)
    with SavedTensorLedger(ours) as ledger:
        y = ours(x)
    report = ledger.report(y)
    assert report.total_bytes == M * N * 2 + M * 4
    assert _storage(y) in {r.key for r in report.records}
    assert _storage(x) not in {r.key for r in report.records}
    assert "norm" in report.by_category()

    stock = stock_cls(N, dtype=torch.bfloat16)
    with SavedTensorLedger(stock) as ledger:
        y_stock = stock(x)
    stock_bytes = ledger.report(y_stock).total_bytes
    if stock_cls is nn.LayerNorm:
        # x plus mean and rstd per row, which PyTorch keeps in the input dtype on CPU (in fp32 on
        # CUDA)
        assert stock_bytes == M * N * 2 + 2 * M * x.element_size()
        # alone, the norm swaps x for y; the saving appears once the next layer shares y
        # (test_memory_contract_in_a_block)
        assert stock_bytes >= report.total_bytes
    else:
        # stock RMSNorm on CPU is composite and keeps fp32 copies of x and of x * rstd
        assert stock_bytes > report.total_bytes


def test_memory_contract_in_a_block():
    """LayerNorm -> Linear: the Linear keeps y anyway, so our norm adds only rstd to it."""
    M, N = 24, 320

    def measure(norm):
        block = nn.Sequential(norm, nn.Linear(N, N, dtype=torch.bfloat16))
        x = torch.randn(M, N, dtype=torch.bfloat16, requires_grad=True)
        with SavedTensorLedger(block) as ledger:
            out = block(x)
        return ledger.report(out).total_bytes

    ours = measure(TempoLayerNorm(N, dtype=torch.bfloat16))
    stock = measure(nn.LayerNorm(N, dtype=torch.bfloat16))
    assert ours == M * N * 2 + M * 4
    assert stock == 2 * M * N * 2 + 2 * M * 2  # x, y, and bf16 mean/rstd (CPU)


def test_from_torch_reuses_parameters_and_state_dict():
    stock = nn.LayerNorm(48, eps=1e-6)
    ours = TempoLayerNorm.from_torch(stock)
    assert ours.weight is stock.weight and ours.bias is stock.bias and ours.eps == 1e-6
    assert ours.state_dict().keys() == stock.state_dict().keys()
    fresh = TempoLayerNorm(48)
    fresh.load_state_dict(stock.state_dict())
    nn.LayerNorm(48).load_state_dict(fresh.state_dict())
    no_bias = TempoLayerNorm.from_torch(nn.LayerNorm(48, bias=False))
    assert no_bias.bias is None and no_bias.state_dict().keys() == {"weight"}
    plain = TempoLayerNorm.from_torch(nn.LayerNorm(48, elementwise_affine=False))
    assert plain.weight is None and not plain.elementwise_affine
    x = torch.randn(3, 48)
    torch.testing.assert_close(ours(x), stock(x))

    rms = nn.RMSNorm(48)
    ours_rms = TempoRMSNorm.from_torch(rms)
    assert ours_rms.weight is rms.weight and ours_rms.eps is None
    assert ours_rms.state_dict().keys() == rms.state_dict().keys()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_default_eps_matches_torch(dtype):
    """torch.nn.RMSNorm(eps=None) uses the epsilon of its math type; tiny inputs show the eps.
    Ours has the same default, built directly or from the stock module."""
    stock = nn.RMSNorm(64, dtype=dtype)
    x = (torch.randn(4, 64) * 1e-4).to(dtype)
    eps = torch.finfo(torch.float32 if dtype in HALF_DTYPES else dtype).eps
    for ours in (TempoRMSNorm.from_torch(stock), TempoRMSNorm(64, dtype=dtype)):
        with torch.no_grad():
            ref = F.rms_norm(x.double(), (64,), stock.weight.double(), eps)
            assert_within_pytorch_error(ours(x), stock(x), ref)


def test_swap_modules():
    model = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32), nn.RMSNorm(32), nn.LayerNorm((4, 8)))
    weight = model[0].weight
    counts = swap_modules(model, kinds={"layernorm", "rmsnorm"}).swapped
    assert counts == {"layernorm": 1, "rmsnorm": 1}
    assert isinstance(model[0], TempoLayerNorm) and model[0].weight is weight
    assert isinstance(model[2], TempoRMSNorm)
    assert type(model[3]) is nn.LayerNorm  # over two dims: kept stock


@pytest.mark.slow
def test_over_2_pow_31_elements_cpu_forward():
    """int64 offsets: a row past element 2^31 is normalised correctly (forward only: the backward
    would need 16 GiB here; test_over_2_pow_31_elements_gpu covers it)."""
    N = 1 << 16
    M = (1 << 31) // N + 1
    # Only the last two rows are checked and rows are independent, so the rest stays
    # uninitialised: that keeps the resident memory at about y's 4 GiB.
    x = torch.empty(M, N, dtype=torch.bfloat16)
    x[-2:].normal_()
    w = torch.ones(N, dtype=torch.bfloat16)
    y = layer_norm(x, (N,), w, None)
    ref = F.layer_norm(x[-2:].double(), (N,))
    assert_within_pytorch_error(y[-2:], F.layer_norm(x[-2:], (N,)), ref)


# -- GPU: CUDA kernels against float64 and against the CPU kernels ------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# Rows held in registers (64, 1024, 12288 in 16-bit; 12288 fp32 forward only) and streamed from
# memory (1023 and 1500: not 16-byte multiples; 40960: longer than the registers hold).
@pytest.mark.parametrize("hidden", [64, 1023, 1024, 1500, 12288, 40960])
@pytest.mark.parametrize("mixed", [False, True], ids=["same", "mixed"])
def test_cuda_matches_float64_and_cpu(op, dtype, hidden, mixed, poison):
    if mixed and dtype == torch.float32:
        pytest.skip("mixed precision is for 16-bit x")
    param_dtype = torch.float32 if mixed else dtype
    x, w, b, dy = _make((300,), hidden, dtype, param_dtype=param_dtype, device="cuda")
    b = b if op == "layer_norm" else None
    _compare(op, x, w, b, dy, baseline_params=dtype if mixed else None)
    # The same math in both builds. Through a whole forward and backward they may differ by more
    # than rounding noise: a last-bit difference in rstd (another reduction order) can round an
    # element of the 16-bit y the other way, and x_hat recovered from y moves by that ulp. So the
    # forward is compared on its own (within a rounding of each other), and the backward is fed
    # the very same saved (y, rstd) on both devices (within reduction-order rounding).
    cuda, cpu = _backend.ops("core", "cuda"), _backend.ops("core", "cpu")
    params = (w, b) if op == "layer_norm" else (w,)
    params_cpu = tuple(None if t is None else t.cpu() for t in params)
    x2d, dy2d = x.reshape(-1, hidden), dy.reshape(-1, hidden)
    y, rstd = getattr(cuda, f"{op}_fwd")(x2d, *params, 1e-5)
    y_cpu, rstd_cpu = getattr(cpu, f"{op}_fwd")(x2d.cpu(), *params_cpu, 1e-5)
    _assert_roundings_apart(y, y_cpu, "y")
    _assert_roundings_apart(rstd, rstd_cpu, "rstd")
    grads = getattr(cuda, f"{op}_bwd")(dy2d, y, rstd, *params, True)
    grads_cpu = getattr(cpu, f"{op}_bwd")(dy2d.cpu(), y.cpu(), rstd.cpu(), *params_cpu, True)
    for name, g, c in zip(("dx", "dweight", "dbias"), grads, grads_cpu):
        assert (g is None) == (c is None), name
        if g is not None:
            _assert_roundings_apart(g, c, name)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("rows,hidden", [(16384, 1024), (65536, 256)])
def test_cuda_parameter_gradients_over_many_rows(op, rows, hidden):
    """test_parameter_gradients_over_many_rows on the GPU. The CUDA kernels sum each chunk's rows
    in order (32 rows per chunk at 16384 rows, 128 at 65536) before the chunk partials, so fp32
    dgamma / dbeta over many rows are where their summation order shows against PyTorch's."""
    x, w, b, dy = _make((rows,), hidden, torch.float32, device="cuda")
    _compare(op, x, w, b if op == "layer_norm" else None, dy)


def _assert_roundings_apart(gpu, cpu, name, ulps=4):
    """Element-wise within a few roundings of the tensor's dtype, relative to the tensor's scale."""
    eps = torch.finfo(cpu.dtype).eps
    scale = max(1.0, float(cpu.abs().max())) if cpu.numel() else 1.0
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=ulps * eps, atol=ulps * eps * scale,
                               msg=lambda message: f"{name}: {message}")


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("hidden", [1023, 1024], ids=["streamed", "registers"])
def test_cuda_edge_cases(op, hidden, poison):
    b_of = (lambda b: b) if op == "layer_norm" else (lambda b: None)
    x, w, b, dy = _make((0,), hidden, torch.bfloat16, device="cuda")
    _, _, dw, _ = _run(_ours(op), x, w, b_of(b), dy)
    assert torch.equal(dw, torch.zeros_like(w))
    x, w, b, dy = _make((2000,), hidden, torch.bfloat16, device="cuda")
    first = _run(_ours(op), x, w, b_of(b), dy)
    again = _run(_ours(op), x, w, b_of(b), dy)
    for a, c in zip(first, again):
        if a is not None:
            assert torch.equal(a, c)
    x[5, 3] = math.nan
    y, dx, dw, _ = _run(_ours(op), x, w, b_of(b), dy)
    assert dx[5].isnan().all() and dw.isnan().all() and dx[:5].isfinite().all()


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("mixed", [False, True], ids=["same", "mixed"])
def test_cuda_unaligned_parameters(op, mixed, poison):
    """Parameters that are views at an odd offset of a flat buffer (as ZeRO keeps them) cannot be
    read 16 bytes at a time: the kernels read them element by element, with the same result."""
    param_dtype = torch.float32 if mixed else torch.bfloat16
    x, w, b, dy = _make((64,), 1024, torch.bfloat16, param_dtype=param_dtype, device="cuda")
    b = b if op == "layer_norm" else None
    flat = torch.empty(1 + 2 * 1024, dtype=param_dtype, device="cuda")
    w_view = flat[1:1025].copy_(w)
    b_view = None if b is None else flat[1025:].copy_(b)
    assert w_view.data_ptr() % 16 != 0
    aligned = _run(_ours(op), x, w, b, dy)
    unaligned = _run(_ours(op), x, w_view, b_view, dy)
    for name, a, u in zip(("y", "dx", "dweight", "dbias"), aligned, unaligned):
        assert (a is None) == (u is None), name
        if a is not None:
            assert torch.equal(a, u), name


@pytest.mark.gpu
def test_over_2_pow_31_elements_gpu():
    """A [M, 12288] bf16 tensor of more than 2^31 elements: the row that straddles element 2^31
    and the last row are normalised and differentiated like a float64 reference, so no offset
    wraps at 32 bits. dy is random on those two rows and zero elsewhere, so dx of every other row is
    exactly zero and dweight is the two rows' sum."""
    N = 12288
    M = (1 << 31) // N + 2
    rows = [(1 << 31) // N, M - 1]  # the first starts below element 2^31 and ends above it
    x = torch.randn(M, N, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    w = torch.ones(N, device="cuda", requires_grad=True)
    y = layer_norm(x, (N,), w, None)
    dy = torch.zeros_like(y)
    dy[rows] = torch.randn(len(rows), N, device="cuda").to(dy.dtype)
    y.backward(dy)
    picked = x[rows].detach().double().requires_grad_()
    w_ref = torch.ones(N, dtype=torch.float64, device="cuda", requires_grad=True)
    ref = F.layer_norm(picked, (N,), w_ref)
    ref.backward(dy[rows].double())
    # y rounds x_hat to bf16 (relative error at most 2^-8), and the gradients come from that y
    assert scaled_err(y[rows], ref) < 2 ** -7
    assert scaled_err(x.grad[rows], picked.grad) < 2 ** -6
    # dweight_j = sum over the two rows of dy x_hat, each x_hat off by at most 2^-8 |x_hat|
    bound = 2 ** -8 * (dy[rows].double() * ref.detach()).abs().sum(0)
    assert ((w.grad.double() - w_ref.grad).abs() <= 1.01 * bound + 1e-6).all()
    assert rows == [M - 2, M - 1] and not x.grad[: M - 2].any()
