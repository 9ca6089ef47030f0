"""PNG plots of the benchmark reports, drawn from their JSON (so a report written on a GPU machine
can be drawn anywhere). matplotlib is the "bench" extra (pip install -e .[bench]) and is imported
only here, only when a plot is asked for."""
import os

MiB = 2 ** 20
MISSING = ("matplotlib is not installed: no plots (pip install matplotlib, or pip install -e .[bench]); "
           "the JSON and CSV are complete, and `python -m tempo_ds.bench train --from-json FILE` "
           "draws them later")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display on the benchmark machines
    import matplotlib.pyplot as plt
    return plt


def describe(written):
    return "plots: " + ", ".join(written) if written else MISSING


def memory_by_category(report, path, plt):
    """Stacked bars: ledger bytes per sample by op category, one bar per variant."""
    rows = [r for r in report["results"] if r.get("ledger")]
    if not rows:
        return False
    categories = []
    for r in rows:
        categories += [c for c in r["ledger"]["by_category"] if c not in categories]
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 3, 4.5))
    bottoms = [0.0] * len(rows)
    for cat in categories:
        heights = [r["ledger"]["by_category"].get(cat, 0) / r["ledger"]["micro_batch"] / MiB for r in rows]
        ax.bar([r["variant"] for r in rows], heights, bottom=bottoms, label=cat)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_ylabel("saved for backward, MiB per sample")
    ax.set_title(_title(report, "activation memory by op category (ledger)"), fontsize=9)
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def throughput_vs_micro_batch(report, path, plt):
    """samples/s against micro-batch, one line per variant (the common, swept and largest points)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    drawn = False
    for r in report["results"]:
        points = {}
        for point in (r.get("common"), *(r.get("sweep") or []), r.get("best")):
            if point:
                points[point["micro_batch"]] = point["samples_per_s"]
        if points:
            mbs = sorted(points)
            ax.plot(mbs, [points[m] for m in mbs], marker="o", label=r["variant"])
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batch")
    ax.set_ylabel("samples/s" + (" (CPU: not a speed)" if report["config"]["cpu_sized"] else ""))
    ax.set_title(_title(report, "throughput against micro-batch"), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _title(report, what):
    cfg, info = report["config"], report["machine"]
    where = info.get("gpu") or "CPU-sized run"
    budget = f", budget {cfg['memory_budget'] / 2**30:g} GiB" if cfg.get("memory_budget") else ""
    return f"{cfg['model']} {cfg['size']} s{cfg['seq']}{budget}: {what}\n{where}, git {info.get('git_sha')}"


def train_plots(report, base):
    """Write <base>_memory.png and <base>_throughput.png; returns the paths written ([] without
    matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    for suffix, draw in (("_memory.png", memory_by_category), ("_throughput.png", throughput_vs_micro_batch)):
        if draw(report, base + suffix, plt):
            written.append(base + suffix)
    return written


def loss_curves(curves, path, title):
    """One figure: {label: [loss per step]} as lines. Returns True if written."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
