"""Norm growth of the edited matrices: per run, per editor family, and the small growths side by side."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.ticker import ScalarFormatter

from ..analysis.growth import relative_growth
from ..runs.store import Run
from .style import (ROME_FAMILY, as_runs, axes_or_new, edit_axis, edits_applied, legend_outside, panel_axes,
                    panel_title, run_labels, run_palette)

NORM_UNITS = {"weight_l1": "‖W‖₁ / numel", "weight_fro": "‖W‖_F", "drift_fro": "‖W − W₀‖_F / numel",
              "drift_l1": "‖W − W₀‖₁ / numel", "delta_fro": "‖ΔW‖_F", "delta_l1": "‖ΔW‖₁ / numel"}


def plot_norm_growth(runs: Run | list[Run], ax: Axes | None = None, metric: str = "weight_l1",
                     layers: list[int] | None = None, relative: bool = True,
                     among: Run | list[Run] | None = None) -> Axes:
    """``weight_l1`` (or another layers-table metric) per edited layer against the edits applied.

    Colour: the run; line style: the layer. ``relative`` divides by the unedited value (from the run's
    config) so runs and layers compare. ``among``: the runs of the whole figure, whose colours and labels
    ``runs`` keep (default: ``runs``).
    """
    ax = axes_or_new(ax)
    runs = as_runs(runs)
    among = as_runs(among) if among is not None else runs
    label_of = {id(r): lab for r, lab in zip(among, run_labels(among))}
    frames = []
    for run in runs:
        label = label_of[id(run)]
        ly = run.layers.dropna(subset=[metric])
        for layer, g in ly.groupby("layer"):
            if layers is not None and layer not in layers:
                continue
            y = g[metric].to_numpy(float)
            init = run.config.get("initial_weights", {}).get(str(int(layer)), {}).get(metric)
            if relative and init:
                y = y / init
            frames.append(pd.DataFrame({"edits applied": edits_applied(g["edit_index"]), "value": y,
                                        "run": label, "layer": int(layer)}))
    if frames:
        d = pd.concat(frames, ignore_index=True)
        many = d.groupby(["run", "layer"]).size().max() >= 30
        sns.lineplot(d, x="edits applied", y="value", hue="run", style="layer", palette=run_palette(among),
                     hue_order=[lab for lab in run_labels(among) if lab in set(d["run"])], estimator=None,
                     errorbar=None, sort=True, ax=ax, **({} if many else {"marker": "."}))
    edit_axis(ax)
    unit = NORM_UNITS.get(metric, metric)
    ax.set_ylabel(f"{unit}, relative to unedited" if relative else unit)
    ax.set_title("Norm growth of the edited matrices")
    legend_outside(ax)
    return ax


FAMILIES = {"ROME family": ROME_FAMILY, "MEMIT family": ("memit", "emmet", "d4s", "alphaedit", "encore")}
OTHER_FAMILY = "other editors"


def editor_family(run: Run) -> str:
    """The name of the run's editor family in ``FAMILIES`` (``OTHER_FAMILY`` for any other editor)."""
    editor = run.config.get("editor")
    return next((name for name, editors in FAMILIES.items() if editor in editors), OTHER_FAMILY)


def plot_norm_growth_by_family(runs: Run | list[Run], ax: Axes | Sequence[Axes] | None = None,
                               metric: str = "weight_l1", relative: bool = True) -> list[Axes]:
    """``plot_norm_growth`` in one panel per editor family (ROME's, MEMIT's, then any other), each on its own y
    scale, so that the MEMIT family's small growth (D4S against MEMIT) is not flattened by ROME's; colours as in
    every other figure. Returns the panels, ROME family first."""
    runs = as_runs(runs)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(editor_family(run), []).append(run)
    names = [n for n in (*FAMILIES, OTHER_FAMILY) if n in groups] or [""]
    axes, own = panel_axes(ax, len(names), 1, sharex=True, panel=(3.6, 2.1))
    for a, name in zip(axes, names):
        plot_norm_growth(groups.get(name, []), ax=a, metric=metric, relative=relative, among=runs)
        a.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))  # 1.0002, not 1 + 2e-4
        a.set_title("")
        a.set_title(f"{name}: " + ", ".join(dict.fromkeys(str(r.config.get("editor")) for r in groups[name]))
                    if name else "", loc="left")
    for a in axes[:-1]:
        a.set_xlabel("")
    if own:
        axes[0].figure.suptitle("Norm growth of the edited matrices")
    return axes


def plot_norm_comparison(runs: Run | list[Run], ax: Axes | Sequence[Axes] | None = None) -> list[Axes]:
    """Two panels, one line per run, for comparing editors whose growth is small: the growth of ‖W‖₁ (mean over
    the edited layers, % of the unedited value) and of σ₁(W) (largest over the edited layers, % of σ₁(W₀))."""
    runs = as_runs(runs)
    axes, own = panel_axes(ax, 2, 2, sharex=True, panel=(3.0, 2.2))
    rows = []
    for run, label in zip(runs, run_labels(runs)):
        ly = relative_growth(run)
        s1 = ly["weight_sigma1_ratio"] if "weight_sigma1_ratio" in ly else np.nan
        per = ly.assign(s1=s1).groupby("edit_index").agg(l1=("growth", "mean"), s1=("s1", "max"))
        rows.append(pd.DataFrame({"edits applied": edits_applied(per.index), "run": label,
                                  "l1": 100 * per["l1"].to_numpy(float),
                                  "s1": 100 * (per["s1"].to_numpy(float) - 1)}))
    d = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["edits applied", "run", "l1", "s1"])
    order = [lab for lab in run_labels(runs) if lab in set(d["run"])]
    drawn = []
    for a, col, ylabel in zip(axes, ("l1", "s1"), ("‖W‖₁ growth, % (mean of layers)", "σ₁(W) growth, % (largest layer)")):
        sel = d.dropna(subset=[col])
        if len(sel):
            sns.lineplot(sel, x="edits applied", y=col, hue="run", hue_order=order, palette=run_palette(runs),
                         estimator=None, errorbar=None, sort=True, ax=a)
            drawn.append(a)
        a.axhline(0, color="0.6", lw=0.8, gid="reference")
        a.set_ylabel(ylabel)
        edit_axis(a)
    for a in drawn[:-1]:
        a.get_legend().remove()
    legend_outside(drawn[-1] if drawn else axes[1])
    panel_title(axes, own, "Norm growth of the edited matrices, side by side")
    return axes
