"""The outputs of `python -m tempo_ds.bench train`: the table, the CSV, the JSON, the plots, and
the verdicts on the targets that docs/results/targets.json keeps beside the results they judge."""
import csv
import json
import os
import sys
from dataclasses import dataclass

from .machine import header
from .train_types import Report

MiB = 2 ** 20
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS_PATH = os.path.join(REPO, "docs", "results", "targets.json")


def csv_rows(report):
    """One flat row per variant of `report` (a Report): the CSV's columns."""
    rows = []
    for r in report.results:
        common, best = r.common, r.best
        losses = (common.losses if common else None) or [None]
        rows.append({
            "variant": r.variant,
            "memory_budget_bytes": report.config.memory_budget,
            "n_params": r.n_params,
            "attention_ran": "+".join(r.attention_ran),
            "fixed_bytes": r.fixed_bytes,
            "activation_per_sample_allocator_bytes": r.activation_per_sample_allocator_bytes,
            "activation_per_sample_ledger_bytes": r.activation_per_sample_ledger_bytes,
            "ledger_head_bytes": r.ledger.head_bytes if r.ledger else None,
            "largest_micro_batch": r.largest_micro_batch,
            "search_capped": r.search_capped,
            "peak_at_largest_bytes": r.peak_at_largest_bytes,
            "best_samples_per_s": best.samples_per_s if best else None,
            "best_tokens_per_s": best.tokens_per_s if best else None,
            "best_mfu": best.mfu if best else None,
            "common_micro_batch": report.config.common_mb,
            "common_samples_per_s": common.samples_per_s if common else None,
            "common_mfu": common.mfu if common else None,
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "error": r.error,
        })
    return rows


@dataclass(frozen=True)
class Target:
    """numerator / denominator (variants) of `quantity` (a CSV column) must be `op` `bound`, for
    runs of `model` with (budgeted) or without a memory budget."""
    model: str
    name: str
    numerator: str
    denominator: str
    quantity: str
    op: str
    bound: float
    budgeted: bool

    def __post_init__(self):
        if self.op not in ("<=", ">="):
            raise ValueError(f"target {self.name!r}: op={self.op!r}, expected '<=' or '>='")

    def met(self, ratio):
        return ratio <= self.bound if self.op == "<=" else ratio >= self.bound


def load_targets(path=TARGETS_PATH, framework="megatron"):
    """The train targets of `path` for `framework` ("megatron": its "train" list, "hf": its
    "train_hf" list) as Targets; None when the file is not there (an installed package without
    the repository's docs/)."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = json.load(f).get("train_hf" if framework == "hf" else "train", [])
    return [Target(**row) for row in rows]


def check_targets(report, targets=None):
    """[(target, ratio or None, bound, met or None)] for the targets `report` can speak to;
    `targets` defaults to load_targets() of the report's framework."""
    cfg = report.config
    targets = load_targets(framework=cfg.framework) if targets is None else targets
    rows = {r["variant"]: r for r in csv_rows(report)}
    out = []
    for t in targets or []:
        if t.model != cfg.model or t.budgeted != bool(cfg.memory_budget):
            continue
        a, b = rows.get(t.numerator, {}).get(t.quantity), rows.get(t.denominator, {}).get(t.quantity)
        ratio = a / b if a is not None and b else None
        met = None if ratio is None or cfg.cpu_sized else t.met(ratio)
        out.append((f"{t.numerator} / {t.denominator}: {t.name}", ratio, f"{t.op} {t.bound:g}", met))
    return out


def _fmt(x, scale=1.0, spec=",.0f"):
    return "-" if x is None else format(x / scale, spec)


def _variant_lines(rows):
    # the strongest stock path: Megatron's local spec, transformers' SDPA
    stock = next((r for r in rows if r["variant"] in ("stock", "sdpa")), None)
    base = stock and stock["activation_per_sample_ledger_bytes"]
    for r in rows:
        if r["error"]:
            yield f"{r['variant']:<12} {r['error']}"
            continue
        ratio = r["activation_per_sample_ledger_bytes"] / base if base else None
        largest = f"{'>=' if r['search_capped'] else ''}{r['largest_micro_batch']}"
        loss = "-" if r["first_loss"] is None else f"{r['first_loss']:.3f}->{r['last_loss']:.3f}"
        yield (f"{r['variant']:<12}{_fmt(r['activation_per_sample_allocator_bytes'], MiB):>15}"
               f"{_fmt(r['activation_per_sample_ledger_bytes'], MiB, ',.1f'):>11}{_fmt(ratio, 1, '.3f'):>8}"
               f"{largest:>11}{_fmt(r['peak_at_largest_bytes'], MiB):>10}"
               f"{_fmt(r['best_samples_per_s'], 1, ',.1f'):>10}{_fmt(r['best_tokens_per_s']):>11}"
               f"{_fmt(r['best_mfu'], 0.01, '.0f'):>6}{_fmt(r['common_samples_per_s'], 1, ',.1f'):>9}{loss:>16}")


def format_report(report, targets=None):
    """The table of `report` (a Report), its ledger breakdown and the target verdicts."""
    cfg = report.config
    lines = [header(report.machine),
             f"{'transformers ' if cfg.framework == 'hf' else ''}{cfg.model} {cfg.size} (L{cfg.layers} h{cfg.hidden} a{cfg.heads}), "
             f"seq {cfg.seq}, vocab {cfg.vocab}, {cfg.steps} timed steps after {cfg.warmup}, "
             f"common micro-batch {cfg.common_mb}"
             + (f", memory budget {cfg.memory_budget / 2**30:g} GiB" if cfg.memory_budget else "")]
    if cfg.cpu_sized:
        lines.append("CPU-sized configuration: ledger bytes and ratios only; times are not speeds; "
                     f"the search stops at {cfg.cap}.")
    cols = (f"{'variant':<12}{'act/sample MiB':>15}{'ledger MiB':>11}{'x stock':>8}{'largest mb':>11}"
            f"{'peak MiB':>10}{'samples/s':>10}{'tokens/s':>11}{'MFU':>6}{'@common':>9}{'loss':>16}")
    lines += [cols, "-" * len(cols)]
    lines += _variant_lines(csv_rows(report))
    lines.append("act/sample: (peak - fixed) / mb from the allocator at the common micro-batch; ledger: "
                 "bytes saved for backward / mb; x stock: ledger ratio; samples/s, tokens/s, MFU (%) "
                 "at the largest micro-batch; @common: samples/s at the common one.")
    paths = {r.variant: r.attention_ran for r in report.results if r.attention_ran}
    if paths:
        lines.append("attention path that ran: " + ", ".join(f"{k}: {'+'.join(v)}" for k, v in paths.items()))
    lines.append("ledger by op category, MiB per sample (head = embeddings, final norm, logits, loss):")
    for r in report.results:
        ledger = r.ledger
        if ledger:
            mb = ledger.micro_batch
            cats = ", ".join(f"{k} {v / mb / MiB:,.2f}" for k, v in ledger.by_category.items())
            per_layer = ledger.layers_bytes / (mb * cfg.seq * cfg.layers)
            lines.append(f"  {r.variant:<12} layers {per_layer:,.0f} B/token/layer, head "
                         f"{ledger.head_bytes / mb / MiB:,.2f} of {ledger.total_bytes / mb / MiB:,.2f} | {cats}")
    targets = load_targets(framework=cfg.framework) if targets is None else targets
    if targets is None:
        lines.append(f"targets: {TARGETS_PATH} not found; none judged")
    verdicts = check_targets(report, targets)
    if verdicts:
        lines.append("targets (H100 bf16):" + (" not judged on a CPU-sized run" if cfg.cpu_sized else ""))
        for name, ratio, bound, met in verdicts:
            verdict = "" if met is None else ("  met" if met else "  NOT met")
            lines.append(f"  {name:<62}{_fmt(ratio, 1, '.2f'):>7} (target {bound}){verdict}")
    return "\n".join(lines)


def write_outputs(report, out_dir, plots=True, log=None):
    """train_<tag>.json and .csv in out_dir, and the plots unless plots=False."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"train_{report.tag}")
    report.dump(base + ".json")
    rows = csv_rows(report)
    if rows:
        with open(base + ".csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if plots:
        from . import plots as plotting
        written = plotting.train_plots(report.to_dict(), base)
        if log:
            log(plotting.describe(written))


def from_json(path, out_dir, plots=True):
    """Table and plots again from a stored train_<tag>.json (e.g. one a GPU machine wrote)."""
    report = Report.load(path)
    write_outputs(report, out_dir, plots=plots, log=lambda line: print(line, file=sys.stderr))
    print(format_report(report))
    return report
