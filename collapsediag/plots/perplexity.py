"""Held-out perplexity and generation entropy at each checkpoint, with the flagged and confirmed disabling edits."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ..runs.store import Run
from .style import (as_runs, edit_axis, edits_applied, label_points, legend_outside, log_if_wide, panel_axes,
                    panel_title, plain_log_ticks, run_labels, run_palette, short_label)

def _per_run(value: Any, runs: list[Run], what: str) -> list[Any]:
    """``value`` for each run: a list aligned with the runs, a mapping keyed by the run's directory name (or
    path), a frame with a ``run`` column, or one value for every run."""
    if value is None:
        return [None] * len(runs)
    if isinstance(value, list):
        if len(value) != len(runs):
            raise ValueError(f"{what}: {len(value)} entries for {len(runs)} runs")
        return value
    if isinstance(value, Mapping):
        return [value.get(r.path.name, value.get(str(r.path))) for r in runs]
    if isinstance(value, pd.DataFrame) and "run" in value.columns:
        return [value[value["run"].astype(str).isin([r.path.name, str(r.path)])] for r in runs]
    return [value] * len(runs)


def _edit_set(value: Any) -> list[int]:
    """Edit indices from a frame (``edit_index``, rows with ``disabling`` true where it has that column) or an
    iterable of indices."""
    if value is None:
        return []
    if isinstance(value, pd.DataFrame):
        if "disabling" in value.columns:
            value = value[value["disabling"].astype(bool)]
        return sorted({int(x) for x in value["edit_index"].dropna()})
    return sorted({int(x) for x in value})


def _checkpoint_of(ev: pd.DataFrame, edit: int) -> pd.Series | None:
    """The first checkpoint at or after ``edit`` (None when the run has none)."""
    after = ev[ev["edit_index"] >= edit]
    return after.iloc[0] if len(after) else None


def plot_perplexity(runs: Run | list[Run], flags: pd.DataFrame | list[pd.DataFrame] | Mapping | None = None,
                    ax: Axes | Sequence[Axes] | None = None, entropy: bool = True,
                    disabling: Mapping | pd.DataFrame | None = None) -> list[Axes]:
    """Held-out perplexity against the edits applied (log scale when it spans a decade) and, in a second
    panel below it, generation entropy; flagged and confirmed disabling edits marked and labelled.

    ``flags``: ``flag_disabling_edits`` frames (a list aligned with the runs, a mapping keyed by run
    directory name, or one frame for every run). Each flagged edit is ringed in its run's colour at the
    perplexity of its checkpoint, or of the next checkpoint when it has none (a layer-level signal between
    checkpoints), and labelled ``edit <edit_index>: <case id>``. ``disabling``: confirmed disabling edits the
    same way (``confirm_disabling_edits`` frames, rows with ``disabling`` true, or edit indices; a mapping
    by run name or a frame with a ``run`` column), marked with a red X. Returns the panels (perplexity,
    then entropy when ``entropy`` and the runs recorded it).
    """
    runs = as_runs(runs)
    labels, palette = run_labels(runs), run_palette(runs)
    flag_list, dis_list = _per_run(flags, runs, "flags"), _per_run(disabling, runs, "disabling")
    evs = [r.evals.dropna(subset=["perplexity"]).sort_values("edit_index") for r in runs]
    d = pd.concat([pd.DataFrame(columns=["edits applied", "run", "perplexity", "entropy"])]
                  + [pd.DataFrame({"edits applied": edits_applied(ev["edit_index"]), "run": lab,
                                   "perplexity": ev["perplexity"].to_numpy(float),
                                   "entropy": ev["generation_entropy"].to_numpy(float)})
                     for ev, lab in zip(evs, labels)], ignore_index=True)
    with_entropy = entropy and d["entropy"].notna().any()
    axes, own = panel_axes(ax, 2 if with_entropy else 1, 1, sharex=True, panel=(3.6, 1.9))
    order = [lab for lab in labels if lab in set(d["run"])]
    common = dict(hue="run", hue_order=order, palette=palette, style="run", style_order=order, markers=True,
                  markersize=4, dashes=True, estimator=None, errorbar=None, sort=True)
    if len(d):
        sns.lineplot(d, x="edits applied", y="perplexity", ax=axes[0], **common)
        if with_entropy:
            sns.lineplot(d.dropna(subset=["entropy"]), x="edits applied", y="entropy", ax=axes[1], legend=False,
                         **common)
    marks: list[dict[str, Any]] = []
    for run, lab, ev, fl, dis in zip(runs, labels, evs, flag_list, dis_list):
        case = dict(zip(run.edits["edit_index"].astype(int), run.edits["case_id"].astype(str)))
        confirmed = set(_edit_set(dis))
        flagged = set(_edit_set(fl)) - confirmed
        for kind, edits in (("flagged", flagged), ("disabling", confirmed)):
            for e in sorted(edits):
                cp = _checkpoint_of(ev, e)
                if cp is None:
                    continue
                marks.append({"run": lab, "kind": kind, "edit": e, "x": int(edits_applied(cp["edit_index"])),
                              "perplexity": float(cp["perplexity"]), "entropy": float(cp["generation_entropy"]),
                              "text": f"edit {e}: {short_label(case.get(e, '?'))}"
                                      + (" (disabling)" if kind == "disabling" else "")})
    style = {"flagged": dict(marker="o", s=70, linewidths=1.3, zorder=4),
             "disabling": dict(marker="X", s=60, color="red", edgecolors="white", linewidths=0.5, zorder=5)}
    m = pd.DataFrame(marks, columns=["run", "kind", "edit", "x", "perplexity", "entropy", "text"])
    for (kind, lab), g in m.groupby(["kind", "run"], sort=False):
        kw = style[kind] if kind == "disabling" else dict(style[kind], facecolors="none", edgecolors=palette[lab])
        for a, y in zip(axes, ("perplexity", "entropy")):
            a.scatter(g["x"], g[y], label=f"_{kind}", gid=f"{kind}:{lab}", **kw)
    logged = log_if_wide(axes[0], d["perplexity"])
    if logged:
        plain_log_ticks(axes[0])
    axes[0].set_ylabel("held-out perplexity" + ("\n(log scale)" if logged else ""))
    axes[0].margins(y=0.25)
    label_points(axes[0], [(x, g["perplexity"].iloc[0], "\n".join(g["text"]), palette[lab])  # its edits a line each
                            for (lab, x), g in m.groupby(["run", "x"], sort=False)])
    extra = []
    if (m["kind"] == "flagged").any():
        extra.append((Line2D([], [], ls="", marker="o", markerfacecolor="none", markeredgecolor="0.3", markersize=7),
                      "flagged edit"))
    if (m["kind"] == "disabling").any():
        extra.append((Line2D([], [], ls="", marker="X", color="red", markersize=7), "confirmed disabling"))
    legend_outside(axes[0], extra)
    if with_entropy:
        axes[1].set_ylabel("generation entropy\n(bits)")
        axes[1].margins(y=0.15)
    for a in axes[:-1]:
        a.set_xlabel("")
    edit_axis(axes[-1])
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    panel_title(axes, own, "Model-level collapse signals")
    return axes
