"""The plan against the recorded GPU runs: every train_<tag>.json under docs/results/.

    python -m tempo_ds.plan.validate            # the predicted-vs-measured table
    python -m tempo_ds.plan.validate --calibrate   # the constants, from their points only

A point is one variant of one recorded `bench train` report: the largest micro-batch its search
found and the allocator's peak there. The plan is judged on each: the predicted largest
micro-batch within 10% (1 below 10), the predicted peak at the recorded micro-batch within 5%.
The trees of the recorded runs had Megatron's loss head in the Tempo variants (loss_head="stock").
"""
import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass

from .. import workload

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(REPO, "docs", "results")
# The points that set the constants (tempo_ds.plan.constants); the others judge them.
CALIBRATION = {"engine": ("train_gpt2_345m_s1024.json", "stock"),
               "context": ("train_gpt2_345m_s1024.json", "stock"),
               "reserve": ("train_gpt2_345m_s1024_budget16GiB.json", "selective")}


@dataclass
class Point:
    """One recorded variant: its report's file, config and result row."""
    path: str
    config: dict
    result: dict

    @property
    def name(self):
        return f"{os.path.basename(os.path.dirname(self.path))}/{os.path.basename(self.path)}:{self.result['variant']}"

    @property
    def sets(self):
        """The constants this point set (empty: it judges them)."""
        base = os.path.basename(self.path)
        return [c for c, (f, v) in CALIBRATION.items() if f == base and v == self.result["variant"]]


def points(root=RESULTS):
    """Every recorded variant with a largest micro-batch and its peak."""
    out = []
    for path in sorted(glob.glob(os.path.join(root, "*", "train_*.json"))):
        with open(path) as f:
            report = json.load(f)
        for r in report["results"]:
            if r.get("largest_micro_batch") and r.get("peak_at_largest_bytes") and not r.get("search_capped"):
                out.append(Point(path, report["config"], r))
    return out


def plan_kwargs(point, card_total):
    """estimate()'s arguments for a recorded run (its budget, else the whole card)."""
    c = point.config
    budget = c.get("memory_budget")
    return dict(model=c["model"], layers=c["layers"], hidden=c["hidden"], heads=c["heads"], seq_length=c["seq"],
                vocab_size=c["vocab"], dropout=c["dropout"], bf16=True, zero_stage=c.get("zero_stage") or 1,
                gpu_memory=None if budget else card_total, memory_budget=budget, variants=[point.result["variant"]],
                loss_head="stock")


def walk_peak(point, mb, scaled=None):
    """The walk's step peak for a recorded point's variant at micro-batch mb (the full depth
    scaled from walks at 3 and 5 layers, tempo_ds.plan.scale.Scaled); scaled: estimate()'s dict
    of walked models, to reuse and add to."""
    from .estimate import _variants
    from .scale import scaled_model
    c = point.config
    variant = _variants([point.result["variant"]], "stock")[0]
    return scaled_model({} if scaled is None else scaled, c["model"], workload.Shape(c["layers"], c["hidden"], c["heads"]),
                        c["seq"], c["vocab"], variant, c["dropout"], True).walk(mb, ledger=False).peak


def calibrate(root=RESULTS):
    """The constants from their calibration points only (see tempo_ds.plan.constants)."""
    from .constants import DEFAULT
    from .states import model_states
    by = {(os.path.basename(p.path), p.result["variant"]): p for p in points(root)}
    with workload.distributed():
        stock = by[CALIBRATION["engine"]]
        mb = stock.result["largest_micro_batch"]
        states = model_states(stock.result["n_params"], zero_stage=1).at_peak
        engine = stock.result["peak_at_largest_bytes"] - walk_peak(stock, mb) - states
        stock_next = walk_peak(stock, mb + 1) + states + engine
        sel = by[CALIBRATION["reserve"]]
        smb = sel.result["largest_micro_batch"]
        seen = max(x for x in (sel.result["peak_at_largest_bytes"], (sel.result.get("best") or {}).get("peak_bytes")) if x)
        sel_next = walk_peak(sel, smb + 1) + model_states(sel.result["n_params"], zero_stage=1).at_peak + engine
        reserve = sel.config["memory_budget"] - (seen + sel_next) // 2
        usable = (stock.result["peak_at_largest_bytes"] + stock_next) // 2
        context = DEFAULT.total_bytes - usable - reserve
    return {"engine": int(engine), "context": int(context), "reserve": int(reserve)}


def judge(root=RESULTS, log=None):
    """One row per recorded point: predicted and measured largest micro-batch and peak, and the
    verdicts (within 10% / 1 below 10; peak within 5%)."""
    from .constants import DEFAULT
    from .estimate import estimate
    from .states import model_states
    rows, scaled = [], {}
    for point in points(root):
        plan = estimate(count_kept=False, scaled=scaled, **plan_kwargs(point, DEFAULT.total_bytes))
        v = plan.variants[0]
        measured = point.result["largest_micro_batch"]
        walked = dict(v.walks)
        if measured not in walked:
            with workload.distributed():
                walked[measured] = walk_peak(point, measured, scaled)
        peak = walked[measured] + model_states(plan.n_params, zero_stage=1).at_peak + DEFAULT.engine
        recorded_peak = point.result["peak_at_largest_bytes"]
        tolerance = 1 if measured < 10 else 0.10 * measured
        row = dict(point=point.name, sets=point.sets, predicted=v.largest_micro_batch, measured=measured,
                   mb_ok=abs(v.largest_micro_batch - measured) <= tolerance, predicted_peak=int(peak),
                   measured_peak=recorded_peak, peak_error=peak / recorded_peak - 1,
                   peak_ok=abs(peak / recorded_peak - 1) <= 0.05)
        rows.append(row)
        if log:
            log(format_row(row), flush=True)
    return rows


def format_row(row):
    return (f"{row['point']:<58} {row['predicted']:>5} {row['measured']:>5} {'ok' if row['mb_ok'] else 'FAIL':>4}  "
            f"{row['predicted_peak'] / 2**20:>9,.0f} {row['measured_peak'] / 2**20:>9,.0f} "
            f"{100 * row['peak_error']:>+6.1f}% {'ok' if row['peak_ok'] else 'FAIL':>4}"
            f"{'  (sets ' + ', '.join(row['sets']) + ')' if row['sets'] else ''}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tempo_ds.plan.validate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibrate", action="store_true", help="print the constants from their points")
    args = p.parse_args(argv)
    if args.calibrate:
        print(json.dumps(calibrate()))
        return 0
    print(f"{'point':<58} {'pred':>5} {'meas':>5} {'':>4}  {'pred MiB':>9} {'meas MiB':>9} {'error':>7}")
    rows = judge(log=print)
    return 0 if all(r["mb_ok"] and r["peak_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
