"""Plain-PyTorch versions of every kernel, with the kernels' exact signatures.

They serve twice: as the fallback when no compiler is available (same saving contract, slower),
and as the readable statement of what each kernel computes. Float64 references for tests are
the stock PyTorch ops applied in float64.
"""
import math
from types import SimpleNamespace

import torch

# -- GELU --------------------------------------------------------------------------------------
# Constants of tempo/gelu.h: argmin, minimum and curvature at the minimum of each form.
GELU_FORMS = {
    False: SimpleNamespace(x_star=-0.75179152469356436, y_min=-0.16997120747990369,
                           curvature=0.43149399232833563),
    True: SimpleNamespace(x_star=-0.75246142207101630, y_min=-0.17004075057125403,
                          curvature=0.43040009102485854),
}
# Newton steps by compute dtype, as gelu_newton_steps<T>() in tempo/gelu.h
GELU_NEWTON_STEPS = {torch.float32: 3, torch.float64: 5}
GELU_TAIL_THRESHOLD = -0.05
GELU_NEAR_MINIMUM = 1e-3
_K = math.sqrt(2.0 / math.pi)


def gelu_value(x, tanh_form):
    if tanh_form:
        return x * torch.sigmoid(2 * _K * (x + 0.044715 * x ** 3))
    return x * 0.5 * torch.erfc(-x * (1 / math.sqrt(2)))


def gelu_derivative(x, tanh_form):
    if tanh_form:
        s = torch.sigmoid(2 * _K * (x + 0.044715 * x ** 3))
        return s + x * s * (1 - s) * 2 * _K * (1 + 3 * 0.044715 * x * x)
    return 0.5 * torch.erfc(-x * (1 / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _gelu_tail_start(log_neg_y, tanh_form):
    if tanh_form:
        cube = log_neg_y / (2 * _K * 0.044715)
        return -torch.exp(torch.log(-torch.clamp(cube, max=-1e-30)) / 3)
    return -torch.sqrt(torch.clamp(-2 * log_neg_y - math.log(2 * math.pi), min=0))


def gelu_derivative_from_output(y, left, tanh_form, steps=None):
    """GELU'(x) for the x with GELU(x) = y, left of the minimum where `left` is set.

    Vectorised form of tempo::gelu_derivative_from_output (csrc/includes/tempo/gelu.h); run in
    float64 with many steps it is the exact output-based derivative that tests compare with.
    """
    steps = GELU_NEWTON_STEPS[y.dtype] if steps is None else steps
    form = GELU_FORMS[tanh_form]
    target = torch.sqrt(torch.clamp(y - form.y_min, min=0))
    spread = 1.0 / math.sqrt(0.5 * form.curvature)
    x = torch.where(left, form.x_star - spread * target, torch.maximum(form.x_star + spread * target, y))
    tail = left & (y > GELU_TAIL_THRESHOLD)
    underflow = tail & ~(y < 0)
    log_neg_y = torch.log(-torch.clamp(y, max=-torch.finfo(y.dtype).tiny))
    x = torch.where(tail, torch.minimum(x, _gelu_tail_start(log_neg_y, tanh_form)), x)
    for _ in range(steps):
        g = gelu_value(x, tanh_form)
        d = gelu_derivative(x, tanh_form)
        r = torch.sqrt(torch.clamp(g - form.y_min, min=0))
        slope = torch.where((x - form.x_star).abs() < GELU_NEAR_MINIMUM,
                            torch.where(left, -spread, spread), 2 * r / d)
        step = torch.where(tail, (torch.log(-g) - log_neg_y) * g / d, (r - target) * slope)
        step = torch.where(torch.isfinite(step) & ~(tail & ~(g < 0)), step, torch.zeros_like(step))
        x = x - step
        x = torch.where(left, torch.clamp(x, max=form.x_star), torch.clamp(x, min=form.x_star))
    d = gelu_derivative(x, tanh_form)
    d = torch.where(underflow, torch.zeros_like(d), d)
    # a non-finite output gives the derivative of itself (NaN/Inf propagate as in the kernel)
    return torch.where(torch.isfinite(y), d, gelu_derivative(y, tanh_form))


def pack_bits(mask):
    """bool [n] -> uint8 [ceil(n/8)], element 8*i+k in bit k of byte i (the kernels' layout)."""
    n = mask.numel()
    padded = torch.zeros(((n + 7) // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = mask.reshape(-1).to(torch.uint8)
    weights = (1 << torch.arange(8, device=mask.device, dtype=torch.int32)).to(torch.uint8)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(bits, n):
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits.unsqueeze(-1) >> shifts) & 1).view(-1)[:n].bool()


def compute_dtype(dtype):
    """The dtype the GELU and dropout references compute in for tensors of `dtype`: float64 for
    float32 and float64, float32 for float16 and bfloat16."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def gelu_fwd(x, tanh_form):
    return gelu_fwd_of_sum(x.to(compute_dtype(x.dtype)), x.dtype, tanh_form)


def bias_gelu_fwd(x, bias, tanh_form):
    """gelu_fwd of x + bias (bias [x.shape[-1]]), the sum taken in the compute dtype: what the
    fused kernel computes. Its backward is gelu_bwd / gelu_bwd_table."""
    acc = compute_dtype(x.dtype)
    return gelu_fwd_of_sum(x.to(acc) + bias.to(acc), x.dtype, tanh_form)


def gelu_fwd_of_sum(v, dtype, tanh_form):
    """(GELU(v) rounded to dtype, branch bits) of v already in the compute dtype."""
    return [gelu_value(v, tanh_form).to(dtype), pack_bits(v < GELU_FORMS[tanh_form].x_star)]


def gelu_bwd(dy, y, bits, tanh_form):
    acc = compute_dtype(y.dtype)
    left = unpack_bits(bits, y.numel()).view(y.shape)
    d = gelu_derivative_from_output(y.to(acc), left, tanh_form)
    return (dy.to(acc) * d).to(y.dtype)


def gelu_bwd_table(dy, y, bits, table):
    """gelu_bwd for fp16/bf16 y, reading GELU'(x) from table[bit, the 16 bits of y]."""
    if y.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"gelu_bwd_table: y must be float16 or bfloat16, got {y.dtype}")
    column = y.view(torch.int16).to(torch.int32) & 0xFFFF
    left = unpack_bits(bits, y.numel()).view(y.shape).to(torch.int32)
    d = table.view(-1)[(left << 16) | column]
    return (dy.float() * d).to(y.dtype)


# -- LayerNorm / RMSNorm ---------------------------------------------------------------------
# The recoverability rule and the clamp of tempo/norm.h (tempo_ds.ops.norm applies them).
# kNormRecoverMargin and kNormClampMargin of csrc/includes/tempo/norm.h.
RECOVER_MARGIN = 16.0
CLAMP_MARGIN = 1.0


def recover_bound(dtype, margin=RECOVER_MARGIN):
    """R of the recoverability rule for an output of `dtype`: 1 / (16 * eps(dtype)); with
    margin=CLAMP_MARGIN, the bound under which the backward clamps gamma: 1 / eps(dtype)."""
    return 1.0 / (margin * torch.finfo(dtype).eps)


def recover_floor(dtype):
    """The floor under |beta_j| in the recoverability rule: the smallest normal number of `dtype`.

    Subnormal outputs are spaced tiny * eps apart whatever their size, so with beta_j = 0 a
    gamma_j below tiny / R gives y_j values whose rounding costs x_hat_j more than the rule's
    1/16 (fp16: |gamma_j| <= 9.5e-7; bf16 and fp32 only for subnormal gamma_j).
    """
    return torch.finfo(dtype).tiny


def norm_acc_params(weight, bias):
    """gamma (1 where absent) and beta (or None) as the kernels read them: fp32, fp64 for fp64."""
    ref = weight if weight is not None else bias
    acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
    gamma = weight.detach().to(acc) if weight is not None else torch.ones_like(bias, dtype=acc)
    beta = bias.detach().to(acc) if bias is not None else None
    return gamma, beta


def _limit(beta, dtype):
    """max(|beta_j|, tiny): a tensor with NaN kept (clamp propagates it, so NaN is never flagged),
    or the float tiny without beta."""
    floor = recover_floor(dtype)
    return floor if beta is None else beta.abs().clamp(min=floor)


def unrecoverable_features(weight, bias, dtype):
    """Bool mask [N] of the features whose x_hat cannot be recovered from an output of `dtype`.

    weight or bias may be None (gamma = 1, beta = 0). NaN parameters count as recoverable, so
    that NaN reaches the gradients. Runs on the parameters' device without synchronising.
    """
    gamma, beta = norm_acc_params(weight, bias)
    # gamma == 0 is caught here too (0 <= floor); NaN compares False. R is a power of two, so
    # the product is exact and the kernels' test (norm_recover_gamma) gives the same mask.
    return gamma.abs() * recover_bound(dtype) <= _limit(beta, dtype)


def recovery_gamma(weight, bias, dtype, clamp=True):
    """The gamma the backward recovers x_hat with, from an output of `dtype` (fp32 or fp64 [N]).

    gamma itself, or, where |gamma| <= c = eps(dtype) * max(|beta|, tiny) and clamp is set, c
    with gamma's sign (+ for zero): the statement of norm_recover_gamma in
    csrc/includes/tempo/norm.h, used by the PyTorch fallback kernels.
    """
    gamma, beta = norm_acc_params(weight, bias)
    if not clamp:
        return gamma
    limit = torch.as_tensor(_limit(beta, dtype), dtype=gamma.dtype, device=gamma.device)
    bound = recover_bound(dtype, CLAMP_MARGIN)
    clamped = torch.where(gamma < 0, -limit / bound, limit / bound)
    return torch.where(gamma.abs() * bound <= limit, clamped, gamma)


# Statements of tempo/norm.h: the forward keeps y and rstd; the backward recovers
# x_hat = (y - beta) / gamma, gamma clamped by magnitude where it holds almost nothing of x_hat
# if clamp_gamma (recovery_gamma below). Inputs are [..., N], read as M rows;
# weight / bias are [N] or None; rstd is [M]. Outputs have the inputs' shape.

def _norm_acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _norm_fwd(x, weight, bias, eps, centred):
    acc = _norm_acc(x.dtype)
    xa = x.to(acc)
    centre = xa.mean(-1, keepdim=True) if centred else torch.zeros((), dtype=acc, device=x.device)
    rstd = 1 / torch.sqrt((xa - centre).square().mean(-1, keepdim=True) + eps)
    y = (xa - centre) * rstd
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return [y.to(x.dtype), rstd.view(-1)]


def _norm_bwd(dy, y, rstd, weight, bias, centred, clamp_gamma):
    acc = _norm_acc(y.dtype)
    dya = dy.to(acc)
    xhat = y.to(acc)
    g = dya
    if bias is not None:
        xhat = xhat - bias.to(acc)
    if weight is not None:
        g = dya * weight.to(acc)
    if weight is not None or bias is not None:
        xhat = xhat / recovery_gamma(weight, bias, y.dtype, clamp_gamma)
    mean_g = g.mean(-1, keepdim=True) if centred else 0
    dx = rstd.view(*y.shape[:-1], 1) * (g - mean_g - xhat * (g * xhat).mean(-1, keepdim=True))
    features = y.shape[-1]
    dweight = None if weight is None else (dya * xhat).reshape(-1, features).sum(0).to(weight.dtype)
    dbias = None if bias is None else dya.reshape(-1, features).sum(0).to(bias.dtype)
    return [dx.to(y.dtype), dweight, dbias]


def layer_norm_fwd(x, weight, bias, eps):
    return _norm_fwd(x, weight, bias, eps, centred=True)


def layer_norm_bwd(dy, y, rstd, weight, bias, clamp_gamma):
    return _norm_bwd(dy, y, rstd, weight, bias, True, clamp_gamma)


def rms_norm_fwd(x, weight, eps):
    return _norm_fwd(x, weight, None, eps, centred=False)


def rms_norm_bwd(dy, y, rstd, weight, clamp_gamma):
    return _norm_bwd(dy, y, rstd, weight, None, False, clamp_gamma)[:2]

