"""Forgetting phases of a saved run: the gradual and the catastrophic segment of retention over edits.

>>> forgetting_phases(run)["onset"]      # edit index where forgetting turns catastrophic
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CollapseDiagError
from ..runs.store import Run

def change_point(x: np.ndarray, y: np.ndarray, min_size: int = 3) -> tuple[int, float]:
    """Split of (x, y) into two straight-line segments with the least total squared error.

    Returns (index of the first point of the second segment, the SSE reduction over one line as a share).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x)
    if n < 2 * min_size:
        raise CollapseDiagError(f"change point needs at least {2 * min_size} points, got {n}")

    def sse(xs: np.ndarray, ys: np.ndarray) -> float:
        if len(xs) < 2 or np.ptp(xs) == 0:
            return float(((ys - ys.mean()) ** 2).sum())
        coef = np.polyfit(xs, ys, 1)
        return float(((np.polyval(coef, xs) - ys) ** 2).sum())

    whole = sse(x, y)
    best, best_k = np.inf, min_size
    for k in range(min_size, n - min_size + 1):
        s = sse(x[:k], y[:k]) + sse(x[k:], y[k:])
        if s < best:
            best, best_k = s, k
    return best_k, (1 - best / whole) if whole > 0 else 0.0


def slope(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.polyfit(x, y, 1)[0]) if len(x) >= 2 and np.ptp(x) > 0 else float("nan")


def departure(x: np.ndarray, y: np.ndarray, margin: float, min_size: int = 3) -> int | None:
    """Index of the first point from which every later point lies more than ``margin`` below the straight line
    fitted to the points before it (at least ``min_size`` of them): where y leaves its earlier trend for good.
    At least two points must lie below (one low last point is no departure). None when it never does; x
    sorted, y finite."""
    if min_size < 2:
        raise CollapseDiagError(f"departure needs min_size >= 2 points to fit a trend, got {min_size}")
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    for j in range(min_size, len(x) - 1):
        if np.ptp(x[:j]) == 0:
            continue
        line = np.polyval(np.polyfit(x[:j], y[:j], 1), x[j:])
        if np.all(y[j:] < line - margin):
            return j
    return None


def forgetting_phases(run: Run, min_size: int = 3, steepening: float = 3.0, min_drop: float = 0.2
                      ) -> dict[str, Any]:
    """The gradual phase and the onset of catastrophic forgetting, from the evals table.

    Fits two line segments to retention over the edit index (and to log perplexity). ``onset`` is the
    first checkpoint of the second retention segment; ``catastrophic`` says whether that segment falls
    ``steepening`` times faster than the gradual one and loses at least ``min_drop`` retention
    (``shape`` "steeper"). A collapse that levels off (a step down, then a plateau) fits a flat second
    segment, so a second rule looks for it: the first checkpoint from which retention stays more than
    ``min_drop``/2 below the line through the checkpoints before it, and ends ``min_drop`` below both that
    line and the checkpoint before (``shape`` "step"; ``steepening`` plays no part, ``catastrophic_slope`` is
    the fall from the checkpoint before the onset to the lowest one after it). Slopes are per edit;
    ``fit_gain`` is the two-segment fit's.
    """
    ev = run.evals.dropna(subset=["retention"]).sort_values("edit_index")
    x, ret = ev["edit_index"].to_numpy(float), ev["retention"].to_numpy(float)
    out: dict[str, Any] = {"checkpoints": len(ev)}
    if len(ev) < 2 * min_size:
        return dict(out, onset=None, catastrophic=False, shape=None, gradual_slope=slope(x, ret),
                    catastrophic_slope=None, perplexity_onset=None)
    k, gain = change_point(x, ret, min_size)
    before, after = slope(x[:k], ret[:k]), slope(x[k:], ret[k:])
    drop = float(ret[k - 1] - ret[-1])
    catastrophic = bool(after < 0 and after < steepening * min(before, 0) - 1e-12 and drop >= min_drop)
    shape = "steeper" if catastrophic else None
    j = None if catastrophic else departure(x, ret, min_drop / 2, min_size)
    if j is not None:
        gradual = np.polyfit(x[:j], ret[:j], 1)  # the trend departure() left
        if np.polyval(gradual, x[-1]) - ret[-1] >= min_drop and ret[j - 1] - ret[-1] >= min_drop:
            low = j + int(np.argmin(ret[j:]))
            k, catastrophic, shape = j, True, "step"
            span = x[low] - x[j - 1]
            before, after = float(gradual[0]), float((ret[low] - ret[j - 1]) / span) if span > 0 else np.nan
    ppl = run.evals.dropna(subset=["perplexity"]).sort_values("edit_index")
    p_onset = None
    if len(ppl) >= 2 * min_size:
        pk, _ = change_point(ppl["edit_index"].to_numpy(float), np.log(ppl["perplexity"].to_numpy(float)), min_size)
        p_onset = int(ppl["edit_index"].iloc[pk])
    return dict(out, onset=int(x[k]), catastrophic=catastrophic, shape=shape, gradual_slope=before,
                catastrophic_slope=after, retention_at_onset=float(ret[k]), retention_final=float(ret[-1]),
                fit_gain=gain, perplexity_onset=p_onset)
