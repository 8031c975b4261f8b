"""plot_scale: the scale study's figure drawn from its compact tables."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from collapsediag.plots import plot_scale  # noqa: E402


def _tables(blow_up: float):
    cp = pd.DataFrame([{"run": r, "edit_index": e, "retention": None if e < 0 else 1 - e / 1000,
                        "perplexity": 8.0 * (blow_up if r == "b" and e > 200 else 1.0)}
                       for r in ("a", "b") for e in (-1, 199, 399)])
    ds = pd.DataFrame([{"run": r, "edit_index": e, "task": t, "n": 200, "accuracy": acc, "chance": 0.5}
                       for r in ("a", "b") for e in (-1, 399)
                       for t, acc in (("sst2", 0.52), ("mine", 0.9))])
    gr = pd.DataFrame([{"run": r, "edit_index": e, "weight_fro_growth_pct": e / 100} for r in ("a", "b")
                       for e in (99, 199, 299, 399)])
    return cp, ds, gr


def test_panels_lines_and_the_uninformative_task():
    axes = plot_scale(*_tables(1.0))
    assert [a.get_title(loc="left") for a in axes] == ["retention", "perplexity", "‖W‖_F growth",
                                                       "sst2 (uninformative)", "mine"]
    assert all(len(a.get_lines()) >= 2 for a in axes)  # one line per run (plus chance)
    assert axes[0].get_ylim() == (-0.02, 1.02) and axes[1].get_yscale() == "linear"
    sst2 = [ln for ln in axes[3].get_lines() if ln.get_linestyle() == "-"]
    assert all(ln.get_alpha() == 0.35 for ln in sst2)  # 0.52 of 200 holds chance 0.5: faint
    assert all(ln.get_alpha() == 1.0 for ln in axes[4].get_lines() if ln.get_linestyle() == "-")
    assert axes[2].get_lines()[0].get_xdata()[0] == 0  # growth starts at the unedited model
    plt.close("all")


def test_a_perplexity_blow_up_goes_to_a_log_axis():
    axes = plot_scale(*_tables(50.0))
    assert axes[1].get_yscale() == "log"
    plt.close("all")
