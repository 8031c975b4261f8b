"""Forgetting over the edits: retention and efficacy, the spectral norm, and the early warnings against the onset."""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes

from ..analysis.warning import collapse_phases, early_warning
from ..runs.store import Run
from .style import (as_runs, edit_axis, edits_applied, legend_outside, panel_axes, panel_title, run_labels,
                    run_palette)

FORGETTING = {"retention": "retention", "efficacy": "efficacy", "paraphrase_score": "paraphrase score",
              "neighborhood_score": "neighborhood score"}


def plot_forgetting(runs: Run | list[Run], ax: Axes | Sequence[Axes] | None = None,
                    metrics: tuple[str, ...] = ("retention", "efficacy", "paraphrase_score", "neighborhood_score")
                    ) -> list[Axes]:
    """Retention and the scores over earlier edits at each checkpoint, against the edits applied: one
    panel per metric (same y range), one line per run. Returns the panels, in ``metrics`` order."""
    runs = as_runs(runs)
    ncols = len(metrics) if len(metrics) <= 3 else 2 if len(metrics) == 4 else 3
    axes, own = panel_axes(ax, len(metrics), ncols, sharex=True, panel=(2.6, 1.9))
    rows = []
    for run, label in zip(runs, run_labels(runs)):
        ev = run.evals.dropna(subset=["edit_index"])
        ev = ev[ev["edit_index"] >= 0]
        rows.append(pd.DataFrame({"edits applied": edits_applied(ev["edit_index"]), "run": label,
                                  **{m: ev[m].to_numpy(float) for m in metrics}}))
    d = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["edits applied", "run", *metrics])
    order = [lab for lab in run_labels(runs) if lab in set(d["run"])]
    legend_at = min(ncols, len(metrics)) - 1  # the top-right panel carries the legend
    for i, (a, metric) in enumerate(zip(axes, metrics)):
        sel = d.dropna(subset=[metric])
        if len(sel):
            sns.lineplot(sel, x="edits applied", y=metric, hue="run", hue_order=order, palette=run_palette(runs),
                         style="run", style_order=order, markers=True, markersize=4, dashes=True, estimator=None,
                         errorbar=None, sort=True, ax=a, legend=i == legend_at)
        a.set_ylim(-0.03, 1.03)
        a.set_ylabel(f"{FORGETTING.get(metric, metric)} (share)")
        edit_axis(a, "edits applied" if i >= len(metrics) - ncols else "")
        if i == legend_at:
            legend_outside(a)
    panel_title(axes, own, "Forgetting of earlier edits")
    return axes


def plot_spectral(runs: Run | list[Run], ax: Axes | Sequence[Axes] | None = None) -> list[Axes]:
    """Two panels against the edits applied, one line per run: σ₁(W)/σ₁(W₀) (largest over the edited layers)
    and ‖v*‖/‖v_init‖ (rolling median over 10 edits): the norm growth and the value-norm feedback loop."""
    runs = as_runs(runs)
    axes, own = panel_axes(ax, 2, 2, sharex=True, panel=(3.0, 2.2))
    rows = []
    for run, label in zip(runs, run_labels(runs)):
        ly = run.layers.dropna(subset=["edit_index"])
        per = ly.groupby("edit_index").agg(s1=("weight_sigma1_ratio", "max"), v=("v_star_ratio", "mean"))
        per["v"] = per["v"].rolling(10, min_periods=1).median()
        rows.append(pd.DataFrame({"edits applied": edits_applied(per.index), "run": label,
                                  "s1": per["s1"].to_numpy(float), "v": per["v"].to_numpy(float)}))
    d = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["edits applied", "run", "s1", "v"])
    order = [lab for lab in run_labels(runs) if lab in set(d["run"])]
    for i, (a, col, ylabel) in enumerate(zip(axes, ("s1", "v"), ("σ₁(W) / σ₁(W₀)", "‖v*‖ / ‖v_init‖ (median of 10)"))):
        sel = d.dropna(subset=[col])
        if len(sel):
            sns.lineplot(sel, x="edits applied", y=col, hue="run", hue_order=order, palette=run_palette(runs),
                         estimator=None, errorbar=None, sort=True, ax=a, legend=i == 1)
        a.set_ylabel(ylabel)
        edit_axis(a)
    legend_outside(axes[1])
    title = "Spectral norm and value-norm growth"
    panel_title(axes, own, title)
    return axes


def plot_warnings(runs: Run | list[Run], ax: Axes | Sequence[Axes] | None = None) -> list[Axes]:
    """One panel per run: retention at each checkpoint, the first early warning (dashed), the first warning
    after the gradual phase (dotted, ``warning_lead``'s collapse_warning) and the catastrophic onset that
    ``collapse_phases`` finds (solid: a disabling edit, or on a run with enough checkpoints the onset of
    ``forgetting_phases``), so the lead of the warnings is read off the edit axis."""
    runs = as_runs(runs)
    ncols = min(3, len(runs))
    axes, own = panel_axes(ax, len(runs), ncols, sharex=True, panel=(2.4, 1.8))
    colours = run_palette(runs)
    for a, run, label in zip(axes, runs, run_labels(runs)):
        ev = run.evals.dropna(subset=["retention"])
        a.plot(edits_applied(ev["edit_index"]), ev["retention"], marker=".", color=colours[label])
        warns = early_warning(run)
        if len(warns):
            first = warns.iloc[0]
            a.axvline(first["edit_index"] + 1, ls="--", color="tab:orange",
                      label=f"first warning ({first['signal']})")
        ph = collapse_phases(run, warns)
        if ph["catastrophic"] is True:  # not "too few checkpoints"
            a.axvline(ph["onset"] + 1, ls="-", color="tab:red", label="disabling edit" if
                      ph.get("shape") == "disabling edit" else "catastrophic onset")
            if ph["collapse_warning"] is not None and ph["collapse_warning"] != ph["first_warning"]:
                a.axvline(ph["collapse_warning"] + 1, ls=":", color="tab:purple",
                          label=f"warning in the collapse ({ph['collapse_signal']})")
        a.set_ylim(-0.03, 1.03)
        a.set_title(label, fontsize="small")
        a.set_ylabel("retention")
        edit_axis(a)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize="x-small", loc="lower left")
    title = "Early warnings (edit-time signals) against forgetting"
    panel_title(axes, own, title)
    return axes
