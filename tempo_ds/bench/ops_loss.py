"""Loss-head cases of the ops benchmark (`python -m tempo_ds.bench ops --only loss`).

tempo_ds.ops.linear_cross_entropy (mean over tokens) at the GPT-2 345M head shape (h 1024,
V 50,304, 8 x 1024 tokens on GPU) against
  - F.linear, then F.cross_entropy on the fp32 logits, and
  - F.linear, then Megatron's vocab_parallel_cross_entropy (at TP=1), what GPTModel runs.
Every row has the time of fwd, bwd and both, the peak memory of a full step (GPU) and the bytes
kept for backward (the ledger, exact on CPU too); hidden is kept by every variant (in a model the
final norm keeps it already), so the kept bytes per token that the target judges leave it out.

The targets (GPU) are data in docs/results/targets.json, "ops_loss": per case, a bound on
ours / stock of a quantity (full_s: fwd+bwd time; peak_bytes), or on ours alone
(kept_bytes_per_token). CPU runs print the rows without verdicts.
"""
import json
import os

import torch
import torch.nn.functional as F

from .train_report import TARGETS_PATH

VS_TORCH = "linear_cross_entropy vs F.linear+F.cross_entropy"
VS_MEGATRON = "linear_cross_entropy vs megatron"
# (tokens, hidden, vocab) per benchmark size; "large" is GPT-2 345M's head at 8 x 1024 tokens
SHAPES = {"large": (8 * 1024, 1024, 50304), "small": (256, 256, 50304), "tiny": (16, 32, 1000)}


def _make(device, dtype, size):
    tokens, hidden_size, vocab = SHAPES[size]
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) * hidden_size ** -0.5).to(device, dtype)
    target = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    # a Parameter, as in a model: the ledger leaves parameters out of the kept bytes
    return hidden, torch.nn.Parameter(weight), target


def _make_megatron(device, dtype, size):
    # Megatron's cross-entropy reads the tensor-parallel group: a one-process one for this run
    from megatron.core import parallel_state

    from .. import workload
    if not parallel_state.model_parallel_is_initialized():
        workload.hold(workload.distributed())
    return _make(device, dtype, size)


def cases(Case):
    """The two cases, built with the ops benchmark's Case. Raises ImportError without megatron-core
    (the ops benchmark then reports the group skipped)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from ..ops import linear_cross_entropy

    def ours(hidden, weight, target):
        return linear_cross_entropy(hidden, weight, target)

    def stock_torch(hidden, weight, target):
        return F.cross_entropy(F.linear(hidden, weight).float(), target)

    def stock_megatron(hidden, weight, target):
        return vocab_parallel_cross_entropy(F.linear(hidden, weight)[:, None], target[:, None]).mean()

    return [Case(VS_TORCH, _make, ours, stock_torch, None, None),
            Case(VS_MEGATRON, _make_megatron, ours, stock_megatron, None, None)]


def kept_bytes_per_token(row, dtype, side="ours"):
    """Bytes kept for backward per token besides hidden (row["shape"]: hidden, weight, target);
    dtype: the report's ("torch.bfloat16", ...)."""
    (tokens, hidden_size), _, _ = row["shape"]
    element = getattr(torch, dtype.replace("torch.", "")).itemsize
    return (row[side]["saved_bytes"] - tokens * hidden_size * element) / tokens


def load_targets(path=TARGETS_PATH):
    """The "ops_loss" rows of targets.json ([] when the file or the section is not there)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f).get("ops_loss", [])


def verdicts(rows, time_verdicts, dtype, targets=None):
    """[(what, measured, target, met)] of the loss-head targets on the report rows present
    ({op: row}) of a report in `dtype`; time_verdicts(op, row, bound) is the ops benchmark's judge
    of a time ratio."""
    out = []
    for target in load_targets() if targets is None else targets:
        row = rows.get(target["case"])
        if row is None:
            continue
        quantity, bound = target["quantity"], target["bound"]
        if quantity == "full_s":
            out += time_verdicts(target["case"], row, bound)
        elif quantity == "peak_bytes":
            ours, stock = row["ours"]["peak_bytes"], row["stock"]["peak_bytes"]
            if ours is not None and stock:
                out.append((f"{target['case']}: peak memory / stock", ours / stock, f"<= {bound}",
                            ours / stock <= bound))
        elif quantity == "kept_bytes_per_token":
            kept = kept_bytes_per_token(row, dtype)
            out.append((f"{target['case']}: kept bytes per token", kept, f"<= {bound}", kept <= bound))
        else:
            raise ValueError(f"targets.json ops_loss row {target}: unknown quantity {quantity!r}")
    return out
