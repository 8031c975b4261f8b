"""Key geometry of the edits: the denominator against the update's norm, the key statistics, batch neighborhood."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator, ScalarFormatter

from ..runs.store import Run
from .style import (ROME_FAMILY, as_runs, axes_or_new, legend_outside, log_if_wide, panel_axes, run_labels,
                    run_palette)

def _layer_edits(run: Run) -> pd.DataFrame:
    cols = ["edit_index", "subject_first_token", "case_id"]
    return run.layers.merge(run.edits[cols], on="edit_index", how="left")


DENOMINATOR_PANELS = {  # title, x label (key units)
    "rome": ("ROME family: one edit per update", "scalar denominator k_uᵀu (ROME), k̄ᵀu (r-ROME)"),
    "batched": ("Batched editors: one update per batch",
                "λ_min of KᵀA⁻¹K (MEMIT, D4S), D (EMMET), K̃ᵀG⁻¹K̃ (AlphaEdit)"),
}


def plot_denominator_vs_norm(runs: Run | list[Run], ax: Axes | Sequence[Axes] | None = None) -> list[Axes]:
    """Update denominator against ‖ΔW‖_F per edited layer, in separate panels for the ROME family (a
    scalar denominator per edit; marker: whether the subject is the prompt's first token) and the batched
    editors (the smallest eigenvalue of the batch's n×n matrix; marker: the layer). Panels without data are
    dropped; returns the panels drawn (ROME family first)."""
    runs = as_runs(runs)
    data: dict[str, list[pd.DataFrame]] = {"rome": [], "batched": []}
    for run, label in zip(runs, run_labels(runs)):
        d = _layer_edits(run).dropna(subset=["denominator", "delta_fro"])
        if not len(d):
            continue
        family = "rome" if run.config.get("editor") in ROME_FAMILY else "batched"
        first = d["subject_first_token"].astype("boolean")
        data[family].append(pd.DataFrame({
            "denominator": d["denominator"].to_numpy(float), "delta_fro": d["delta_fro"].to_numpy(float),
            "run": label, "layer": d["layer"].to_numpy(int),
            "subject is the first token": np.where(first.isna(), "unknown", np.where(first.fillna(False), "yes", "no"))}))
    families = [f for f in ("rome", "batched") if data[f]]
    axes, own = panel_axes(ax, max(len(families), 1), 1, panel=(3.6, 2.3))
    palette = run_palette(runs)
    for a, family in zip(axes, families):
        d = pd.concat(data[family], ignore_index=True)
        order = [lab for lab in run_labels(runs) if lab in set(d["run"])]
        if family == "rome":
            styles = [s for s in ("no", "yes", "unknown") if s in set(d["subject is the first token"])]
            sns.scatterplot(d, x="denominator", y="delta_fro", hue="run", hue_order=order, palette=palette,
                            style="subject is the first token", style_order=styles,
                            markers={"no": "o", "yes": "X", "unknown": "s"}, s=28, alpha=0.85, ax=a)
        else:
            sns.scatterplot(d, x="denominator", y="delta_fro", hue="run", hue_order=order, palette=palette,
                            style="layer", s=24, alpha=0.85, ax=a)
        title, xlabel = DENOMINATOR_PANELS[family]
        a.set_title(title, loc="left")
        a.set_xlabel(f"{xlabel}, key units")
        a.xaxis.set_major_locator(MaxNLocator(5))
        logged = log_if_wide(a, d["delta_fro"])
        a.set_ylabel("‖ΔW‖_F" + (" (log scale)" if logged else ""))
        legend_outside(a)
    if not families:
        a = axes[0]
        a.text(0.5, 0.5, "no update denominators recorded", ha="center", va="center", transform=a.transAxes)
        a.set_xlabel("update denominator, key units")
        a.set_ylabel("‖ΔW‖_F")
    if own:
        axes[0].figure.suptitle("Small denominators make large updates")
    return axes


def plot_key_stats(runs: Run | list[Run], ax: Axes | None = None) -> Axes:
    """Mahalanobis norm √(kᵀC⁻¹k) of the prefixed against the unprefixed key (ROME family), coloured by
    cos(k_u, k̄) (colour bar), one marker per run (legend above the axes)."""
    ax = axes_or_new(ax)
    runs = as_runs(runs)
    markers = "osD^v<>"
    sc = None
    lo, hi = np.inf, -np.inf
    for i, (run, label) in enumerate(zip(runs, run_labels(runs))):
        d = run.layers.dropna(subset=["key_mahalanobis_prefixed", "key_mahalanobis_unprefixed"])
        if not len(d):
            continue
        sc = ax.scatter(d["key_mahalanobis_prefixed"], d["key_mahalanobis_unprefixed"], c=d["key_cosine"],
                        cmap="viridis", vmin=0, vmax=1, s=18, marker=markers[i % len(markers)], label=label,
                        edgecolors="0.3", linewidths=0.3)
        lo = min(lo, d["key_mahalanobis_prefixed"].min(), d["key_mahalanobis_unprefixed"].min())
        hi = max(hi, d["key_mahalanobis_prefixed"].max(), d["key_mahalanobis_unprefixed"].max())
    rows = 0
    if sc is not None:
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=0.8, ls="--", label="_equal")
        ax.figure.colorbar(sc, ax=ax, label="cos(k_u, k̄)")
        drawn = ax.get_legend_handles_labels()[1]
        # legend markers in grey: their colour in the plot is the cosine
        grey = [Line2D([], [], ls="", marker=markers[i % len(markers)], color="0.45", label=lab)
                for i, lab in enumerate(run_labels(runs)) if lab in drawn]
        ncol = min(len(grey), 2)
        rows = -(-len(grey) // ncol)
        ax.legend(handles=grey, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=ncol, frameon=False,
                  borderaxespad=0)
    ax.set_xlabel("√(k̄ᵀC⁻¹k̄), prefixed keys (Mahalanobis norm)")
    ax.set_ylabel("√(k_uᵀC⁻¹k_u), unprefixed key")
    ax.set_title("Prefixed vs unprefixed keys", pad=6 + 11 * rows)
    return ax


def batch_table(runs: Run | list[Run]) -> pd.DataFrame:
    """Per run: editor, mode, batch size, and the mean neighborhood score right after each batch and at the
    last checkpoint."""
    rows = []
    for run in as_runs(runs):
        e = run.edits[run.edits["status"] == "ok"]
        ev = run.evals.dropna(subset=["neighborhood_score"])
        rows.append({"run": run.path.name, "editor": run.config.get("editor"), "mode": run.config.get("mode"),
                     "batch_size": int(run.config.get("batch_size") or 1), "edits": len(run.edits),
                     "neighborhood_after_batch": float(e["neighborhood_score"].mean()),
                     "neighborhood_final": float(ev["neighborhood_score"].iloc[-1]) if len(ev) else np.nan})
    return pd.DataFrame(rows)


def plot_batch_neighborhood(runs: Run | list[Run], ax: Axes | None = None) -> Axes:
    """Neighborhood score against batch size, one colour per editor (batch and sequential-batch runs
    alike), solid right after each batch and dashed at the last checkpoint."""
    ax = axes_or_new(ax)
    t = batch_table(runs).sort_values("batch_size", kind="stable")
    d = pd.concat([t.assign(score=t["neighborhood_after_batch"], when="after its batch"),
                   t.assign(score=t["neighborhood_final"], when="at the last checkpoint")],
                  ignore_index=True).dropna(subset=["score"])
    editors = list(dict.fromkeys(t["editor"]))
    sns.lineplot(d, x="batch_size", y="score", hue="editor", hue_order=editors, style="when",
                 style_order=[w for w in ("after its batch", "at the last checkpoint") if w in set(d["when"])],
                 markers={"after its batch": "o", "at the last checkpoint": "s"}, dashes=True, estimator=None,
                 errorbar=None, sort=True, ax=ax)
    ax.set_xscale("log", base=2)
    sizes = sorted(set(t["batch_size"]))
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("edits per update (batch size, log scale)")
    ax.set_ylabel("neighborhood score (share)")
    ax.set_title("Batch size and locality")
    legend_outside(ax)
    return ax
