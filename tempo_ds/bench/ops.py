"""`python -m tempo_ds.bench ops`: each Tempo op against its stock PyTorch/Megatron twin.

For every case it measures forward, backward and full (forward + backward) time, the achieved
bandwidth on GPU (bytes the op must move / time), the peak memory of a full step on GPU, and
the bytes kept for backward (the ledger). It prints a table headed by the machine and writes
JSON. Times on CPU are only meaningful as ratios within one run.

On GPU every time is taken two ways, each the median of `reps` calls:
- per call (`fwd_s`, `bwd_s`, `full_s`, `fwd_GBps`, `bwd_GBps`): one call between two CUDA events,
  recorded while the GPU is idle. The host's way to the first launch (the autograd.Function, the
  backward engine's hand-off to its device thread, argument checks) counts too: this is the
  latency of one call.
- device time (`fwd_device_s`, `bwd_device_s`, `full_device_s`, `fwd_device_GBps`,
  `bwd_device_GBps`): the same call queued behind a GPU busy-wait (`torch.cuda._sleep`) at least
  twice as long as the host takes to queue it. The events then hold the GPU's work alone, as in
  training, where the host runs ahead of the GPU. The busy-wait of each phase is recorded under
  `busy_wait`, and the copy the bandwidths are judged against is timed both ways too.
The targets are judged on both measures; CPU runs have per-call times only (no queue to fill).
"""
import functools
import importlib
import json
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..memory import SavedTensorLedger
from .machine import header, json_safe, machine_info, synchronize


@dataclass
class Case:
    name: str
    make: Callable      # (device, dtype, size) -> tuple of inputs (requires_grad set)
    ours: Callable      # (*inputs) -> output
    stock: Callable     # (*inputs) -> output
    fwd_bytes: Callable  # (*inputs) -> bytes our forward must move; None: no GB/s (no fixed count)
    bwd_bytes: Callable  # (*inputs) -> bytes our backward must move; None as fwd_bytes


def _nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _rows(size):
    """(rows, hidden) of the element-wise and row-wise cases; "tiny" is for the CPU tests."""
    return {"tiny": (256, 1024), "small": (8 * 1024, 1024), "large": (64 * 1024, 4096)}[size]


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
             lambda x, w, b: ops.layer_norm(x, x.shape[-1:], w, b, 1e-5),
             lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-5),
             lambda x, w, b: 2 * _nbytes(x) + x.shape[0] * 4,
             lambda x, w, b: 3 * _nbytes(x) + x.shape[0] * 4),
        Case("rms_norm", make,
             lambda x, w, b: ops.rms_norm(x, x.shape[-1:], w, 1e-5),
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
    # megatron-core must import: a missing one is this group's error, raised here
    importlib.import_module("tempo_ds.megatron.core_attention")
    from . import attention_case
    return attention_case.cases(Case)


def _bias_gelu_cases():
    from . import ops_bias_gelu
    return ops_bias_gelu.cases(Case, _rows, _nbytes)


def _loss_cases():
    from . import ops_loss
    return ops_loss.cases(Case)


CASE_GROUPS = {"gelu": _gelu_cases, "norm": _norm_cases, "dropout": _dropout_cases,
               "attention": _attention_cases, "bias_gelu": _bias_gelu_cases, "loss": _loss_cases}


def _median(samples):
    return sorted(samples)[len(samples) // 2]


def _timing_events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def _time(fn, device, reps, warmup=2):
    """Median seconds of fn() over reps runs, each started with the device idle (per-call latency)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = _timing_events()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return _median(samples)


# The busy-wait queued before each device-timed call lasts this many times the host's time to queue
# the call, so that a call slower to queue than in calibration is still covered, and never less
# than the floor.
SLEEP_PER_HOST_TIME = 2
SLEEP_FLOOR_S = 2e-4
# About 2 ms at an H100's clock: long against the resolution of CUDA events.
_CALIBRATION_CYCLES = 1 << 22


@dataclass
class DeviceTime:
    """One phase of an op timed on a busy queue."""
    seconds: float  # median GPU time of one call
    host_s: float   # the host's time to queue one call (the longest of the calibration calls)
    sleep_s: float  # the busy-wait queued before each timed call
    ran_out: int    # timed calls the GPU started before the host had queued all of the call
    calls: int      # timed calls

    def busy_wait(self):
        """What the report keeps about the busy-wait behind `seconds`."""
        return {"host_s": self.host_s, "sleep_s": self.sleep_s, "ran_out": self.ran_out, "calls": self.calls}


@functools.lru_cache(maxsize=None)
def sleep_cycles_per_s(device):
    """Cycles per second of torch.cuda._sleep on this GPU, timed once with CUDA events."""
    # _sleep counts GPU clock cycles: a long sleep first lets the clock leave its idle speed, and
    # the fastest rate is kept, so that later busy-waits last at least as long as asked.
    torch.cuda._sleep(16 * _CALIBRATION_CYCLES)
    rates = []
    for _ in range(5):
        start, end = _timing_events()
        start.record()
        torch.cuda._sleep(_CALIBRATION_CYCLES)
        end.record()
        synchronize(device)
        rates.append(_CALIBRATION_CYCLES / (start.elapsed_time(end) / 1e3))
    return max(rates)


def _host_seconds(fn, device, calls=3):
    """The longest host time of one fn() call: the clock read around the call, no wait for the GPU."""
    longest = 0.0
    for _ in range(calls):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        longest = max(longest, time.perf_counter() - t0)
    synchronize(device)
    return longest


def _time_device(fn, device, reps):
    """DeviceTime of fn() queued behind a GPU busy-wait; None on CPU, where there is no queue."""
    if device.type != "cuda":
        return None
    host_s = _host_seconds(fn, device)
    sleep_s = max(SLEEP_FLOOR_S, SLEEP_PER_HOST_TIME * host_s)
    cycles = int(sleep_s * sleep_cycles_per_s(device))
    samples, ran_out = [], 0
    for _ in range(reps):
        start, end = _timing_events()
        torch.cuda._sleep(cycles)
        start.record()
        fn()
        end.record()
        # The GPU already past `start` once the host has queued `end`: it may have waited for the
        # host inside this sample.
        ran_out += int(start.query())
        synchronize(device)
        samples.append(start.elapsed_time(end) / 1e3)
    return DeviceTime(_median(samples), host_s, sleep_s, ran_out, reps)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _device_keys(timings):
    """{phase}_device_s and the busy-waits behind them ("busy_wait"); None values on CPU."""
    keys = {f"{phase}_device_s": None if t is None else t.seconds for phase, t in timings.items()}
    on_gpu = all(t is not None for t in timings.values())
    keys["busy_wait"] = {phase: t.busy_wait() for phase, t in timings.items()} if on_gpu else None
    return keys


def measure(fn, inputs, device, reps):
    """fwd/bwd/full seconds per call and, on GPU, on a busy queue; peak bytes of a full step (GPU);
    bytes saved for backward."""
    grad = torch.randn_like(_first(fn(*inputs)))

    def zero():
        for t in inputs:
            t.grad = None

    def fwd():
        return fn(*inputs)

    def full():
        zero()
        _first(fn(*inputs)).backward(grad)

    def backward_timings():
        # one retained graph, freed on return (before the peak of a full step is measured)
        out = _first(fn(*inputs))

        def bwd():
            zero()
            out.backward(grad, retain_graph=True)

        return _time(bwd, device, reps), _time_device(bwd, device, reps)

    t_fwd = _time(fwd, device, reps)
    on_queue = {"fwd": _time_device(fwd, device, reps)}
    t_bwd, on_queue["bwd"] = backward_timings()
    peak = None
    if device.type == "cuda":
        zero()  # the timings' gradients go first: full() frees them, and base must not hold them
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        full()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    t_full = _time(full, device, reps)
    on_queue["full"] = _time_device(full, device, reps)
    with SavedTensorLedger() as ledger:
        saved_out = _first(fn(*inputs))
    saved = ledger.report(saved_out).total_bytes
    return {"fwd_s": t_fwd, "bwd_s": t_bwd, "full_s": t_full, "peak_bytes": peak, "saved_bytes": saved,
            **_device_keys(on_queue)}


def copy_bandwidth(device, nbytes=1 << 30):
    """GB/s of a large device-to-device copy, per call and on a busy queue: the bandwidths the ops
    are judged against. (None, None) on CPU."""
    if device.type != "cuda":
        return None, None
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    per_call = _time(lambda: dst.copy_(src), device, 20)
    on_queue = _time_device(lambda: dst.copy_(src), device, 20)
    return 2 * nbytes / per_call / 1e9, 2 * nbytes / on_queue.seconds / 1e9


def _bandwidths(case, inputs, times):
    """GB/s of our forward and backward (GPU), per call and on a busy queue; none for a case
    without byte counts."""
    if case.fwd_bytes is None or case.bwd_bytes is None:
        return {}
    moved = {"fwd": case.fwd_bytes(*inputs), "bwd": case.bwd_bytes(*inputs)}
    return {f"{phase}{suffix}_GBps": moved[phase] / times[f"{phase}{suffix}_s"] / 1e9
            for suffix in ("", "_device") for phase in moved}


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
                row["ours"].update(_bandwidths(case, inputs, ours))
            results.append(row)
    copy_GBps, copy_device_GBps = copy_bandwidth(device)
    return {"machine": machine_info(), "device": device.type, "dtype": str(dtype), "size": size, "reps": reps,
            "copy_GBps": copy_GBps, "copy_device_GBps": copy_device_GBps,
            "sleep_cycles_per_s": sleep_cycles_per_s(device) if device.type == "cuda" else None,
            "results": results, "skipped": skipped}


# Targets on an H100 (bf16), from the core-ops and attention issues: forward + backward time against
# the stock op (at most this ratio), and for the element-wise and row-wise ops the bandwidth each
# pass reaches, against a large device-to-device copy on the same card.
TIME_TARGETS = {"gelu[none]": 1.0, "gelu[tanh]": 1.0, "layer_norm": 1.0, "rms_norm": 1.0,
                "attention[flash] vs unfused": 1.0, "attention[tempo] vs unfused": 1.1}
BANDWIDTH_TARGET = 0.7
BANDWIDTH_OPS = ("gelu[none]", "gelu[tanh]", "layer_norm", "rms_norm")
# The two measures the targets are judged on: (word in the verdict's name, suffix of the report's
# keys). Reports from before device times have the first only.
MEASURES = (("", ""), (" device", "_device"))


def _time_verdicts(op, row, bound):
    out = []
    for word, suffix in MEASURES:
        ours, stock = row["ours"].get(f"full{suffix}_s"), row["stock"].get(f"full{suffix}_s")
        if ours is not None and stock is not None:
            ratio = ours / stock
            out.append((f"{op}: fwd+bwd{word} time / stock", ratio, f"<= {bound}", ratio <= bound))
    return out


def _bandwidth_verdicts(op, ours, report):
    out = []
    for word, suffix in MEASURES:
        copy = report.get(f"copy{suffix}_GBps")
        for phase in ("fwd", "bwd"):
            achieved = ours.get(f"{phase}{suffix}_GBps")
            if copy and achieved is not None:
                share = achieved / copy
                out.append((f"{op}: {phase}{word} GB/s / copy{word} GB/s", share, f">= {BANDWIDTH_TARGET}",
                            share >= BANDWIDTH_TARGET))
    return out


def check_targets(report):
    """[(what, measured, target, met)] for the GPU targets of this report; [] without a GPU.

    Each target is judged per call, and again on device time where the report has it (each
    verdict named after its measure)."""
    if report["device"] != "cuda":
        return []
    rows = {r["op"]: r for r in report["results"]}
    out = []
    for op, bound in TIME_TARGETS.items():
        if op in rows:
            out += _time_verdicts(op, rows[op], bound)
    for op in BANDWIDTH_OPS:
        if op in rows:
            out += _bandwidth_verdicts(op, rows[op]["ours"], report)
    from . import ops_bias_gelu, ops_loss
    out += ops_loss.verdicts(rows, _time_verdicts, report.get("dtype", "torch.bfloat16"))
    return out + ops_bias_gelu.verdicts(rows, _time_verdicts)


def _copy_line(report):
    line = f"device-to-device copy: {report['copy_GBps']:.0f} GB/s"
    if report.get("copy_device_GBps"):
        line += f" per call, {report['copy_device_GBps']:.0f} GB/s device time"
    return line


def _gbps(side, key):
    """A GB/s column: '-' for cases without a byte count (attention)."""
    value = side.get(key)
    return f"{value:>10.0f}" if value is not None else f"{'-':>10}"


def _device_table(report):
    """Device times (busy queue) of the rows that have them: GPU reports since they were measured."""
    rows = [r for r in report["results"] if r["ours"].get("full_device_s") is not None]
    if not rows:
        return []
    cols = f"{'device time':<26}{'fwd ms':>9}{'x stock':>9}{'bwd ms':>9}{'x stock':>9}{'full x':>8}" \
           f"{'fwd GB/s':>10}{'bwd GB/s':>10}"
    lines = [cols, "-" * len(cols)]
    for r in rows:
        o, s = r["ours"], r["stock"]
        lines.append(
            f"{r['op']:<26}{o['fwd_device_s'] * 1e3:>9.3f}{o['fwd_device_s'] / s['fwd_device_s']:>9.2f}"
            f"{o['bwd_device_s'] * 1e3:>9.3f}{o['bwd_device_s'] / s['bwd_device_s']:>9.2f}"
            f"{o['full_device_s'] / s['full_device_s']:>8.2f}"
            f"{_gbps(o, 'fwd_device_GBps')}{_gbps(o, 'bwd_device_GBps')}")
    lines.append("per call: from an idle GPU, the host's launch overhead included; "
                 "device time: queued behind a GPU busy-wait, GPU work only.")
    return lines + _busy_wait_notes(rows)


def _busy_wait_notes(rows):
    """A line for each measurement whose busy-wait ran out before the host had queued the call."""
    notes = []
    for r in rows:
        for who in ("ours", "stock"):
            for phase, wait in r[who]["busy_wait"].items():
                if wait["ran_out"]:
                    notes.append(f"  {r['op']} {who} {phase}: {wait['ran_out']} of {wait['calls']} calls "
                                 f"(host {wait['host_s'] * 1e3:.3f} ms, busy-wait {wait['sleep_s'] * 1e3:.3f} ms)")
    if notes:
        notes.insert(0, "busy-wait over before the host had queued the call (device time may hold host gaps):")
    return notes


def format_table(report):
    lines = [header(report["machine"], report["device"]), f"dtype {report['dtype']}, size {report['size']}"]
    if report["copy_GBps"]:
        lines.append(_copy_line(report))
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
            line += (f"{_gbps(o, 'fwd_GBps')}{_gbps(o, 'bwd_GBps')}{o['peak_bytes'] / 2**20:>10.1f}"
                     f"{s['peak_bytes'] / 2**20:>8.1f}")
        lines.append(line)
    lines.append("x stock: our time / stock time (below 1 is faster). saved: bytes kept for backward.")
    lines += _device_table(report)
    targets = check_targets(report)
    if targets:
        width = max(len(what) for what, *_ in targets) + 2
        lines.append("targets (H100 bf16):")
        lines += [f"  {what:<{width}}{value:>6.2f} (target {target})  {'met' if met else 'NOT met'}"
                  for what, value, target, met in targets]
    for group, why in report["skipped"].items():
        lines.append(f"skipped {group}: {why}")
    return "\n".join(lines)


def add_arguments(p):
    """The options of `python -m tempo_ds.bench ops` (shown with their defaults by --help)."""
    p.add_argument("--only", nargs="*", choices=list(CASE_GROUPS), default=None,
                   help="case groups to run; None runs all of them")
    p.add_argument("--device", default=None,
                   help="cpu or cuda; None picks cuda when a GPU is present, else cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="dtype of every case's tensors")
    p.add_argument("--size", default=None, choices=["small", "large"],
                   help="tensor sizes: small 8K x 1024, large 64K x 4096 elements; None picks large "
                        "on GPU, small on CPU")
    p.add_argument("--reps", type=int, default=None,
                   help="calls timed per measurement (the median is kept); None: 50 on GPU, 5 on CPU")
    p.add_argument("--json", default="bench_ops.json", help="where to write the results ('' for none)")


def main(args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    report = run(args.only, args.device, dtype, args.size, args.reps)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_safe(report), f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0
