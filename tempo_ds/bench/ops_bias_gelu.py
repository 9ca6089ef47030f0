"""Fused bias-GELU cases of the ops benchmark (`python -m tempo_ds.bench ops --only bias_gelu`).

tempo_ds.ops.bias_gelu in the tanh form (what Megatron's bias_activation_fusion computes) against
  - Megatron's fused bias_gelu_impl (megatron.core.fusions.fused_bias_gelu, torch.compile'd), which
    keeps x and the bias for backward, and
  - bias-add then F.gelu(approximate="tanh"), which writes and reads x + b once more.
Bytes our forward moves: read x, write y and a bit per element; backward: read dy, y and the bits,
write dx, read dx again for the bias gradient's column sum.

On CPU Megatron's function runs eagerly (its torch.compile would take minutes to compile there).
The targets (GPU only) are data in docs/results/targets.json, "ops": for each case, the fwd+bwd
time ours / stock at most its bound. CPU runs print the rows without verdicts.
"""
import json
import os

import torch
import torch.nn.functional as F

from .train_report import TARGETS_PATH

VS_MEGATRON = "bias_gelu vs megatron"
VS_UNFUSED = "bias_gelu vs add+gelu"


def cases(Case, rows, nbytes):
    """The two cases, built with the ops benchmark's Case, _rows and _nbytes. Raises ImportError
    without megatron-core (the ops benchmark then reports the group skipped)."""
    from megatron.core.fusions.fused_bias_gelu import bias_gelu_impl

    from .. import ops

    def make(device, dtype, size):
        if torch.device(device).type == "cpu":
            # Megatron's bias_gelu_impl is torch.compile'd, and its first CPU compile takes minutes
            # (279 s on a 2-core machine under load, 2026-12-02): on CPU, for the rest of this
            # one-shot process, it runs eagerly, op by op.
            from .. import workload
            workload.hold(torch.compiler.set_stance("force_eager"))
        m, n = rows(size)
        x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
        bias = (0.1 * torch.randn(n, device=device, dtype=dtype)).requires_grad_()
        return x, bias

    def ours(x, bias):
        return ops.bias_gelu(x, bias, "tanh")

    def fwd_bytes(x, bias):
        return 2 * nbytes(x) + x.numel() // 8

    def bwd_bytes(x, bias):
        return 4 * nbytes(x) + x.numel() // 8

    return [
        Case(VS_MEGATRON, make, ours, bias_gelu_impl, fwd_bytes, bwd_bytes),
        Case(VS_UNFUSED, make, ours, lambda x, bias: F.gelu(x + bias, approximate="tanh"), fwd_bytes, bwd_bytes),
    ]


def load_targets(path=TARGETS_PATH):
    """{case name: bound on fwd+bwd time ours / stock} from the "ops" rows of targets.json; {} when
    the file (an installed package has no docs/) or the section is not there."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = json.load(f).get("ops", [])
    out = {}
    for row in rows:
        if row["quantity"] != "full_s" or row["op"] != "<=":
            raise ValueError(f"targets.json ops row {row}: only 'full_s' with '<=' is judged")
        out[row["case"]] = row["bound"]
    return out


def verdicts(rows, time_verdicts, targets=None):
    """The verdicts of the bias-GELU targets on the report rows present ({op: row});
    time_verdicts(op, row, bound) is the ops benchmark's judge of a time ratio."""
    targets = load_targets() if targets is None else targets
    out = []
    for case, bound in targets.items():
        if case in rows:
            out += time_verdicts(case, rows[case], bound)
    return out
