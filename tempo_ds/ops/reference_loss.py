"""PyTorch twins of the "loss" op family's kernels (csrc/loss/) and the materialising reference
of the linear cross-entropy that the tests compare against in float64.

cross_entropy_fwd / cross_entropy_bwd have the compiled functions' arguments and results, so
tempo_ds.ops._backend can hand them out when the kernels cannot be built (TEMPO_DS_OPS=auto) or
when asked to (TEMPO_DS_OPS=torch).
"""
import torch


def _stats_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def cross_entropy_fwd(logits, target):
    """logits: [rows, V] chunk of the local vocab shard; target: int64 [rows], the target's
    column here or -1. Returns [4, rows] (fp32; fp64 for fp64 logits): max, sum of exp(z - max),
    sum of z, and the target's logit (0 where it is not in this shard)."""
    z = logits.to(_stats_dtype(logits))
    row_max = z.amax(dim=-1)
    sum_exp = torch.exp(z - row_max[:, None]).sum(dim=-1)
    here = target >= 0
    picked = z.gather(1, target.clamp(min=0)[:, None]).squeeze(1)
    target_logit = torch.where(here, picked, torch.zeros_like(picked))
    return torch.stack([row_max, sum_exp, z.sum(dim=-1), target_logit])


def cross_entropy_bwd(logits, lse, g, target, eps, z_loss, inv_vocab):
    """Writes into `logits` (and returns it) the gradient of the per-row losses:
    g (1 + 2 z_loss lse) softmax - g (1 - eps) onehot(target) - g eps inv_vocab."""
    z = logits.to(lse.dtype)
    grad = (g * (1 + 2 * z_loss * lse))[:, None] * torch.exp(z - lse[:, None]) - (g * eps * inv_vocab)[:, None]
    here = target >= 0
    rows = torch.nonzero(here).squeeze(1)
    grad[rows, target[rows]] -= (g * (1 - eps))[rows]
    logits.copy_(grad)
    return logits


def megatron_smoothing(label_smoothing, vocab):
    """Megatron's vocab-parallel label smoothing as a weight on the mean logit:
    label_smoothing V / (V - 1) (megatron/core/tensor_parallel/cross_entropy.py)."""
    return label_smoothing * vocab / (vocab - 1) if label_smoothing > 0 else 0.0


def linear_cross_entropy_reference(hidden, weight, target, *, bias=None, ignore_index=-100,
                                   label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    """The loss as stock code computes it: logits = F.linear in the inputs' dtype, then an fp32
    (fp64 for fp64 inputs) cross-entropy with Megatron's label smoothing and z_loss lse^2.
    Materialises [tokens, V]; the tests' float64 reference and the "stock path" of the 2x rule.
    "mean" of no counted token is 0, as in tempo_ds.ops.linear_cross_entropy."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    z = logits.to(_stats_dtype(logits)).reshape(-1, logits.shape[-1])
    t = target.reshape(-1)
    valid = t != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    z_t = z.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1)
    eps = megatron_smoothing(label_smoothing, z.shape[-1])
    loss = lse - (1 - eps) * z_t - eps * z.mean(dim=-1) + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)
