"""`python -m tempo_ds.bench ops`: each Tempo op against its stock PyTorch/Megatron twin.

For every case it measures forward, backward and full (forward + backward) time, the achieved
bandwidth on GPU (bytes the op must move / time), the peak memory of a full step on GPU, and
the bytes kept for backward (the ledger). It prints a table headed by the machine and writes
JSON. Times on CPU are only meaningful as ratios within one run.
"""
import json
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..memory import SavedTensorLedger
from .machine import header, machine_info, synchronize


@dataclass
class Case:
    name: str
    make: Callable      # (device, dtype, size) -> tuple of inputs (requires_grad set)
    ours: Callable      # (*inputs) -> output
    stock: Callable     # (*inputs) -> output
    fwd_bytes: Callable  # (*inputs) -> bytes our forward must move
    bwd_bytes: Callable  # (*inputs) -> bytes our backward must move


def _nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _rows(size):
    return {"small": (8 * 1024, 1024), "large": (64 * 1024, 4096)}[size]


def _gelu_cases():
    from .. import ops

    def make(device, dtype, size):
        m, n = _rows(size)
        return (torch.randn(m, n, device=device, dtype=dtype, requires_grad=True),)

    cases = []
    for approximate in ("none", "tanh"):
        cases.append(Case(
            f"gelu[{approximate}]", make,
            lambda x, a=approximate: ops.gelu(x, a),
            lambda x, a=approximate: F.gelu(x, approximate=a),
            lambda x: 2 * _nbytes(x) + x.numel() // 8,
            lambda x: 3 * _nbytes(x) + x.numel() // 8))
    # The backward without the derivative table (what fp32 storage always runs): the cost of the
    # Newton inversion, for the record. The table itself (512 KiB) is read through the cache.
    cases.append(Case(
        "gelu[tanh,newton]", make,
        lambda x: ops.GeluFunction.apply(x, True, False),
        lambda x: F.gelu(x, approximate="tanh"),
        lambda x: 2 * _nbytes(x) + x.numel() // 8,
        lambda x: 3 * _nbytes(x) + x.numel() // 8))
    return cases


def _norm_cases():
    from .. import ops

    def make(device, dtype, size):
        m, n = _rows(size)
        x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
        w = (1 + 0.1 * torch.randn(n, device=device, dtype=dtype)).requires_grad_()
        b = (0.1 * torch.randn(n, device=device, dtype=dtype)).requires_grad_()
        return x, w, b

    return [
        Case("layer_norm", make,
             lambda x, w, b: ops.layer_norm(x, w, b, 1e-5),
             lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-5),
             lambda x, w, b: 2 * _nbytes(x) + x.shape[0] * 4,
             lambda x, w, b: 3 * _nbytes(x) + x.shape[0] * 4),
        Case("rms_norm", make,
             lambda x, w, b: ops.rms_norm(x, w, 1e-5),
             lambda x, w, b: F.rms_norm(x, x.shape[-1:], w, 1e-5),
             lambda x, w, b: 2 * _nbytes(x) + x.shape[0] * 4,
             lambda x, w, b: 3 * _nbytes(x) + x.shape[0] * 4),
    ]


def _dropout_cases():
    from .. import ops

    def make(device, dtype, size):
        m, n = _rows(size)
        x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
        bias = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
        res = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
        return x, bias, res

    return [
        Case("dropout[p=0.1]", make,
             lambda x, b, r: ops.dropout(x, 0.1, True),
             lambda x, b, r: F.dropout(x, 0.1, True),
             lambda x, b, r: 2 * _nbytes(x), lambda x, b, r: 2 * _nbytes(x)),
        Case("bias_dropout_add[p=0.1]", make,
             lambda x, b, r: ops.bias_dropout_add(x, b, r, 0.1, True),
             lambda x, b, r: r + F.dropout(x + b, 0.1, True),
             lambda x, b, r: 3 * _nbytes(x), lambda x, b, r: 3 * _nbytes(x)),
    ]


def _attention_cases():
    from ..megatron.core_attention import TempoCoreAttention  # noqa: F401 (availability)
    from . import attention_case
    return attention_case.cases(Case)


CASE_GROUPS = {"gelu": _gelu_cases, "norm": _norm_cases, "dropout": _dropout_cases,
               "attention": _attention_cases}


def _time(fn, device, reps, warmup=2):
    """Median seconds of fn() over reps runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def measure(fn, inputs, device, reps):
    """fwd/bwd/full seconds, peak bytes of a full step (GPU), bytes saved for backward."""
    grad = torch.randn_like(_first(fn(*inputs)))

    def zero():
        for t in inputs:
            t.grad = None

    def fwd():
        return fn(*inputs)

    def full():
        zero()
        _first(fn(*inputs)).backward(grad)

    out = _first(fn(*inputs))
    t_fwd = _time(fwd, device, reps)

    def bwd():
        zero()
        out.backward(grad, retain_graph=True)

    t_bwd = _time(bwd, device, reps)
    del out
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        full()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    t_full = _time(full, device, reps)
    with SavedTensorLedger() as ledger:
        saved_out = _first(fn(*inputs))
    saved = ledger.report(saved_out).total_bytes
    return {"fwd_s": t_fwd, "bwd_s": t_bwd, "full_s": t_full, "peak_bytes": peak, "saved_bytes": saved}


def copy_bandwidth(device, nbytes=1 << 30):
    """GB/s of a large device-to-device copy: the bandwidth the ops are judged against."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), device, 20)
    return 2 * nbytes / t / 1e9


def run(groups=None, device=None, dtype=torch.bfloat16, size=None, reps=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = size or ("large" if device.type == "cuda" else "small")
    reps = reps or (50 if device.type == "cuda" else 5)
    results, skipped = [], {}
    for group in groups or CASE_GROUPS:
        try:
            cases = CASE_GROUPS[group]()
        except ImportError as err:
            skipped[group] = str(err)
            continue
        for case in cases:
            inputs = case.make(device, dtype, size)
            ours = measure(case.ours, inputs, device, reps)
            stock = measure(case.stock, inputs, device, reps)
            row = {"op": case.name, "shape": [list(t.shape) for t in inputs], "ours": ours, "stock": stock}
            if device.type == "cuda":
                row["ours"]["fwd_GBps"] = case.fwd_bytes(*inputs) / ours["fwd_s"] / 1e9
                row["ours"]["bwd_GBps"] = case.bwd_bytes(*inputs) / ours["bwd_s"] / 1e9
            results.append(row)
    return {"machine": machine_info(), "device": device.type, "dtype": str(dtype), "size": size,
            "copy_GBps": copy_bandwidth(device), "results": results, "skipped": skipped}


# Targets on an H100 (bf16), from the core-ops and attention issues: forward + backward time against
# the stock op (at most this ratio), and for the element-wise and row-wise ops the bandwidth each
# pass reaches, against a large device-to-device copy on the same card.
TIME_TARGETS = {"gelu[none]": 1.0, "gelu[tanh]": 1.0, "layer_norm": 1.0, "rms_norm": 1.0,
                "attention[flash] vs unfused": 1.0, "attention[tempo] vs unfused": 1.1}
BANDWIDTH_TARGET = 0.7
BANDWIDTH_OPS = ("gelu[none]", "gelu[tanh]", "layer_norm", "rms_norm")


def check_targets(report):
    """[(what, measured, target, met)] for the GPU targets of this report; [] without a GPU."""
    if report["device"] != "cuda":
        return []
    rows = {r["op"]: r for r in report["results"]}
    out = []
    for op, bound in TIME_TARGETS.items():
        if op in rows:
            ratio = rows[op]["ours"]["full_s"] / rows[op]["stock"]["full_s"]
            out.append((f"{op}: fwd+bwd time / stock", ratio, f"<= {bound}", ratio <= bound))
    copy = report["copy_GBps"]
    for op in BANDWIDTH_OPS:
        if op in rows and copy:
            for phase in ("fwd", "bwd"):
                share = rows[op]["ours"][f"{phase}_GBps"] / copy
                out.append((f"{op}: {phase} GB/s / copy GB/s", share, f">= {BANDWIDTH_TARGET}",
                            share >= BANDWIDTH_TARGET))
    return out


def format_table(report):
    lines = [header(report["machine"]), f"dtype {report['dtype']}, size {report['size']}"]
    if report["copy_GBps"]:
        lines.append(f"device-to-device copy: {report['copy_GBps']:.0f} GB/s")
    cols = f"{'op':<26}{'fwd ms':>9}{'x stock':>9}{'bwd ms':>9}{'x stock':>9}{'full x':>8}" \
           f"{'saved MiB':>11}{'stock MiB':>11}"
    gpu = report["device"] == "cuda"
    if gpu:
        cols += f"{'fwd GB/s':>10}{'bwd GB/s':>10}{'peak MiB':>10}{'stock':>8}"
    lines += [cols, "-" * len(cols)]
    for r in report["results"]:
        o, s = r["ours"], r["stock"]
        line = (f"{r['op']:<26}{o['fwd_s'] * 1e3:>9.3f}{o['fwd_s'] / s['fwd_s']:>9.2f}"
                f"{o['bwd_s'] * 1e3:>9.3f}{o['bwd_s'] / s['bwd_s']:>9.2f}{o['full_s'] / s['full_s']:>8.2f}"
                f"{o['saved_bytes'] / 2**20:>11.2f}{s['saved_bytes'] / 2**20:>11.2f}")
        if gpu:
            line += (f"{o['fwd_GBps']:>10.0f}{o['bwd_GBps']:>10.0f}{o['peak_bytes'] / 2**20:>10.1f}"
                     f"{s['peak_bytes'] / 2**20:>8.1f}")
        lines.append(line)
    lines.append("x stock: our time / stock time (below 1 is faster). saved: bytes kept for backward.")
    targets = check_targets(report)
    if targets:
        lines.append("targets (H100 bf16):")
        lines += [f"  {what:<52}{value:>6.2f} (target {target})  {'met' if met else 'NOT met'}"
                  for what, value, target, met in targets]
    for group, why in report["skipped"].items():
        lines.append(f"skipped {group}: {why}")
    return "\n".join(lines)


def main(args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    report = run(args.only, args.device, dtype, args.size, args.reps)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
        print(f"wrote {args.json}")
    return 0
