"""Figures of saved runs (DESIGN.md §6) and of a pre-edit risk scan (``collapsediag.scan``).

Every ``plot_*`` takes runs (one or several, overlaid) and an optional ``ax``, never shows or saves
anything itself, and puts one quantity on each axis. Colours (one per run, the same in every figure),
line styles, markers and legends are mapped by seaborn from tidy frames; legends sit outside the data.

Single-panel figures return their Axes. Figures of several quantities draw one panel per quantity and
return the list of panel Axes: ``plot_forgetting`` (one panel per metric), ``plot_denominator_vs_norm``
(ROME family, batched editors: the panels with data), ``plot_norm_growth_by_family`` (one panel per editor
family) and ``plot_perplexity`` (perplexity, then generation entropy). Their ``ax`` is None (a new figure),
one Axes (its area is split into the panels) or a sequence of Axes (one per panel). Every edit axis is the
edits applied (``edits_applied``: edit_index + 1, the unedited model at 0) and starts at 0.

>>> fig, ax = plt.subplots()
>>> plot_norm_growth([load_run("runs/rome"), load_run("runs/r-rome")], ax=ax)
>>> ppl_ax, entropy_ax = plot_perplexity(runs, [flag_disabling_edits(r) for r in runs])
>>> plot_risk_scan(read_scan("scan.parquet"), confirmed={"own-person-shakespeare"})
"""
from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator, ScalarFormatter

from .store import Run

PAPER_RC = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 7.5,
            "xtick.labelsize": 8, "ytick.labelsize": 8, "figure.dpi": 150, "savefig.bbox": "tight",
            "axes.spines.top": False, "axes.spines.right": False, "lines.linewidth": 1.4, "pdf.fonttype": 42}

ROME_FAMILY = ("rome", "r-rome")
SIZE = (5.0, 3.4)  # one panel with its legend beside it, inches


@contextlib.contextmanager
def paper_style() -> Iterator[None]:
    """Matplotlib settings for paper figures (readable fonts, no top/right spines, embedded fonts)."""
    with plt.rc_context(PAPER_RC):
        yield


def run_label(run: Run) -> str:
    """``editor, mode B`` for legends (e.g. "memit, sequential-batch 16", "memit, batch 64")."""
    cfg = run.config
    mode, b = cfg.get("mode", "sequential"), cfg.get("batch_size", 1)
    return f"{cfg.get('editor')}, {mode}" + (f" {b}" if mode in ("sequential-batch", "batch") else "")


def _runs(runs: Run | list[Run]) -> list[Run]:
    return [runs] if isinstance(runs, Run) else list(runs)


def _labels(runs: list[Run]) -> list[str]:
    """One legend label per run, made unique with the run's directory name where two runs share one."""
    labels = [run_label(r) for r in runs]
    return [f"{lab} ({r.path.name})" if labels.count(lab) > 1 else lab for lab, r in zip(labels, runs)]


def _palette(runs: list[Run]) -> dict[str, str]:
    """Run label → colour: the i-th run gets the i-th colour of the cycle in every figure."""
    return {lab: f"C{i % 10}" for i, lab in enumerate(_labels(runs))}


def _ax(ax: Axes | None) -> Axes:
    return ax if ax is not None else plt.subplots(figsize=SIZE)[1]


def _panels(ax: Axes | Sequence[Axes] | None, n: int, ncols: int = 1, sharex: bool = False,
            panel: tuple[float, float] = (3.4, 2.2)) -> tuple[list[Axes], bool]:
    """``n`` panels in a grid of ``ncols`` columns, and whether they are a new figure of their own.

    ``ax`` None: a new figure (``panel`` inches each, plus room for the legend); one Axes: its area split
    into the grid; a sequence: its first ``n`` Axes.
    """
    nrows = -(-n // ncols)
    if ax is None:
        fig, grid = plt.subplots(nrows, ncols, squeeze=False, sharex=sharex, layout="constrained",
                                 figsize=(panel[0] * ncols + 1.8, panel[1] * nrows + 0.5))
        axes = list(grid.flat)
        for extra in axes[n:]:
            extra.remove()
        return axes[:n], True
    if isinstance(ax, Axes):
        if n == 1:
            return [ax], False
        fig = ax.figure
        spec = ax.get_subplotspec()
        if spec is not None:
            gs = spec.subgridspec(nrows, ncols, hspace=0.3 if sharex else 0.9, wspace=0.45)
            ax.set_subplotspec(gs[0])
            axes = [ax] + [fig.add_subplot(gs[i], sharex=ax if sharex else None) for i in range(1, n)]
        else:  # an Axes placed by position: cut its rectangle
            x0, y0, w, h = ax.get_position().bounds
            cw, rh = w / ncols, h / nrows
            rects = [(x0 + (i % ncols) * cw, y0 + h - (i // ncols + 1) * rh, cw * 0.8, rh * 0.75) for i in range(n)]
            ax.set_position(rects[0])
            axes = [ax] + [fig.add_axes(r, sharex=ax if sharex else None) for r in rects[1:]]
        if sharex:
            for a in axes[:-ncols]:
                a.tick_params(labelbottom=False)
        return axes, False
    axes = list(np.asarray(ax, dtype=object).ravel())
    if len(axes) < n:
        raise ValueError(f"this figure draws {n} panels, got {len(axes)} axes")
    return axes[:n], False


def _panel_title(axes: list[Axes], own: bool, title: str) -> None:
    """The title of a group of panels: the figure's when they are a figure of their own, else the first panel's."""
    if own:
        axes[0].figure.suptitle(title)
    else:
        axes[0].set_title(title, loc="left")


def edits_applied(edit_index: Any) -> Any:
    """The x of every edit axis: edits applied after an edit (edit_index + 1; the unedited model's checkpoint,
    edit_index −1, is at 0)."""
    return np.asarray(edit_index, dtype=int) + 1


def _edit_axis(ax: Axes, label: str = "edits applied") -> None:
    """An x axis of edits applied (``edits_applied``): integer ticks only, starting at 0 in every figure."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(left=0)
    ax.set_xlabel(label)


def _plain_log_ticks(ax: Axes, axis: str = "y") -> None:
    """Log-scaled ticks written as plain numbers (7.9, not 7.9×10⁰)."""
    a = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = sorted(abs(v) for v in (ax.get_ylim() if axis == "y" else ax.get_xlim()))
    if lo > 0 and hi / lo < 1e3:  # few decades: label 1, 2, 5 of each
        a.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    a.set_major_formatter(fmt)
    a.set_minor_formatter(NullFormatter())


def _log_if_wide(ax: Axes, values: Iterable[float], axis: str = "y") -> bool:
    """Log scale on ``axis`` when the (positive) values span more than a decade; returns whether it did."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) and v.min() > 0 and v.max() / v.min() > 10:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        return True
    return False


def _legend_outside(ax: Axes, extra: Sequence[tuple[Any, str]] = (), title: str | None = None) -> None:
    """The axes' legend (seaborn's, or the labelled artists) plus ``extra`` (handle, label) pairs, redrawn
    to the right of the axes so that it covers no data."""
    leg = ax.get_legend()
    if leg is not None:
        handles, labels = list(leg.legend_handles), [t.get_text() for t in leg.get_texts()]
        title = title or leg.get_title().get_text() or None
        leg.remove()
    else:
        handles, labels = ax.get_legend_handles_labels()
    handles, labels = handles + [h for h, _ in extra], labels + [lab for _, lab in extra]
    if handles:
        ax.legend(handles, labels, title=title, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                  frameon=False, alignment="left")


def _short(case_id: object, n: int = 20) -> str:
    s = str(case_id)
    return s if len(s) <= n else s[: n - 1] + "…"


def _label_points(ax: Axes, points: Sequence[tuple[float, float, str, str]]) -> None:
    """Text labels (x, y, text, colour) beside their points, on the side that points into the axes and stacked
    where labels would meet; call after the axes' scales and limits are set."""
    ax.autoscale_view()
    to_frac = ax.transData + ax.transAxes.inverted()
    placed: list[tuple[float, float, bool, float]] = []
    for x, y, text, colour in sorted(points, key=lambda p: (p[0], p[1])):
        fx, fy = to_frac.transform((x, y))
        right, below = fx > 0.55, fy > 0.6
        lines = text.count("\n") + 1
        shift = sum(h for px, py, pb, h in placed if pb == below and abs(px - fx) < 0.2 and abs(py - fy) < 0.2)
        dy = 5 + shift
        ax.annotate(text, (x, y), xytext=(-6 if right else 6, -dy if below else dy), textcoords="offset points",
                    ha="right" if right else "left", va="top" if below else "bottom", fontsize=6.5, color=colour,
                    arrowprops=dict(arrowstyle="-", color=colour, lw=0.5, shrinkA=0, shrinkB=3))
        placed.append((fx, fy, below, 8.5 * lines + 2))


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
    ax = _ax(ax)
    runs = _runs(runs)
    among = _runs(among) if among is not None else runs
    label_of = {id(r): lab for r, lab in zip(among, _labels(among))}
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
        sns.lineplot(d, x="edits applied", y="value", hue="run", style="layer", palette=_palette(among),
                     hue_order=[lab for lab in _labels(among) if lab in set(d["run"])], estimator=None,
                     errorbar=None, sort=True, ax=ax, **({} if many else {"marker": "."}))
    _edit_axis(ax)
    unit = NORM_UNITS.get(metric, metric)
    ax.set_ylabel(f"{unit}, relative to unedited" if relative else unit)
    ax.set_title("Norm growth of the edited matrices")
    _legend_outside(ax)
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
    runs = _runs(runs)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(editor_family(run), []).append(run)
    names = [n for n in (*FAMILIES, OTHER_FAMILY) if n in groups] or [""]
    axes, own = _panels(ax, len(names), 1, sharex=True, panel=(3.6, 2.1))
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
    from .analysis import relative_growth

    runs = _runs(runs)
    axes, own = _panels(ax, 2, 2, sharex=True, panel=(3.0, 2.2))
    rows = []
    for run, label in zip(runs, _labels(runs)):
        ly = relative_growth(run)
        s1 = ly["weight_sigma1_ratio"] if "weight_sigma1_ratio" in ly else np.nan
        per = ly.assign(s1=s1).groupby("edit_index").agg(l1=("growth", "mean"), s1=("s1", "max"))
        rows.append(pd.DataFrame({"edits applied": edits_applied(per.index), "run": label,
                                  "l1": 100 * per["l1"].to_numpy(float),
                                  "s1": 100 * (per["s1"].to_numpy(float) - 1)}))
    d = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["edits applied", "run", "l1", "s1"])
    order = [lab for lab in _labels(runs) if lab in set(d["run"])]
    drawn = []
    for a, col, ylabel in zip(axes, ("l1", "s1"), ("‖W‖₁ growth, % (mean of layers)", "σ₁(W) growth, % (largest layer)")):
        sel = d.dropna(subset=[col])
        if len(sel):
            sns.lineplot(sel, x="edits applied", y=col, hue="run", hue_order=order, palette=_palette(runs),
                         estimator=None, errorbar=None, sort=True, ax=a)
            drawn.append(a)
        a.axhline(0, color="0.6", lw=0.8, gid="reference")
        a.set_ylabel(ylabel)
        _edit_axis(a)
    for a in drawn[:-1]:
        a.get_legend().remove()
    _legend_outside(drawn[-1] if drawn else axes[1])
    _panel_title(axes, own, "Norm growth of the edited matrices, side by side")
    return axes


FORGETTING = {"retention": "retention", "efficacy": "efficacy", "paraphrase_score": "paraphrase score",
              "neighborhood_score": "neighborhood score"}


def plot_forgetting(runs: Run | list[Run], ax: Axes | Sequence[Axes] | None = None,
                    metrics: tuple[str, ...] = ("retention", "efficacy", "paraphrase_score", "neighborhood_score")
                    ) -> list[Axes]:
    """Retention and the scores over earlier edits at each checkpoint, against the edits applied: one
    panel per metric (same y range), one line per run. Returns the panels, in ``metrics`` order."""
    runs = _runs(runs)
    ncols = len(metrics) if len(metrics) <= 3 else 2 if len(metrics) == 4 else 3
    axes, own = _panels(ax, len(metrics), ncols, sharex=True, panel=(2.6, 1.9))
    rows = []
    for run, label in zip(runs, _labels(runs)):
        ev = run.evals.dropna(subset=["edit_index"])
        ev = ev[ev["edit_index"] >= 0]
        rows.append(pd.DataFrame({"edits applied": edits_applied(ev["edit_index"]), "run": label,
                                  **{m: ev[m].to_numpy(float) for m in metrics}}))
    d = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["edits applied", "run", *metrics])
    order = [lab for lab in _labels(runs) if lab in set(d["run"])]
    legend_at = min(ncols, len(metrics)) - 1  # the top-right panel carries the legend
    for i, (a, metric) in enumerate(zip(axes, metrics)):
        sel = d.dropna(subset=[metric])
        if len(sel):
            sns.lineplot(sel, x="edits applied", y=metric, hue="run", hue_order=order, palette=_palette(runs),
                         style="run", style_order=order, markers=True, markersize=4, dashes=True, estimator=None,
                         errorbar=None, sort=True, ax=a, legend=i == legend_at)
        a.set_ylim(-0.03, 1.03)
        a.set_ylabel(f"{FORGETTING.get(metric, metric)} (share)")
        _edit_axis(a, "edits applied" if i >= len(metrics) - ncols else "")
        if i == legend_at:
            _legend_outside(a)
    _panel_title(axes, own, "Forgetting of earlier edits")
    return axes


def plot_spectral(runs: Run | list[Run], ax: Axes | Sequence[Axes] | None = None) -> list[Axes]:
    """Two panels against the edits applied, one line per run: σ₁(W)/σ₁(W₀) (largest over the edited layers)
    and ‖v*‖/‖v_init‖ (rolling median over 10 edits): the norm growth and the value-norm feedback loop."""
    runs = _runs(runs)
    axes, own = _panels(ax, 2, 2, sharex=True, panel=(3.0, 2.2))
    rows = []
    for run, label in zip(runs, _labels(runs)):
        ly = run.layers.dropna(subset=["edit_index"])
        per = ly.groupby("edit_index").agg(s1=("weight_sigma1_ratio", "max"), v=("v_star_ratio", "mean"))
        per["v"] = per["v"].rolling(10, min_periods=1).median()
        rows.append(pd.DataFrame({"edits applied": edits_applied(per.index), "run": label,
                                  "s1": per["s1"].to_numpy(float), "v": per["v"].to_numpy(float)}))
    d = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["edits applied", "run", "s1", "v"])
    order = [lab for lab in _labels(runs) if lab in set(d["run"])]
    for i, (a, col, ylabel) in enumerate(zip(axes, ("s1", "v"), ("σ₁(W) / σ₁(W₀)", "‖v*‖ / ‖v_init‖ (median of 10)"))):
        sel = d.dropna(subset=[col])
        if len(sel):
            sns.lineplot(sel, x="edits applied", y=col, hue="run", hue_order=order, palette=_palette(runs),
                         estimator=None, errorbar=None, sort=True, ax=a, legend=i == 1)
        a.set_ylabel(ylabel)
        _edit_axis(a)
    _legend_outside(axes[1])
    title = "Spectral norm and value-norm growth"
    _panel_title(axes, own, title)
    return axes


def plot_warnings(runs: Run | list[Run], ax: Axes | Sequence[Axes] | None = None) -> list[Axes]:
    """One panel per run: retention at each checkpoint, the first early warning (dashed), the first warning
    after the gradual phase (dotted, ``warning_lead``'s collapse_warning) and the catastrophic onset that
    ``collapse_phases`` finds (solid: a disabling edit, or on a run with enough checkpoints the onset of
    ``forgetting_phases``), so the lead of the warnings is read off the edit axis."""
    from .analysis import collapse_phases, early_warning

    runs = _runs(runs)
    ncols = min(3, len(runs))
    axes, own = _panels(ax, len(runs), ncols, sharex=True, panel=(2.4, 1.8))
    colours = _palette(runs)
    for a, run, label in zip(axes, runs, _labels(runs)):
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
        _edit_axis(a)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize="x-small", loc="lower left")
    title = "Early warnings (edit-time signals) against forgetting"
    _panel_title(axes, own, title)
    return axes


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
    runs = _runs(runs)
    data: dict[str, list[pd.DataFrame]] = {"rome": [], "batched": []}
    for run, label in zip(runs, _labels(runs)):
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
    axes, own = _panels(ax, max(len(families), 1), 1, panel=(3.6, 2.3))
    palette = _palette(runs)
    for a, family in zip(axes, families):
        d = pd.concat(data[family], ignore_index=True)
        order = [lab for lab in _labels(runs) if lab in set(d["run"])]
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
        logged = _log_if_wide(a, d["delta_fro"])
        a.set_ylabel("‖ΔW‖_F" + (" (log scale)" if logged else ""))
        _legend_outside(a)
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
    ax = _ax(ax)
    runs = _runs(runs)
    markers = "osD^v<>"
    sc = None
    lo, hi = np.inf, -np.inf
    for i, (run, label) in enumerate(zip(runs, _labels(runs))):
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
                for i, lab in enumerate(_labels(runs)) if lab in drawn]
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
    for run in _runs(runs):
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
    ax = _ax(ax)
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
    _legend_outside(ax)
    return ax


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
    runs = _runs(runs)
    labels, palette = _labels(runs), _palette(runs)
    flag_list, dis_list = _per_run(flags, runs, "flags"), _per_run(disabling, runs, "disabling")
    evs = [r.evals.dropna(subset=["perplexity"]).sort_values("edit_index") for r in runs]
    d = pd.concat([pd.DataFrame(columns=["edits applied", "run", "perplexity", "entropy"])]
                  + [pd.DataFrame({"edits applied": edits_applied(ev["edit_index"]), "run": lab,
                                   "perplexity": ev["perplexity"].to_numpy(float),
                                   "entropy": ev["generation_entropy"].to_numpy(float)})
                     for ev, lab in zip(evs, labels)], ignore_index=True)
    with_entropy = entropy and d["entropy"].notna().any()
    axes, own = _panels(ax, 2 if with_entropy else 1, 1, sharex=True, panel=(3.6, 1.9))
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
                              "text": f"edit {e}: {_short(case.get(e, '?'))}"
                                      + (" (disabling)" if kind == "disabling" else "")})
    style = {"flagged": dict(marker="o", s=70, linewidths=1.3, zorder=4),
             "disabling": dict(marker="X", s=60, color="red", edgecolors="white", linewidths=0.5, zorder=5)}
    m = pd.DataFrame(marks, columns=["run", "kind", "edit", "x", "perplexity", "entropy", "text"])
    for (kind, lab), g in m.groupby(["kind", "run"], sort=False):
        kw = style[kind] if kind == "disabling" else dict(style[kind], facecolors="none", edgecolors=palette[lab])
        for a, y in zip(axes, ("perplexity", "entropy")):
            a.scatter(g["x"], g[y], label=f"_{kind}", gid=f"{kind}:{lab}", **kw)
    logged = _log_if_wide(axes[0], d["perplexity"])
    if logged:
        _plain_log_ticks(axes[0])
    axes[0].set_ylabel("held-out perplexity" + ("\n(log scale)" if logged else ""))
    axes[0].margins(y=0.25)
    _label_points(axes[0], [(x, g["perplexity"].iloc[0], "\n".join(g["text"]), palette[lab])  # its edits a line each
                            for (lab, x), g in m.groupby(["run", "x"], sort=False)])
    extra = []
    if (m["kind"] == "flagged").any():
        extra.append((Line2D([], [], ls="", marker="o", markerfacecolor="none", markeredgecolor="0.3", markersize=7),
                      "flagged edit"))
    if (m["kind"] == "disabling").any():
        extra.append((Line2D([], [], ls="", marker="X", color="red", markersize=7), "confirmed disabling"))
    _legend_outside(axes[0], extra)
    if with_entropy:
        axes[1].set_ylabel("generation entropy\n(bits)")
        axes[1].margins(y=0.15)
    for a in axes[:-1]:
        a.set_xlabel("")
    _edit_axis(axes[-1])
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    _panel_title(axes, own, "Model-level collapse signals")
    return axes


def _confirmed_rows(df: pd.DataFrame, confirmed: Any) -> pd.Series:
    """Boolean mask of ``df``'s rows named by ``confirmed``: a frame (rows with ``disabling`` true where it
    has that column) matched on ``case_id`` or else ``record_index``, or case ids (str) and record indices
    (int)."""
    if confirmed is None:
        return pd.Series(False, index=df.index)
    if isinstance(confirmed, pd.DataFrame):
        if "disabling" in confirmed.columns:
            confirmed = confirmed[confirmed["disabling"].astype(bool)]
        if "case_id" in confirmed.columns:
            return df["case_id"].astype(str).isin(set(confirmed["case_id"].astype(str)))
        if "record_index" in confirmed.columns:
            return df["record_index"].isin(set(confirmed["record_index"].astype(int)))
        raise ValueError("confirmed: the frame needs a case_id or record_index column")
    if isinstance(confirmed, (str, int, np.integer)):
        confirmed = [confirmed]
    ids = {str(c) for c in confirmed if isinstance(c, str)}
    idx = {int(c) for c in confirmed if not isinstance(c, str)}
    return df["case_id"].astype(str).isin(ids) | df["record_index"].isin(idx)


def plot_risk_scan(scan_df: pd.DataFrame, confirmed: Any = None, ax: Axes | None = None) -> Axes:
    """A pre-edit risk scan (``collapsediag.scan.scan``): ROME's denominator k_uᵀu against cos(k_u, k̄), one
    point per record scanned with status ``ok``; marker: whether the subject is the prompt's first token.

    k_uᵀu is the ``denominator`` column of a ROME scan and ``denominator_ratio`` × ``denominator_consistent``
    of an r-ROME one. Its axis is logarithmic when the values span more than a decade (symmetric-log when
    some are ≤ 0), as its label says. ``confirmed``: collapses confirmed by applying the edit (a frame with
    ``case_id`` or ``record_index`` and optionally a boolean ``disabling``; or a set of case ids / record
    indices), marked with a red X and labelled with their case id. A scan of several layers (``collapsediag
    scan --layers``) is drawn at its first layer.
    """
    ax = _ax(ax)
    df = scan_df[scan_df["status"].astype(str) == "ok"]
    if "layer" in df.columns and df["layer"].nunique() > 1:  # a multi-layer scan: one layer per figure
        df = df[df["layer"] == df["layer"].min()]
    if scan_df.attrs.get("editor", "rome") != "rome" and {"denominator_ratio", "denominator_consistent"} <= set(df):
        k_u = df["denominator_ratio"].to_numpy(float) * df["denominator_consistent"].to_numpy(float)
    else:
        k_u = df["denominator"].to_numpy(float)
    first = df["subject_first_token"].astype("boolean")
    d = pd.DataFrame({"key_cosine": df["key_cosine"].to_numpy(float), "k_u": k_u,
                      "subject starts the prompt": np.where(first.isna(), "unknown",
                                                            np.where(first.fillna(False), "yes", "no")),
                      "case_id": df["case_id"].astype(str).to_numpy(),
                      "confirmed": _confirmed_rows(df, confirmed).to_numpy(bool)})
    d = d[np.isfinite(d["key_cosine"]) & np.isfinite(d["k_u"])].reset_index(drop=True)
    styles = [s for s in ("no", "yes", "unknown") if s in set(d["subject starts the prompt"])]
    small = len(d) <= 200
    sns.scatterplot(d, x="key_cosine", y="k_u", style="subject starts the prompt", style_order=styles,
                    markers={"no": "o", "yes": "^", "unknown": "s"}, color="C0", s=22 if small else 10,
                    alpha=0.8 if small else 0.5, edgecolor="none", ax=ax)
    c = d[d["confirmed"]]
    extra = []
    if len(c):
        ax.scatter(c["key_cosine"], c["k_u"], marker="X", s=70, color="red", edgecolors="white", linewidths=0.5,
                   zorder=5, label="_confirmed", gid="confirmed")
        marked = list(zip(c["key_cosine"], c["k_u"], c["case_id"].map(lambda x: _short(x, 24)), ["red"] * len(c)))
        extra.append((Line2D([], [], ls="", marker="X", color="red", markersize=7), "confirmed collapse"))
    scale = ""
    y = np.abs(d["k_u"].to_numpy(float))
    if len(d) and (d["k_u"] <= 0).any() and y.max() > 10 * max(y[y > 0].min(initial=np.inf), 1e-12):
        small = max(y[y > 0].min(initial=y.max()), y.max() * 1e-3)
        thresh = float(10.0 ** np.floor(np.log10(small)))  # a power of ten: ticks land on decades
        ax.set_yscale("symlog", linthresh=thresh)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        scale = f";\nsymlog scale, linear within ±{thresh:g}"
    elif _log_if_wide(ax, d["k_u"]):
        _plain_log_ticks(ax)
        scale = ", log scale"
    if len(c):
        _label_points(ax, marked)
    ax.set_xlabel("cos(k_u, k̄): unprefixed vs prefix-averaged key")
    ax.set_ylabel(f"ROME denominator k_uᵀu (key units{scale})")
    layer = int(df["layer"].iloc[0]) if "layer" in df.columns and len(df) else scan_df.attrs.get("layer")
    ax.set_title(f"Pre-edit risk scan{f', layer {layer}' if layer is not None else ''} ({len(d)} records)")
    _legend_outside(ax, extra)
    return ax


# No creation date or version: an unchanged figure is written as the same bytes.
FIXED_METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None, "Creator": None}}


def plot_downstream(runs: Run | list[Run], ax: Axes | Sequence[Axes] | None = None) -> list[Axes]:
    """Downstream accuracy against the edits applied: one panel per task, one line per run, chance as a dashed
    line. A run for which a task is uninformative (its unedited 95 % interval holds chance) is drawn faint and
    the panel's title says so. Returns the panels, tasks in order of first appearance."""
    from .downstream_score import downstream_summary

    runs = _runs(runs)
    labels, colours = _labels(runs), _palette(runs)
    tasks = list(dict.fromkeys(t for r in runs for t in r.downstream["task"].dropna()))
    axes, own = _panels(ax, max(len(tasks), 1), min(len(tasks), 3) or 1, sharex=False, panel=(2.6, 1.9))
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
        _edit_axis(a)
    if tasks:
        handles = [Line2D([], [], color=colours[lab], marker=".", label=lab)
                   for run, lab in zip(runs, labels) if len(run.downstream)]
        handles.append(Line2D([], [], color="0.4", linestyle="--", label="chance"))
        axes[min(len(tasks), 3) - 1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1),
                                            frameon=False)
    _panel_title(axes, own, "Downstream accuracy")
    return axes


def _figure_of(drawn: Axes | Sequence[Axes]) -> Any:
    return drawn.figure if isinstance(drawn, Axes) else drawn[0].figure


def write_figures(runs: list[Run], out: str | os.PathLike, scan: pd.DataFrame | None = None,
                  confirmed: Any = None, disabling: Mapping | pd.DataFrame | None = None) -> list[pathlib.Path]:
    """Every figure the runs have data for, as PNG and PDF under ``out``; returns the files written.

    ``scan``: a pre-edit risk scan, drawn as ``risk_scan`` with its ``confirmed`` collapses
    (``plot_risk_scan``). ``disabling``: confirmed disabling edits per run, marked on ``perplexity``
    (``plot_perplexity``). Multi-panel figures are sized by their panel count.
    """
    from .analysis import flag_disabling_edits

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = list(runs)
    has = lambda table, col: any(getattr(r, table)[col].notna().any() for r in runs)  # noqa: E731
    figures: dict[str, Any] = {}
    if runs:
        figures["norm_growth"] = lambda: plot_norm_growth_by_family(runs)
    if has("evals", "retention"):
        figures["forgetting"] = lambda: plot_forgetting(runs)
    if has("layers", "weight_sigma1_ratio"):
        figures["spectral"] = lambda: plot_spectral(runs)
    if has("evals", "retention") and has("layers", "weight_sigma1_ratio"):
        figures["warnings"] = lambda: plot_warnings(runs)
    if has("layers", "denominator"):
        figures["denominator_vs_norm"] = lambda: plot_denominator_vs_norm(runs)
    if has("layers", "key_mahalanobis_prefixed"):
        figures["key_stats"] = lambda: plot_key_stats(runs)
    if len({int(r.config.get("batch_size") or 1) for r in runs}) > 1:
        figures["batch_neighborhood"] = lambda: plot_batch_neighborhood(runs)
    if has("evals", "perplexity"):
        figures["perplexity"] = lambda: plot_perplexity(runs, [flag_disabling_edits(r) for r in runs],
                                                        disabling=disabling)
    if any(len(r.downstream) for r in runs):
        figures["downstream"] = lambda: plot_downstream(runs)
    if scan is not None:
        figures["risk_scan"] = lambda: plot_risk_scan(scan, confirmed)
    return [path for name, draw in figures.items() for path in write_figure(draw, out / name)]


def write_figure(draw: Callable[[], Axes | Sequence[Axes]], stem: str | os.PathLike) -> list[pathlib.Path]:
    """Draw one figure (``draw()`` returns its axes) in the paper style and save it as ``stem``.png and .pdf,
    without timestamps (the same data give the same files); returns the files written."""
    stem = pathlib.Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    with paper_style():
        fig = _figure_of(draw())
        for ext in ("png", "pdf"):
            path = stem.with_name(f"{stem.name}.{ext}")
            fig.savefig(path, metadata=FIXED_METADATA[ext])
            written.append(path)
        plt.close(fig)
    return written
