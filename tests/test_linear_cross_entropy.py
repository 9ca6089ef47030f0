"""tempo_ds.ops.linear_cross_entropy: loss and gradients against a float64 reference (our error
at most 2x the stock path's, F.linear then an fp32 cross-entropy, in the same dtype), ignored
tokens, label smoothing, z-loss, large logits, bad input, what it keeps (ledger), the CPU kernel
against its PyTorch twin, the CUDA kernel (GPU), and TP=2 against TP=1 on gloo."""
import pytest
import torch
import torch.nn.functional as F

from tempo_ds.memory import SavedTensorLedger
from tempo_ds.ops import _backend, linear_cross_entropy
from tempo_ds.ops import reference_loss as ref_loss
from tempo_ds.ops.cross_entropy import LSE_BYTES
from tempo_ds.ops.reference_loss import linear_cross_entropy_reference as reference

from . import megatron_utils as mu
from .numerics import DTYPES, assert_within_pytorch_error

H = 16
TOKENS = 6


def _inputs(vocab, dtype, tokens=TOKENS, hidden_size=H, scale=1.0, bias=True, ignored=(1,), seed=0,
            device="cpu"):
    """float64 leaves (hidden, weight, bias) and a target with `ignored` positions at -100."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, tokens // 2, hidden_size, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.5 if bias else None
    target = torch.randint(0, vocab, (2, tokens // 2), generator=g)
    for i in ignored:
        target.view(-1)[i] = -100
    # the test's dtype first, so that all three runs see the same rounded values
    leaves = [t if t is None else t.to(dtype).double().to(device) for t in (hidden, weight, b)]
    return leaves, target.to(device)


def _run(fn, leaves, dtype, target, grad_out=None, **kwargs):
    """fn's loss and the gradients of its tensor inputs, all computed in `dtype`."""
    xs = [None if t is None else t.to(dtype, copy=True).requires_grad_() for t in leaves]
    hidden, weight, bias = xs
    loss = fn(hidden, weight, target, bias=bias, **kwargs)
    if grad_out is None:
        grad_out = torch.ones_like(loss)
    loss.backward(grad_out.to(loss.dtype))
    return loss.detach(), [None if x is None else x.grad for x in xs]


def _compare(leaves, target, dtype, grad_out=None, **kwargs):
    ours = _run(linear_cross_entropy, leaves, dtype, target, grad_out, **kwargs)
    stock = _run(reference, leaves, dtype, target, grad_out, **{k: v for k, v in kwargs.items()
                                                                 if k != "chunk_bytes"})
    exact = _run(reference, leaves, torch.float64, target, grad_out, **{k: v for k, v in kwargs.items()
                                                                        if k != "chunk_bytes"})
    for name, a, s, e in zip(("loss", "grad hidden", "grad weight", "grad bias"), [ours[0]] + ours[1],
                             [stock[0]] + stock[1], [exact[0]] + exact[1]):
        if e is None:
            continue
        assert torch.isfinite(a).all(), name
        atol = None
        if dtype == torch.float32 and "chunk_bytes" in kwargs:
            # a GEMM of a 2-token chunk sums in another order than one of all tokens (CPU BLAS
            # picks its kernel by shape), which moves fp32 results by a few ulp of the largest
            # value: as much as the stock path's own error, so the 2x rule alone would test noise
            atol = 8 * torch.finfo(dtype).eps * float(e.abs().max())
        assert_within_pytorch_error(a, s, e, name, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [50257, 30522, 1000])
def test_matches_float64_reference(vocab, dtype):
    leaves, target = _inputs(vocab, dtype)
    _compare(leaves, target, dtype)


# fp16 runs in test_matches_float64_reference; here the two accumulation regimes (fp32 sums of
# fp32 weight gradients, fp32 sums of bf16 chunk products) suffice
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.2, 1e-2)])
def test_reductions_smoothing_z_loss_and_chunks(reduction, label_smoothing, z_loss, dtype):
    """Several chunks (2 tokens each), so the statistics and the fp32 weight-gradient sums cross
    chunk borders; for "none" a random incoming gradient (a loss mask's product)."""
    leaves, target = _inputs(1000, dtype, ignored=(1, 4))
    grad_out = torch.randn(target.shape, dtype=torch.float64) if reduction == "none" else None
    _compare(leaves, target, dtype, grad_out, reduction=reduction, label_smoothing=label_smoothing,
             z_loss=z_loss, chunk_bytes=2 * 1000 * torch.finfo(dtype).bits // 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits_do_not_overflow(dtype):
    """|logit| ~ 1e4: the fp32 statistics subtract the row max before exp."""
    leaves, target = _inputs(1000, dtype, scale=1e4 / 8, bias=False)
    logits = leaves[0] @ leaves[1].t()
    assert logits.abs().max() > 5e3
    _compare(leaves, target, dtype)


def test_reference_is_f_cross_entropy_without_smoothing():
    (hidden, weight, bias), target = _inputs(1000, torch.float64)
    expected = F.cross_entropy(F.linear(hidden, weight, bias).flatten(0, 1), target.flatten(), reduction="none")
    got = reference(hidden, weight, target, bias=bias, reduction="none").flatten()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_gradients(reduction):
    """With no counted token "mean" is 0 (F.cross_entropy says NaN), "sum" is 0, "none" is zeros;
    every gradient is 0, also when the incoming gradient of ignored tokens is NaN."""
    leaves, target = _inputs(1000, torch.float32, ignored=range(TOKENS))
    grad_out = torch.full(target.shape, float("nan")) if reduction == "none" else None
    loss, grads = _run(linear_cross_entropy, leaves, torch.float32, target, grad_out, reduction=reduction)
    assert (loss == 0).all()
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("make,argument,error", [
    (lambda h, w, t: (h, w, t.masked_fill(t == 3, 1000)), "target", ValueError),
    (lambda h, w, t: (h, w, t.masked_fill(t == 3, -1)), "target", ValueError),
    (lambda h, w, t: (h, w[:, :-1], t), "weight", ValueError),
    (lambda h, w, t: (h, w.double(), t), "weight", TypeError),
    (lambda h, w, t: (h, w, t.float()), "target", TypeError),
    (lambda h, w, t: (h, w, t[:, :1]), "target", ValueError),
], ids=["target-too-large", "target-negative", "h-mismatch", "dtype-mismatch", "float-target", "target-shape"])
def test_bad_input_names_the_argument(make, argument, error):
    hidden = torch.randn(2, 3, H)
    weight = torch.randn(1000, H)
    target = torch.tensor([[3, 5, -100], [7, 8, 9]])
    h, w, t = make(hidden, weight, target)
    with pytest.raises(error, match=argument):
        linear_cross_entropy(h, w, t)


def test_bad_settings_name_the_setting():
    hidden, weight, target = torch.randn(4, H), torch.randn(100, H), torch.zeros(4, dtype=torch.long)
    for kwargs, name in [({"reduction": "avg"}, "reduction"), ({"label_smoothing": 1.0}, "label_smoothing"),
                         ({"z_loss": -1.0}, "z_loss"), ({"bias": torch.randn(99)}, "bias")]:
        with pytest.raises((ValueError, TypeError), match=name):
            linear_cross_entropy(hidden, weight, target, **kwargs)


def test_keeps_lse_and_target_only():
    """The ledger counts, besides hidden (the final norm's output in a model) and the caller's
    target, LSE_BYTES per token; the stock path keeps V fp32 floats per token more."""
    vocab, tokens = 1000, 64
    weight = torch.nn.Parameter(torch.randn(vocab, H))
    hidden = torch.randn(tokens, H, requires_grad=True)
    target = torch.randint(0, vocab, (tokens,))
    with SavedTensorLedger() as ledger:
        loss = linear_cross_entropy(hidden, weight, target)
    report = ledger.report(loss)
    kept = report.total_bytes
    assert kept == hidden.nbytes + target.nbytes + LSE_BYTES * tokens
    # hidden in the category of the input stock code's Linear keeps, the rest as the loss's
    assert report.by_category() == {"matmul": hidden.nbytes, "loss": target.nbytes + LSE_BYTES * tokens}
    assert (kept - hidden.nbytes) / tokens <= 16
    with SavedTensorLedger() as ledger:
        stock = F.cross_entropy(F.linear(hidden, weight).float(), target)
    assert ledger.report(stock).total_bytes >= 4 * vocab * tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cpu_kernel_matches_its_pytorch_twin(dtype, poison):
    kernels = _backend.ops("loss", "cpu")
    assert _backend.is_compiled(kernels)
    logits = (torch.randn(5, 1003) * 4).to(dtype)
    target = torch.tensor([0, 1002, -1, 17, 500])
    stats = kernels.cross_entropy_fwd(logits, target)
    expected = ref_loss.cross_entropy_fwd(logits, target)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype != torch.float64 else {}
    torch.testing.assert_close(stats, expected, **tol)
    lse = expected[0] + torch.log(expected[1])
    g = torch.tensor([1.0, 0.5, 0.0, -2.0, 1.0], dtype=lse.dtype)
    got = kernels.cross_entropy_bwd(logits.clone(), lse, g, target, 0.1, 1e-3, 1 / 1003)
    want = ref_loss.cross_entropy_bwd(logits.clone(), lse, g, target, 0.1, 1e-3, 1 / 1003)
    torch.testing.assert_close(got, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [50257, 50304])
def test_cuda_matches_float64_reference(vocab, dtype, poison):
    """The CUDA kernels, unaligned (50,257) and vectorised (50,304) rows, over several chunks."""
    leaves, target = _inputs(vocab, dtype, tokens=64, hidden_size=64, device="cuda")
    _compare(leaves, target, dtype, chunk_bytes=16 * vocab * 2, label_smoothing=0.1, z_loss=1e-4)


def _tp_worker(rank, world_size):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    group = dist.group.WORLD
    vocab = 256
    (hidden, weight, bias), target = _inputs(vocab, torch.float32, tokens=8, ignored=(2,))
    hidden, weight, bias = (t.float() for t in (hidden, weight, bias))
    shard = slice(rank * vocab // 2, (rank + 1) * vocab // 2)
    grad_out = torch.randn(target.shape, generator=torch.Generator().manual_seed(7))
    for kwargs in ({}, {"label_smoothing": 0.1, "z_loss": 1e-3}):
        runs = {}
        for tp, (w, b, g) in {1: (weight, bias, None), 2: (weight[shard], bias[shard], group)}.items():
            xs = [t.clone().requires_grad_() for t in (hidden, w, b)]
            loss = linear_cross_entropy(xs[0], xs[1], target, bias=xs[2], reduction="none", tp_group=g,
                                        **kwargs)
            loss.backward(grad_out)
            runs[tp] = (loss.detach(), xs[0].grad, xs[1].grad, xs[2].grad)
        (l1, gh1, gw1, gb1), (l2, gh2, gw2, gb2) = runs[1], runs[2]
        where = f"rank {rank} {kwargs}"
        torch.testing.assert_close(l2, l1, msg=lambda m: f"{where} loss: {m}")
        torch.testing.assert_close(gh2, gh1, msg=lambda m: f"{where} grad hidden: {m}")
        torch.testing.assert_close(gw2, gw1[shard], msg=lambda m: f"{where} grad weight: {m}")
        torch.testing.assert_close(gb2, gb1[shard], msg=lambda m: f"{where} grad bias: {m}")
    # Megatron's vocab-parallel cross-entropy on the materialised shard logits gives the same loss
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        counted = target.clamp(min=0)
        logits = F.linear(hidden, weight[shard], bias[shard])
        megatron = vocab_parallel_cross_entropy(logits, counted)
        ours = linear_cross_entropy(hidden, weight[shard], counted, bias=bias[shard], reduction="none",
                                    tp_group=parallel_state.get_tensor_model_parallel_group())
        torch.testing.assert_close(ours, megatron, msg=lambda m: f"rank {rank} vs Megatron: {m}")
    finally:
        parallel_state.destroy_model_parallel()


def test_tensor_parallel_matches_single_rank():
    pytest.importorskip("megatron.core")
    mu.spawn(_tp_worker, 2)


def test_bench_rows_judge_time_peak_and_kept_bytes():
    """bench ops' loss rows: the targets of docs/results/targets.json read the row's quantities,
    kept bytes per token without hidden; the torch case runs on CPU with the bytes exact."""
    from tempo_ds.bench import ops, ops_loss
    case = next(c for c in ops_loss.cases(ops.Case) if c.name == ops_loss.VS_TORCH)
    inputs = case.make(torch.device("cpu"), torch.bfloat16, "tiny")
    row = {"op": case.name, "shape": [list(t.shape) for t in inputs],
           "ours": ops.measure(case.ours, inputs, torch.device("cpu"), 1),
           "stock": ops.measure(case.stock, inputs, torch.device("cpu"), 1)}
    assert ops_loss.kept_bytes_per_token(row, "torch.bfloat16") == 8 + LSE_BYTES
    assert ops_loss.kept_bytes_per_token(row, "torch.bfloat16", "stock") >= 4 * inputs[1].shape[0]
    row["ours"]["peak_bytes"], row["stock"]["peak_bytes"] = 5, 100
    verdicts = {what: met for what, _, _, met in ops_loss.verdicts({case.name: row}, ops._time_verdicts,
                                                                    "torch.bfloat16")}
    assert verdicts[f"{case.name}: peak memory / stock"] is True
    assert f"{case.name}: fwd+bwd time / stock" in verdicts
    targets = [t["case"] for t in ops_loss.load_targets()]
    assert set(targets) == {ops_loss.VS_TORCH, ops_loss.VS_MEGATRON}
