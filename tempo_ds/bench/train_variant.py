"""One variant of `python -m tempo_ds.bench train`, measured in this process (run_variant).

What it measures, on a GPU:
  fixed bytes       allocated after a warm-up step with the gradients of a second backward still
                    alive and no activations: parameters, gradients, optimizer state;
  activation bytes  per sample at the common micro-batch, from the allocator ((peak - fixed) / mb)
                    and from tempo_ds.memory.SavedTensorLedger (one forward), side by side;
  largest micro-batch  found by running the step (search.largest_fitting), with its peak;
  throughput        samples/s, tokens/s and model FLOPs utilisation at the largest micro-batch and
                    at the common one; the losses of the timed steps at the common micro-batch
                    (taken first, from the same weights and data in every variant).
On CPU only the ledger bytes mean something; times are not speeds and nothing runs out of memory.
"""
import gc
import time

import torch

from .. import workload
from .machine import synchronize
from .search import largest_fitting
from .train_model import setup_distributed
from .train_types import LedgerSummary, TimedPoint, VariantResult, variants_for

MiB = 2 ** 20

# Dense bf16 tensor-core peak in TFLOP/s, by a substring of torch.cuda.get_device_name(); the
# first match wins, so the more specific names come first. Sources: NVIDIA data sheets.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
)


def bf16_peak_flops(device_name):
    """Dense bf16 peak FLOP/s of a GPU by name, or None when the table does not know it."""
    for key, tflops in BF16_PEAK_TFLOPS:
        if device_name and key in device_name:
            return tflops * 1e12
    return None


def flops_per_token(n_params, layers, hidden, seq):
    """Model FLOPs of one token, forward and backward: 6 N (every parameter in one multiply-add
    forward and two backward; the tied word embedding stands for the output layer's GEMM) plus
    12 L h s for the attention scores and their product with V (PaLM, appendix B). Recomputation
    is not counted: this is model, not hardware, FLOPs utilisation."""
    return 6 * n_params + 12 * layers * hidden * seq


def _builder(config):
    """The module that builds, feeds and steps config.framework's model: train_model (Megatron)
    or train_hf_model (transformers); both offer build_engine, Batches and train_step."""
    if config.framework == "hf":
        from . import train_hf_model
        return train_hf_model
    from . import train_model
    return train_model


class _Session:
    """One variant's engine and data, and the number of the next step: every step, whichever
    measurement takes it, reseeds dropout from (seed, step) and draws batch `step`, so no two
    measurements reuse a batch."""

    def __init__(self, config, engine, data, device, log, fpt):
        self.config, self.engine, self.data, self.device, self.log = config, engine, data, device, log
        self.on_gpu = device.type == "cuda"
        self.builder = _builder(config)
        self.arch = None if config.framework == "hf" else workload.arch_of(config.model)
        self.next_step = 0
        self.peaks = {}
        name = torch.cuda.get_device_name(device) if self.on_gpu else None
        peak_flops = bf16_peak_flops(name)
        self.mfu_per_token_s = fpt / peak_flops if peak_flops else None

    def step(self, mb, batch=None):
        """One optimizer step at micro-batch mb (on `batch`, or batch next_step drawn now);
        returns the detached loss."""
        workload.reseed(self.config.seed, self.next_step)
        batch = self.data.get(self.next_step, mb) if batch is None else batch
        loss = self.builder.train_step(self.engine, self.config.model, batch)
        self.next_step += 1
        return loss

    def attempt(self, fn):
        """fn() -> value, or None if it ran out of GPU memory (cleaned up)."""
        try:
            return fn()
        except torch.cuda.OutOfMemoryError:
            pass
        # Outside the except block, so the traceback (and the tensors its frames hold) is gone.
        # Drop half-made gradients and the allocator's cached blocks, so the next attempt starts
        # from the fixed state.
        self.engine.zero_grad()
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return None

    def _timed_steps(self, mb):
        cfg = self.config
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        for _ in range(cfg.warmup):
            self.step(mb)
        # Drawn before the clock starts: the data pipeline is not what is timed.
        batches = [self.data.get(self.next_step + i, mb) for i in range(cfg.steps)]
        synchronize(self.device)
        t0 = time.perf_counter()
        losses = [self.step(mb, batch) for batch in batches]
        synchronize(self.device)
        seconds = time.perf_counter() - t0
        tokens_per_s = mb * cfg.steps * cfg.seq / seconds
        return TimedPoint(
            micro_batch=mb, steps=cfg.steps, seconds=seconds, samples_per_s=mb * cfg.steps / seconds,
            tokens_per_s=tokens_per_s, losses=[float(x) for x in losses],
            peak_bytes=torch.cuda.max_memory_allocated(self.device) if self.on_gpu else None,
            mfu=self.mfu_per_token_s * tokens_per_s if self.mfu_per_token_s else None)

    def timed(self, mb, label):
        """config.warmup untimed then config.steps timed steps at mb; None on out of memory. The
        steps are used up either way, so what comes after draws the same batches."""
        first = self.next_step
        point = self.attempt(lambda: self._timed_steps(mb))
        self.next_step = first + self.config.warmup + self.config.steps
        self.log(f"  {label} mb {mb}: " + ("out of memory" if point is None else
                 f"{point.samples_per_s:.2f} samples/s, loss {point.losses[0]:.4f} -> {point.losses[-1]:.4f}"
                 + (f", peak {point.peak_bytes / MiB:,.0f} MiB" if point.peak_bytes else "")))
        return point

    def _probe(self, mb):
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.step(mb)
        synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) if self.on_gpu else 0

    def fits(self, mb):
        """Whether one step at mb runs (the search's predicate); records its peak."""
        peak = self.attempt(lambda: self._probe(mb))
        if peak is not None and self.on_gpu:
            self.peaks[mb] = peak
        self.log(f"  search mb {mb}: " + ("fits" if peak is not None else "out of memory")
                 + (f", peak {peak / MiB:,.0f} MiB" if peak else ""))
        return peak is not None

    def _ledger(self, mb):
        from ..memory import SavedTensorLedger

        with SavedTensorLedger(self.engine.module) as ledger:
            loss = self._loss(self.data.get(0, mb))
        report = ledger.report(loss)
        del loss
        layer_prefixes = getattr(self.builder, "LAYER_PREFIXES", ("decoder.layers.", "encoder.layers."))
        layers = sum(r.nbytes for r in report.records if r.module.startswith(layer_prefixes))

        def ranked(d):
            return dict(sorted(d.items(), key=lambda kv: -kv[1]))
        return LedgerSummary(micro_batch=mb, total_bytes=report.total_bytes, layers_bytes=layers,
                             head_bytes=report.total_bytes - layers,
                             by_category=ranked(report.by_category()), by_op=ranked(report.by_op()))

    def _loss(self, batch):
        if self.arch is None:
            return self.builder.loss(self.engine, batch)
        return workload.loss(self.arch, self.engine, batch)

    def ledger(self, mb):
        """Bytes autograd keeps for one forward at mb (SavedTensorLedger); None on out of memory."""
        return self.attempt(lambda: self._ledger(mb))

    def fixed_bytes(self):
        """Allocated bytes with a backward's gradients alive and no activations (GPU only), then
        the step that frees them."""
        loss = self._loss(self.data.get(self.next_step, 1))
        self.next_step += 1
        self.engine.backward(loss)
        del loss
        synchronize(self.device)
        fixed = torch.cuda.memory_allocated(self.device)
        self.engine.step()
        return fixed

    def attention_paths(self):
        modules = self.engine.module.modules()
        # Megatron's Tempo core attention records `last_path`, the transformers one `tempo_last_path`
        paths = {getattr(m, "last_path", None) or getattr(m, "tempo_last_path", None) for m in modules}
        return sorted(p for p in paths if p)


def plan_prediction(config, variant_name, device, log):
    """(largest micro-batch, its peak) that tempo_ds.plan predicts for this run on this GPU, the
    search's first probe; (None, None) where the plan cannot say (it logs why)."""
    from ..plan import PlanError, estimate

    total = torch.cuda.get_device_properties(device).total_memory
    try:
        plan = estimate(model=config.model, layers=config.layers, hidden=config.hidden, heads=config.heads,
                        seq_length=config.seq, vocab_size=config.vocab, dropout=config.dropout, bf16=True,
                        zero_stage=config.zero_stage if config.zero_stage is not None else 1,
                        gpu_memory=None if config.memory_budget else total, memory_budget=config.memory_budget,
                        variants=[variant_name], max_positions=config.seq)
    except PlanError as err:
        log(f"  plan: no prediction ({err})")
        return None, None
    v = plan.variants[0]
    log(f"  plan: largest micro-batch {v.largest_micro_batch}, peak {(v.peak_at_largest or 0) / MiB:,.0f} MiB")
    return (v.largest_micro_batch or None), v.peak_at_largest


def run_variant(config, variant_name, log):
    """Measure variant `variant_name` (module docstring) under RunConfig `config` in this process;
    returns its VariantResult."""
    device = setup_distributed()
    variant = variants_for(config.framework)[variant_name]
    builder = _builder(config)
    on_gpu = device.type == "cuda"
    budget = config.memory_budget
    if budget and on_gpu:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    elif budget:
        log("  --memory-budget applies to the CUDA allocator only; ignored on CPU")

    engine, n_params, attention = builder.build_engine(config.to_dict(), variant, device, config.seed)
    data = builder.Batches(config.model, config.seq, config.vocab, config.seed, device)
    fpt = flops_per_token(n_params, config.layers, config.hidden, config.seq)
    session = _Session(config, engine, data, device, log, fpt)
    result = VariantResult(variant=variant.name, description=variant.description, n_params=n_params,
                           attention_asked=attention, memory_budget_bytes=budget if on_gpu else None,
                           flops_per_token=fpt)
    log(f"[{variant.name}] {variant.description}: {n_params / 1e6:.1f}M parameters")

    # Warm-up (optimizer state exists afterwards), then the fixed bytes; the timed runs start at
    # step 2 whether or not the fixed bytes were measured, so CPU and GPU runs see the same data.
    session.step(1)
    if on_gpu:
        result.fixed_bytes = session.fixed_bytes()
        log(f"  fixed (parameters, gradients, optimizer state): {result.fixed_bytes / MiB:,.0f} MiB")
    session.next_step = 2

    common = session.timed(config.common_mb, "common")
    result.common = common
    result.attention_ran = session.attention_paths()

    if on_gpu and config.framework == "megatron":
        result.predicted_micro_batch, result.predicted_peak_bytes = plan_prediction(config, variant_name, device, log)
    search = largest_fitting(session.fits, start=1, cap=config.cap, predicted=result.predicted_micro_batch)
    result.largest_micro_batch, result.search_capped = search.largest, search.capped
    result.search_trials = search.trials
    result.peak_at_largest_bytes = session.peaks.get(search.largest)

    if search.largest == config.common_mb and common is not None:
        result.best = common
        # the steps a timing at the largest micro-batch would take: the sweep draws the same
        # batches whether it ran or not
        session.next_step += config.warmup + config.steps
    elif search.largest:
        result.best = session.timed(search.largest, "largest")
    for mb in config.sweep:
        if mb <= search.largest and mb not in (config.common_mb, search.largest):
            point = session.timed(mb, "sweep")
            if point:
                result.sweep.append(point)

    ledger_mb = config.common_mb if common is not None else max(1, min(search.largest, config.common_mb))
    result.ledger = session.ledger(ledger_mb)
    result.activation_per_sample_ledger_bytes = result.ledger and result.ledger.total_bytes / ledger_mb
    if on_gpu and common is not None:
        result.activation_per_sample_allocator_bytes = (common.peak_bytes - result.fixed_bytes) / common.micro_batch
    return result
