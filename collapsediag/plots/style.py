"""The figures' common ground: the paper style, one colour and label per run, panels, edit axes and legends.

Every plot module draws with these, so the same run has the same colour and label in every figure."""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, ScalarFormatter

from ..runs.store import Run

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


def as_runs(runs: Run | list[Run]) -> list[Run]:
    return [runs] if isinstance(runs, Run) else list(runs)


def run_labels(runs: list[Run]) -> list[str]:
    """One legend label per run, made unique with the run's directory name where two runs share one."""
    labels = [run_label(r) for r in runs]
    return [f"{lab} ({r.path.name})" if labels.count(lab) > 1 else lab for lab, r in zip(labels, runs)]


def run_palette(runs: list[Run]) -> dict[str, str]:
    """Run label → colour: the i-th run gets the i-th colour of the cycle in every figure."""
    return {lab: f"C{i % 10}" for i, lab in enumerate(run_labels(runs))}


def axes_or_new(ax: Axes | None) -> Axes:
    return ax if ax is not None else plt.subplots(figsize=SIZE)[1]


def panel_axes(ax: Axes | Sequence[Axes] | None, n: int, ncols: int = 1, sharex: bool = False,
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


def panel_title(axes: list[Axes], own: bool, title: str) -> None:
    """The title of a group of panels: the figure's when they are a figure of their own, else the first panel's."""
    if own:
        axes[0].figure.suptitle(title)
    else:
        axes[0].set_title(title, loc="left")


def edits_applied(edit_index: Any) -> Any:
    """The x of every edit axis: edits applied after an edit (edit_index + 1; the unedited model's checkpoint,
    edit_index −1, is at 0)."""
    return np.asarray(edit_index, dtype=int) + 1


def edit_axis(ax: Axes, label: str = "edits applied") -> None:
    """An x axis of edits applied (``edits_applied``): integer ticks only, starting at 0 in every figure."""
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))  # at most ~6 ticks: no labels run together
    ax.set_xlim(left=0)
    ax.set_xlabel(label)


def plain_log_ticks(ax: Axes, axis: str = "y") -> None:
    """Log-scaled ticks written as plain numbers (7.9, not 7.9×10⁰)."""
    a = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = sorted(abs(v) for v in (ax.get_ylim() if axis == "y" else ax.get_xlim()))
    if lo > 0 and hi / lo < 1e3:  # few decades: label 1, 2, 5 of each
        a.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    a.set_major_formatter(fmt)
    a.set_minor_formatter(NullFormatter())


def log_if_wide(ax: Axes, values: Iterable[float], axis: str = "y") -> bool:
    """Log scale on ``axis`` when the (positive) values span more than a decade; returns whether it did."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) and v.min() > 0 and v.max() / v.min() > 10:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        return True
    return False


def legend_outside(ax: Axes, extra: Sequence[tuple[Any, str]] = (), title: str | None = None) -> None:
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


def short_label(case_id: object, n: int = 20) -> str:
    s = str(case_id)
    return s if len(s) <= n else s[: n - 1] + "…"


def label_points(ax: Axes, points: Sequence[tuple[float, float, str, str]]) -> None:
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
