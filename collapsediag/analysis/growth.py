"""Weight-norm growth of a saved run, and how it goes with forgetting.

>>> relative_growth(run)                 # layers rows with growth = metric / unedited value − 1
>>> spearman_or_nan(growth_vs_forgetting(run))
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from ..runs.store import Run

CANNOT_SAY = "cannot say"


def relative_growth(run: Run, metric: str = "weight_l1") -> pd.DataFrame:
    """The ``layers`` rows that have ``metric``, with ``growth``: the metric over its unedited value (from the
    run's config) minus 1."""
    init = {int(k): v[metric] for k, v in run.config["initial_weights"].items()}
    ly = run.layers.dropna(subset=["edit_index", metric])
    return ly.assign(growth=ly[metric] / ly["layer"].astype(int).map(init) - 1)


def weight_l1_growth(run: Run) -> pd.Series:
    """Largest relative weight_l1 growth over the edited layers, per edit index."""
    return relative_growth(run).groupby("edit_index")["growth"].max()


def growth_vs_forgetting(run: Run) -> list[tuple[float, float]]:
    """(weight_l1 growth, 1 − retention) at every checkpoint of ``run`` that has both."""
    growth = weight_l1_growth(run)
    ev = run.evals.dropna(subset=["retention"])
    return [(float(growth[int(e)]), 1 - float(r)) for e, r in zip(ev["edit_index"], ev["retention"])
            if int(e) in growth.index]


def spearman_or_nan(pts: list[tuple[float, float]]) -> float:
    """Spearman ρ of the points, NaN with fewer than 3 or when the second coordinate never changes."""
    return spearmanr(*zip(*pts)).statistic if len(pts) >= 3 and np.ptp([p[1] for p in pts]) > 0 else np.nan
