"""The largest micro-batch that fits, found by trying it: doubling, then bisection.

Memory grows with the micro-batch but not exactly linearly (allocator rounding, workspace sizes
that depend on the shape, fragmentation), so an extrapolation from one measurement can be off by
several samples either way. The search runs the real step at each candidate instead; it assumes
only that "fits" is monotone (if n fits, every m < n fits).

Given a prediction (tempo_ds.plan), the search confirms it with two probes: the predicted n and
n + 1 (n - 1 when n does not fit). When both agree with the prediction it is done; otherwise it
goes on from the bounds these probes set, by doubling and bisection as without one.
"""
from dataclasses import dataclass, field


@dataclass
class SearchResult:
    """largest: the largest n that fitted (0 if even `start` did not); capped: the search stopped
    at `cap` with everything fitting, so the true maximum is at least `largest`; trials: every
    (n, fitted) in the order tried."""
    largest: int
    capped: bool
    trials: list = field(default_factory=list)


def largest_fitting(fits, start=1, cap=None, predicted=None):
    """Largest n >= start with fits(n) true.

    Args:
        fits: callable n -> bool; runs the candidate and reports whether it fitted. It is called
            at most about 2 * log2(answer / start) + 1 times, never twice with the same n.
        start: first candidate (>= 1).
        cap: optional upper bound; when every candidate up to cap fits, the result is cap with
            capped=True (CPU runs, where nothing runs out of memory, stop there).
        predicted: optional predicted answer (tempo_ds.plan): probed first, then its neighbour
            (module docstring); a right prediction costs two probes.

    Returns a SearchResult.
    """
    if start < 1 or (cap is not None and cap < start):
        raise ValueError(f"need 1 <= start <= cap, got start={start}, cap={cap}")
    trials = []

    def attempt(n):
        ok = bool(fits(n))
        trials.append((n, ok))
        return ok

    lo, hi = None, None  # lo fits, hi does not
    if predicted is not None and predicted >= start and (cap is None or predicted <= cap):
        if attempt(predicted):
            lo = predicted
            if cap is not None and predicted >= cap:
                return SearchResult(lo, True, trials)
            if not attempt(predicted + 1):
                return SearchResult(lo, False, trials)
            lo = predicted + 1
        else:
            hi = predicted
            if predicted - 1 >= start:
                if attempt(predicted - 1):
                    return SearchResult(predicted - 1, False, trials)
                hi = predicted - 1
    if lo is None:
        if hi is not None and hi <= start:
            return SearchResult(0, False, trials)
        if not attempt(start):
            return SearchResult(0, False, trials)
        lo = start
    # Doubling: lo always fits, hi (once set) never does.
    while hi is None:
        if cap is not None and lo >= cap:
            return SearchResult(lo, True, trials)
        n = 2 * lo if cap is None else min(2 * lo, cap)
        if attempt(n):
            lo = n
        else:
            hi = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if attempt(mid):
            lo = mid
        else:
            hi = mid
    return SearchResult(lo, False, trials)
