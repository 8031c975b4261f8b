"""Downstream accuracy against the edits applied: one panel per task, chance as a dashed line."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from ..runs.store import Run
from ..signals.downstream_score import downstream_summary
from .style import as_runs, edit_axis, panel_axes, panel_title, run_labels, run_palette

def plot_downstream(runs: Run | list[Run], ax: Axes | Sequence[Axes] | None = None) -> list[Axes]:
    """Downstream accuracy against the edits applied: one panel per task, one line per run, chance as a dashed
    line. A run for which a task is uninformative (its unedited 95 % interval holds chance) is drawn faint and
    the panel's title says so. Returns the panels, tasks in order of first appearance."""
    runs = as_runs(runs)
    labels, colours = run_labels(runs), run_palette(runs)
    tasks = list(dict.fromkeys(t for r in runs for t in r.downstream["task"].dropna()))
    axes, own = panel_axes(ax, max(len(tasks), 1), min(len(tasks), 3) or 1, sharex=False, panel=(2.6, 1.9))
    for a, task in zip(axes, tasks):
        faint, drawn, chance = 0, 0, []
        for run, label in zip(runs, labels):
            d = run.downstream[run.downstream["task"] == task].dropna(subset=["accuracy"]).sort_values("edit_index")
            if not len(d):
                continue
            info = downstream_summary(run).set_index("task").loc[task, "informative"]
            faint += not info
            drawn += 1
            a.plot(d["edit_index"].to_numpy(int) + 1, d["accuracy"].to_numpy(float), marker=".", label=label,
                   color=colours[label], alpha=1.0 if info else 0.35)
            chance.append(float(d["chance"].iloc[0]))
        for c in sorted(set(np.round(chance, 3))):
            a.axhline(c, color="0.4", linestyle="--", linewidth=0.9)
        note = "" if not faint else " (uninformative)" if faint == drawn else \
            f" (faint: uninformative, {faint}/{drawn})"
        a.set_title(task + note, loc="left")
        a.set_ylim(-0.03, 1.03)
        a.set_ylabel("accuracy")
        edit_axis(a)
    if tasks:
        handles = [Line2D([], [], color=colours[lab], marker=".", label=lab)
                   for run, lab in zip(runs, labels) if len(run.downstream)]
        handles.append(Line2D([], [], color="0.4", linestyle="--", label="chance"))
        axes[min(len(tasks), 3) - 1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1),
                                            frameon=False)
    panel_title(axes, own, "Downstream accuracy")
    return axes
