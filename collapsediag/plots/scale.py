"""The scale study from its compact tables (``scripts/scale_report.py``): one line per run, runs of earlier
sittings included, whose run folders may be gone.

Panels against the edits applied: retention of earlier edits (0 to 1, so that a collapse and a drift of a
few points look as different as they are), held-out perplexity over the unedited model's (log scale once it
spans a decade), the largest edited layer's ‖W‖_F growth, and the downstream accuracy of each task (chance
dashed; a run for which a task is uninformative, its unedited 95 % interval holding chance, is drawn faint).
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from ..signals.downstream_score import is_informative
from .style import edit_axis, log_if_wide, panel_axes, panel_title


def plot_scale(checkpoints: pd.DataFrame, downstream: pd.DataFrame, growth: pd.DataFrame,
               ax: Axes | Sequence[Axes] | None = None) -> list[Axes]:
    """The scale study's curves from its compact tables (``checkpoints.csv``, ``downstream.csv``,
    ``growth.csv``, each with a ``run`` column): retention, perplexity ratio, ‖W‖_F growth, then one panel
    per downstream task. Returns the panels."""
    runs = sorted(set(checkpoints["run"]) | set(growth["run"]) | set(downstream["run"]))
    colours = dict(zip(runs, sns.color_palette("tab10", max(len(runs), 1)).as_hex()))
    tasks = list(dict.fromkeys(downstream["task"].dropna())) if len(downstream) else []
    axes, own = panel_axes(ax, 3 + len(tasks), 3, sharex=False, panel=(2.6, 1.9))
    faint: dict[str, list[bool]] = {t: [] for t in tasks}
    ratios: list[float] = []
    for run in runs:
        c = checkpoints[checkpoints["run"] == run].sort_values("edit_index")
        x = c["edit_index"].to_numpy(int) + 1
        kept = c["retention"].notna().to_numpy()
        axes[0].plot(x[kept], c["retention"].to_numpy(float)[kept], marker=".", color=colours[run])
        base = c.loc[c["edit_index"] < 0, "perplexity"]
        if len(base):
            ratio = c["perplexity"].to_numpy(float) / float(base.iloc[0])
            ratios.extend(ratio)
            axes[1].plot(x, ratio, marker=".", color=colours[run])
        g = growth[growth["run"] == run].sort_values("edit_index")
        axes[2].plot([0, *(g["edit_index"].to_numpy(int) + 1)], [0.0, *g["weight_fro_growth_pct"].to_numpy(float)],
                     marker=".", color=colours[run])
        for a, task in zip(axes[3:], tasks):
            d = downstream[(downstream["run"] == run) & (downstream["task"] == task)].sort_values("edit_index")
            if not len(d):
                continue
            first = d.iloc[0]
            info = is_informative(float(first["accuracy"]), int(first["n"]), float(first["chance"]))
            faint[task].append(not info)
            a.plot(d["edit_index"].to_numpy(int) + 1, d["accuracy"].to_numpy(float), marker=".", color=colours[run],
                   alpha=1.0 if info else 0.35)
    for a, task in zip(axes[3:], tasks):
        chance = downstream.loc[downstream["task"] == task, "chance"].dropna()
        if len(chance):
            a.axhline(float(chance.iloc[0]), color="0.4", linestyle="--", linewidth=0.9)
        a.set_ylim(-0.03, 1.03)
        a.set_title(task + (" (uninformative)" if faint[task] and all(faint[task]) else ""), loc="left")
        a.set_ylabel("accuracy")
    for a, (title, label) in zip(axes, [("retention", "retention of earlier edits"),
                                        ("perplexity", "× unedited"), ("‖W‖_F growth", "% over W₀, largest layer")]):
        a.set_title(title, loc="left")
        a.set_ylabel(label)
    axes[0].set_ylim(-0.02, 1.02)
    if not log_if_wide(axes[1], ratios):
        axes[1].set_ylim(bottom=min([0.95, *ratios]), top=max([1.5, *ratios]) * 1.05)
    last = max([0, *(t["edit_index"].max() + 1 for t in (checkpoints, downstream, growth) if len(t))])
    for a in axes:
        edit_axis(a)
        a.set_xlim(0, last * 1.03 or 1)
    handles = [Line2D([], [], color=colours[r], marker=".", label=r) for r in runs]
    if tasks:
        handles.append(Line2D([], [], color="0.4", linestyle="--", label="chance"))
    axes[2].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    panel_title(axes, own, "Sequential batches of 100: forgetting, fluency, norm growth and downstream ability")
    return axes
