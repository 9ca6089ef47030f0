"""recompute_attention: numerics against float64 and PyTorch's SDPA, dropout against the reported
mask, masks under recomputation and chunking, and the exact bytes kept (nothing of size s x s)."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from tempo_ds import ops
from tempo_ds.memory import SavedTensorLedger
from tempo_ds.ops.dropout import record_dropout_masks

from .numerics import DTYPES, assert_double_backward_raises, assert_within_pytorch_error


# every test runs with fresh kernel outputs NaN-filled (conftest's poison fixture)
pytestmark = pytest.mark.usefixtures("poison")


def fused_qkv(b, heads, groups, s, hn, dtype=torch.float32):
    """q [b, np, s, hn], k, v [b, ng, s, hn] as strided views of one Megatron-layout projection
    output [s, b, ng, (np/ng + 2) * hn], so none of them is contiguous."""
    r = heads // groups
    mixed = torch.randn(s, b, groups, (r + 2) * hn, dtype=dtype)
    q, k, v = mixed.split([r * hn, hn, hn], dim=-1)
    return q.reshape(s, b, heads, hn).permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)


def run(fn, leaves, grad):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad.to(out.dtype))]


def sdpa_math(q, k, v, scale, causal):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])


def masked_reference(q, k, v, scale, causal, keep, p):
    """softmax -> dropout with a given keep mask -> @v, plain PyTorch in q's dtype."""
    r = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale if q.dtype != torch.float64 else q @ k.transpose(-1, -2) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1), float("-inf"))
    probs = (torch.softmax(scores, dim=-1) * keep * (1.0 / (1.0 - p))).to(q.dtype)
    return probs @ v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (4, 1)])
def test_matches_float64_within_pytorch_error(dtype, causal, heads, groups):
    b, s, hn, scale = 2, 64, 32, 0.3
    q, k, v = fused_qkv(b, heads, groups, s, hn, dtype)
    grad = torch.randn(b, heads, s, hn)
    ours = run(lambda *t: ops.recompute_attention(*t, p=0.0, scale=scale, causal=causal, chunk_size=7),
               [q, k, v], grad)
    stock = run(lambda *t: sdpa_math(*t, scale, causal), [q, k, v], grad)
    ref = run(lambda *t: sdpa_math(*t, scale, causal), [q.double(), k.double(), v.double()], grad)
    for name, o, st, r in zip(["out", "dq", "dk", "dv"], ours, stock, ref):
        assert_within_pytorch_error(o, st, r, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_applies_the_reported_mask(dtype, causal):
    b, heads, groups, s, hn, p, scale = 2, 4, 2, 20, 8, 0.3, 0.35
    q, k, v = fused_qkv(b, heads, groups, s, hn, dtype)
    grad = torch.randn(b, heads, s, hn)
    with record_dropout_masks() as masks:
        ours = run(lambda *t: ops.recompute_attention(*t, p=p, scale=scale, causal=causal, chunk_size=6),
                   [q, k, v], grad)
    (name, keep), = masks
    assert name == "recompute_attention" and keep.shape == (b, heads, s, s)
    assert 0.6 < keep.float().mean() < 0.8
    stock = run(lambda *t: masked_reference(*t, scale, causal, keep, p), [q, k, v], grad)
    ref = run(lambda *t: masked_reference(*t, scale, causal, keep, p), [q.double(), k.double(), v.double()], grad)
    for name, o, st, r in zip(["out", "dq", "dk", "dv"], ours, stock, ref):
        assert_within_pytorch_error(o, st, r, name)


def test_same_mask_layout_as_softmax_dropout_matmul():
    """Both ops index the [b, np, sq, sk] probabilities alike, so one seed drops the same elements."""
    q, k, v = fused_qkv(1, 2, 2, 9, 4)
    masks = []
    for fn in (lambda: ops.recompute_attention(q, k, v, p=0.5, causal=True, chunk_size=2),
               lambda: ops.softmax_dropout_matmul(q @ k.transpose(-1, -2), v, None, 0.5, 0.5, causal=True)):
        torch.manual_seed(3)
        with record_dropout_masks() as recorded:
            fn()
        masks.append(recorded[0][1])
    assert torch.equal(*masks)


def test_result_does_not_depend_on_chunk_size():
    q, k, v = fused_qkv(2, 4, 2, 23, 8)
    grad = torch.randn(2, 4, 23, 8)
    results = []
    for chunk_size in (1, 5, 23, None):
        torch.manual_seed(11)
        results.append(run(lambda *t: ops.recompute_attention(*t, p=0.2, causal=True, chunk_size=chunk_size),
                           [q, k, v], grad))
    for other in results[1:]:
        # the rows of out and dq are computed alike; dk, dv sum over chunks in another order
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_cpu_build_and_fallback_agree(monkeypatch):
    q, k, v = fused_qkv(2, 4, 2, 11, 4, torch.float64)
    grad = torch.randn(2, 4, 11, 4, dtype=torch.float64)
    results = []
    for mode in ("built", "torch"):
        monkeypatch.setenv("TEMPO_DS_OPS", mode)
        torch.manual_seed(1)
        results.append(run(lambda *t: ops.recompute_attention(*t, p=0.4, causal=True, chunk_size=3), [q, k, v], grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_checkpoint_recomputation_gives_bit_identical_gradients():
    q, k, v = (t.detach().requires_grad_() for t in fused_qkv(2, 4, 2, 16, 8))

    def block(a, b, c):
        return ops.recompute_attention(a.tanh(), b, c, p=0.5, causal=True, chunk_size=5).sin()

    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(7)
        out = checkpoint(block, q, k, v, use_reentrant=False) if use_checkpoint else block(q, k, v)
        grads.append(torch.autograd.grad(out.sum(), [q, k, v]))
    for plain, recomputed in zip(*grads):
        assert torch.equal(plain, recomputed)


def test_no_dropout_draws_no_random_number():
    q, k, v = fused_qkv(1, 2, 2, 5, 4)
    state = torch.get_rng_state()
    ops.recompute_attention(q, k, v, p=0.0)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_contract_exact_bytes(dtype):
    """Beyond the fused QKV storage (q, k, v are views of it): the fp32 logsumexp and the seed."""
    b, heads, groups, s, hn = 2, 4, 2, 64, 16
    r = heads // groups
    mixed = torch.randn(s, b, groups, (r + 2) * hn, dtype=dtype, requires_grad=True)
    # a non-leaf, as Megatron's projection output (a leaf is saved by reference but is a parameter-
    # like input; both count once by storage)
    fused = mixed * 1
    q, k, v = fused.split([r * hn, hn, hn], dim=-1)
    q = q.reshape(s, b, heads, hn).permute(1, 2, 0, 3)
    k, v = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)
    with SavedTensorLedger() as ledger:
        out = ops.recompute_attention(q, k, v, p=0.1, causal=True, chunk_size=16)
    report = ledger.report(out)
    ours = [rec for rec in report.records if rec.op == "RecomputeAttentionFunction"]
    # with r > 1 heads per group the [s, b, np, hn] reshape of q copies (as in Megatron), so q has its
    # own storage; k and v stay views of the projection output
    inputs = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (fused, q, k, v)}
    assert len(inputs) == 2
    assert sum(rec.nbytes for rec in ours) == sum(inputs.values()) + b * heads * s * 4 + 8
    assert all(torch.Size(rec.shape).numel() < b * heads * s * s for rec in ours)
    # stock on the same input: SDPA's math kernel keeps s x s tensors
    with SavedTensorLedger() as ledger:
        stock = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True, enable_gqa=True)
    assert ledger.report(stock).total_bytes > b * heads * s * s * 4


def test_bad_inputs_name_the_argument():
    q, k, v = fused_qkv(2, 4, 2, 6, 4)
    with pytest.raises(ValueError, match="q must be 4-D"):
        ops.recompute_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k must be"):
        ops.recompute_attention(q, k[:, :, :, :3], v)
    with pytest.raises(ValueError, match="k must be"):
        ops.recompute_attention(q, torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4))
    with pytest.raises(TypeError, match="v must have the dtype of q"):
        ops.recompute_attention(q, k, v.double())
    # a placement mistake is a ValueError, as in the norms (meta stands in for a second device)
    with pytest.raises(ValueError, match="k must be on the device of q"):
        ops.recompute_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match=r"\bp must be"):
        ops.recompute_attention(q, k, v, p=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        ops.recompute_attention(q, k, v, chunk_size=0)


def autocast(dtype=torch.bfloat16):
    return torch.autocast("cpu", dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_autocast_within_sdpa_error_under_autocast(dtype, causal):
    """Under autocast the op converts q, k, v to the autocast dtype as SDPA does, then computes in
    fp32 in forward and backward alike. The float64 reference takes the converted inputs, so the
    check sees the attention arithmetic and not the shared input rounding; with autocast left on
    inside the op (q @ kᵀ in bf16 forward, fp32 recomputation backward) it fails by 3-7x."""
    b, heads, groups, s, hn, scale = 2, 4, 2, 64, 32, 0.3
    q, k, v = fused_qkv(b, heads, groups, s, hn, dtype)
    grad = torch.randn(b, heads, s, hn)

    def under_autocast(fn):
        def wrapped(*t):
            with autocast():
                return fn(*t)
        return wrapped

    ours = run(under_autocast(lambda *t: ops.recompute_attention(*t, scale=scale, causal=causal, chunk_size=7)),
               [q, k, v], grad)
    stock = run(under_autocast(lambda *t: sdpa_math(*t, scale, causal)), [q, k, v], grad)
    ref = run(lambda *t: sdpa_math(*t, scale, causal), [t.bfloat16().double() for t in (q, k, v)], grad)
    # the output in the autocast dtype, the gradients in the inputs' dtype, as SDPA's (checked too)
    assert ours[0].dtype == torch.bfloat16 and all(g.dtype == dtype for g in ours[1:])
    for name, o, st, r in zip(["out", "dq", "dk", "dv"], ours, stock, ref):
        assert_within_pytorch_error(o, st, r, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_autocast_is_the_op_on_converted_inputs(dtype):
    """Forward and backward under autocast (backward called inside the autocast region too) give
    exactly what the op gives outside autocast on inputs converted to the autocast dtype; float64
    is not converted, as autocast leaves it alone."""
    q, k, v = fused_qkv(2, 4, 2, 16, 8, dtype)
    grad = torch.randn(2, 4, 16, 8)
    target = torch.bfloat16 if dtype != torch.float64 else dtype
    torch.manual_seed(5)
    expected = run(lambda *t: ops.recompute_attention(*t, p=0.3, causal=True, chunk_size=5),
                   [t.to(target) for t in (q, k, v)], grad)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(5)
    with autocast():
        out = ops.recompute_attention(*leaves, p=0.3, causal=True, chunk_size=5)
        grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    assert out.dtype == target and all(g.dtype == dtype for g in grads)
    for name, got, want in zip(["out", "dq", "dk", "dv"], [out, *grads], expected):
        assert torch.equal(got, want.to(got.dtype)), name


@pytest.mark.parametrize("mode", ["built", "torch"])
def test_double_backward_raises(mode, monkeypatch):
    monkeypatch.setenv("TEMPO_DS_OPS", mode)
    q, k, v = (t.detach().requires_grad_() for t in fused_qkv(1, 2, 2, 6, 4))
    assert_double_backward_raises(ops.recompute_attention(q, k, v, p=0.2, causal=True), q)


@pytest.mark.parametrize("q_shape,k_shape", [
    ((0, 4, 5, 3), (0, 2, 5, 3)),  # empty batch
    ((2, 4, 0, 3), (2, 2, 5, 3)),  # no query rows
    ((2, 0, 5, 3), (2, 1, 5, 3)),  # no heads (ng = 1 divides np = 0, as SDPA's enable_gqa allows)
])
def test_empty_tensors(q_shape, k_shape):
    q, k, v = torch.randn(q_shape), torch.randn(k_shape), torch.randn(k_shape)
    grad = torch.randn(*q_shape[:3], v.shape[-1])
    ours = run(lambda *t: ops.recompute_attention(*t, p=0.2, causal=False), [q, k, v], grad)
    stock = run(lambda *t: sdpa_math(*t, None, False), [q, k, v], grad)
    for name, o, st in zip(["out", "dq", "dk", "dv"], ours, stock):
        # dk, dv are exact zeros when there is nothing to attend from
        assert o.shape == st.shape and o.dtype == st.dtype, name
        torch.testing.assert_close(o, st, rtol=0, atol=0, msg=name)
