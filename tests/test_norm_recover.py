"""The norms' recoverability policy (recover_check "clamp" / "exact" / "off") and their
torch.nn.functional call forms. ZeRO-3: tests/test_norm_zero3.py."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tempo_ds.modules import TempoLayerNorm, TempoRMSNorm
from tempo_ds.ops import _backend, layer_norm, reference, rms_norm
from tempo_ds.ops import norm as norm_ops
from tempo_ds.ops.norm import report_unrecoverable_features
from tempo_ds.ops.reference import recovery_gamma, unrecoverable_features

from .numerics import DTYPES, assert_within_pytorch_error
from .test_norm import _make, _ours, _run, _stock

OPS = ["layer_norm", "rms_norm"]
_MODULES = {"layer_norm": TempoLayerNorm, "rms_norm": TempoRMSNorm}


@pytest.fixture
def clamp_state(monkeypatch):
    """A fresh clamp counter and one-time warning for the test (the step hook reads these names)."""
    monkeypatch.setattr(norm_ops, "_tallies", {})
    monkeypatch.setattr(norm_ops, "_in_flight", [])
    monkeypatch.setattr(norm_ops, "_inexact_warned", False)
    monkeypatch.setattr(norm_ops, "_warned_ops", set())


class _HostReads(TorchDispatchMode):
    """Records the ATen ops that read a tensor's values on the host or size an output by its
    values: on an accelerator each of them waits for the device (item, bool(), nonzero, ...)."""
    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "_unique2"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _params(op, n, dtype=torch.float32):
    _, w, b, _ = _make((1,), n, dtype)
    return w, (b if op == "layer_norm" else None)


@pytest.mark.parametrize("op", OPS)
def test_default_policy_never_reads_the_device(op, clamp_state):
    """Forward and backward under the default policy, with zeroed gamma features to clamp, make no
    host read of a tensor's values (the old check's bool(mask.any()) was one). The same spy sees
    the host read of recover_check="exact", so it would see one here."""
    w, b = _params(op, 64)
    w[::5] = 0
    x = torch.randn(8, 64, requires_grad=True)

    def step(recover_check):
        with _HostReads() as spy:
            y = _ours(op, recover_check)(x, w, b, 1e-5)
            y.backward(torch.ones_like(y))
        return spy.seen

    assert step("clamp") == []
    with pytest.warns(RuntimeWarning, match="keeps the input"):
        assert "_local_scalar_dense" in step("exact")
    assert torch.isfinite(x.grad).all()
    # the clamp of the first call was counted on the device: 13 zeroed features, one backward
    assert report_unrecoverable_features() == 13


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_gamma_clamped_gradients(op, dtype, poison, clamp_state):
    """gamma with exact zeros, default policy: every gradient is finite; dx, dgamma and dbeta of
    every other feature are within twice PyTorch's error of float64; a zeroed feature's x_hat is
    recovered as exactly 0 (y_j == beta_j), so its dgamma is 0; and the count warns."""
    x, w, b, dy = _make((8,), 1023, dtype)
    b = b if op == "layer_norm" else None
    w[::7] = 0
    good = w != 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = _run(_ours(op), x, w, b, dy)
    stock = _run(_stock(op), x, w, b, dy)
    ref = _run(_stock(op), x, w, b, dy, cast=torch.float64)
    for name, o in zip(("y", "dx", "dweight", "dbias"), ours):
        assert o is None or torch.isfinite(o).all(), name
    assert_within_pytorch_error(ours[0], stock[0], ref[0], name="y")
    assert_within_pytorch_error(ours[1][:, good], stock[1][:, good], ref[1][:, good], name="dx")
    assert_within_pytorch_error(ours[2][good], stock[2][good], ref[2][good], name="dweight")
    if b is not None:
        assert_within_pytorch_error(ours[3], stock[3], ref[3], name="dbias")
    assert torch.equal(ours[2][~good], torch.zeros_like(ours[2][~good]))
    with pytest.warns(RuntimeWarning, match="clamped by magnitude"):
        assert report_unrecoverable_features() == int((~good).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(_ours(op), x, w, b, dy)
        assert report_unrecoverable_features() == int((~good).sum())  # counted, warned once only


@pytest.mark.parametrize("op,gamma_0,clamped", [
    ("layer_norm", 0.05, False), ("layer_norm", 0.004, True), ("rms_norm", 1e-39, False), ("rms_norm", 5e-41, True),
])
def test_unrecoverable_feature_follows_the_documented_policy(op, gamma_0, clamped, clamp_state):
    """bf16 output (eps = 2^-7), fp32 parameters, beta_0 = 1 (RMSNorm: beta_0 = 0, floored at tiny).
    gamma_0 is unrecoverable (|gamma_0| * 8 <= max(|beta_0|, tiny)) in every case. Above the clamp
    bound c_0 = eps * max(|beta_0|, tiny) the backward divides by gamma_0 as it is; at or below it,
    by c_0. Either way x_hat_0 comes back as x_hat_0 * |gamma_0| / |gamma_r| within
    eps * max(|beta_0|, tiny) / (2 |gamma_r|) per element (gamma_r the divisor: at most 1/2 when
    clamped), so dgamma_0 is that factor times its exact value within sum(|dy_0|) times that."""
    x, w, b, dy = _make((64,), 256, torch.bfloat16, param_dtype=torch.float32)
    w[0] = gamma_0
    if op == "layer_norm":
        b[0] = 1.0
    else:
        b = None
    limit = 1.0 if b is not None else torch.finfo(torch.bfloat16).tiny
    eps = torch.finfo(torch.bfloat16).eps
    gamma_r = recovery_gamma(w, b, torch.bfloat16)[0].double().item()
    assert unrecoverable_features(w, b, torch.bfloat16)[0]
    assert (gamma_r != w[0].item()) == clamped and abs(gamma_r) >= abs(w[0].item())
    ours = _run(_ours(op), x, w, b, dy)
    ref = _run(_stock(op), x, w, b, dy, cast=torch.float64)
    expected = w[0].double().item() / gamma_r * ref[2][0]
    per_element = eps * limit / (2 * abs(gamma_r))
    bound = dy[:, 0].double().abs().sum() * per_element + 0.01 * expected.abs()
    assert (ours[2][0].double() - expected).abs() <= bound
    assert torch.isfinite(ours[1]).all()
    assert report_unrecoverable_features() == 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("clamp", [True, False], ids=["clamp", "off"])
def test_clamp_same_in_kernel_and_fallback(op, dtype, clamp, device):
    """The compiled backward (norm_recover_gamma) and the PyTorch fallback's (recovery_gamma),
    fed the same saved y and rstd, clamp the same features the same way: zero, tiny and subnormal
    gamma, against beta or alone, with mixed precision; and neither clamps when told not to."""
    mixed = dtype in (torch.float16, torch.bfloat16)
    x, w, b, dy = _make((16,), 300, dtype, param_dtype=torch.float32 if mixed else None)
    w[0], w[1], w[2], w[3] = 0.0, -1e-7, 1e-30, 1e-39
    if op == "layer_norm":
        b[1], b[2] = 3.0, -2.0
    x, w, b, dy = (t.to(device) for t in (x, w, b, dy))
    params = (w, b) if op == "layer_norm" else (w,)
    bad = unrecoverable_features(w, params[1] if len(params) > 1 else None, dtype)
    assert bad[0] and bad.sum() < 300
    kernels = _backend.ops("core", device)
    assert _backend.is_compiled(kernels)
    y, rstd = getattr(kernels, f"{op}_fwd")(x, *params, 1e-5)
    compiled = getattr(kernels, f"{op}_bwd")(dy, y, rstd, *params, clamp)
    fallback = getattr(reference, f"{op}_bwd")(dy, y, rstd, *params, clamp)
    for name, c, f in zip(("dx", "dweight", "dbias"), compiled, fallback):
        if c is None:
            continue
        torch.testing.assert_close(c, f, msg=name, equal_nan=True)
        assert torch.isfinite(c).all() == clamp or name == "dbias", name


def _train(model, steps, edit=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    grads = []
    for step in range(steps):
        if edit is not None and step == steps - 1:
            edit()
        opt.zero_grad()
        model(torch.randn(4, 16, generator=gen)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        opt.step()
    return grads


@pytest.mark.parametrize("op", OPS)
def test_weight_data_zero_mid_training(op, clamp_state):
    """weight.data.zero_() bypasses the version counter (the old cached verdict stayed
    "recoverable" and gave NaN). Default policy: the next backward is finite and the optimizer
    step after it warns; nothing warns before. "exact": the next call falls back (no cache)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), _MODULES[op](32), nn.Linear(32, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, 3)
    with pytest.warns(RuntimeWarning, match="clamped by magnitude"):
        grads = _train(model, 2, edit=model[1].weight.data.zero_)
    assert torch.isfinite(grads[-1]).all()
    model[1].recover_check = "exact"
    with pytest.warns(RuntimeWarning, match="keeps the input"):
        grads = _train(model, 1)
    assert torch.isfinite(grads[-1]).all()


@pytest.mark.parametrize("op", OPS)
def test_exact_mode_checks_every_call(op, clamp_state, monkeypatch):
    """recover_check="exact" keeps no verdict: every training forward checks (and inference
    none), so no edit of gamma can leave a stale one."""
    calls = []
    real = norm_ops.unrecoverable_features
    monkeypatch.setattr(norm_ops, "unrecoverable_features", lambda *a: calls.append(a) or real(*a))
    module = _MODULES[op](64, recover_check="exact")
    x = torch.randn(4, 64, requires_grad=True)
    for _ in range(3):
        module(x).sum().backward()
    assert len(calls) == 3 + 3  # the check, and the clamp count of each backward
    with torch.no_grad():
        module(x)
    assert len(calls) == 6


@pytest.mark.parametrize("value,mode", [(True, "exact"), (False, "off"), ("exact", "exact"), ("clamp", "clamp")])
def test_recover_check_values(value, mode):
    assert TempoLayerNorm(8, recover_check=value).recover_check == mode
    assert TempoRMSNorm.from_torch(nn.RMSNorm(8), recover_check=value).recover_check == mode


# -- torch.nn.functional call forms ------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functional_forms_match_torch(dtype):
    """layer_norm / rms_norm take F.layer_norm / F.rms_norm's arguments, positional or keyword,
    with normalized_shape as an int, a tuple, a list or a torch.Size."""
    x, w, b, _ = _make((4, 3), 96, dtype)
    x64, w64, b64 = x.double(), w.double(), b.double()
    for shape in (96, (96,), [96], x.shape[-1:]):
        assert_within_pytorch_error(layer_norm(x, shape, w, b, 1e-6), F.layer_norm(x, (96,), w, b, 1e-6),
                                    F.layer_norm(x64, (96,), w64, b64, 1e-6))
        assert_within_pytorch_error(rms_norm(x, shape, w, 1e-6), F.rms_norm(x, (96,), w, 1e-6),
                                    F.rms_norm(x64, (96,), w64, 1e-6))
    assert torch.equal(layer_norm(x, normalized_shape=(96,), weight=w, bias=b, eps=1e-6),
                       layer_norm(x, (96,), w, b, 1e-6))
    assert torch.equal(rms_norm(x, normalized_shape=(96,), weight=w), rms_norm(x, (96,), w, None))


@pytest.mark.parametrize("call,new", [
    (lambda x, w, b: layer_norm(x, w, b), lambda x, w, b: layer_norm(x, (64,), w, b)),
    (lambda x, w, b: layer_norm(x, w, b, 1e-3), lambda x, w, b: layer_norm(x, (64,), w, b, 1e-3)),
    (lambda x, w, b: layer_norm(x, w, b, eps=1e-3), lambda x, w, b: layer_norm(x, (64,), w, b, 1e-3)),
    (lambda x, w, b: layer_norm(x, w, bias=b), lambda x, w, b: layer_norm(x, (64,), w, b)),
    (lambda x, w, b: layer_norm(x, w, None, 1e-3), lambda x, w, b: layer_norm(x, (64,), w, None, 1e-3)),
    (lambda x, w, b: layer_norm(x, None, None), lambda x, w, b: layer_norm(x, (64,))),
    (lambda x, w, b: rms_norm(x, w), lambda x, w, b: rms_norm(x, (64,), w)),
    (lambda x, w, b: rms_norm(x, w, 1e-3), lambda x, w, b: rms_norm(x, (64,), w, 1e-3)),
    (lambda x, w, b: rms_norm(x, w, eps=1e-3), lambda x, w, b: rms_norm(x, (64,), w, 1e-3)),
], ids=["ln", "ln-eps", "ln-eps-kw", "ln-bias-kw", "ln-none-eps", "ln-none", "rms", "rms-eps", "rms-eps-kw"])
def test_old_call_form_still_works_and_warns(call, new):
    """The old forms layer_norm(x, weight, bias, eps) and rms_norm(x, weight, eps) give the same
    result as the new one, with a DeprecationWarning that names the new form."""
    x, w, b, _ = _make((4,), 64, torch.float32)
    with pytest.warns(DeprecationWarning, match="normalized_shape"):
        old = call(x, w, b)
    assert torch.equal(old, new(x, w, b))
