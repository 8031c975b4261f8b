"""Figures of saved runs (DESIGN.md §6). Each ``plot_*`` takes runs (one or several, overlaid) and an
optional ``ax``, returns the axes, and never shows or saves anything itself.

>>> fig, ax = plt.subplots()
>>> plot_norm_growth([load_run("runs/rome"), load_run("runs/r-rome")], ax=ax)
"""
from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Iterator

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from .store import Run

PAPER_RC = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 7.5,
            "xtick.labelsize": 8, "ytick.labelsize": 8, "figure.dpi": 150, "savefig.bbox": "tight",
            "axes.spines.top": False, "axes.spines.right": False, "lines.linewidth": 1.4, "pdf.fonttype": 42}


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


def _ax(ax: Axes | None) -> Axes:
    return ax if ax is not None else plt.subplots(figsize=(4.2, 3.0))[1]


STYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3))]


def _plain_log_ticks(ax: Axes) -> None:
    """Log-scaled y ticks written as plain numbers (7.9, not 7.9×10⁰)."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(NullFormatter())


def _legend(ax: Axes, handles: list | None = None) -> None:
    """The legend (of ``handles``, or of the labelled artists) inside the axes when short, to their right
    when long."""
    n = len(handles) if handles is not None else len(ax.get_legend_handles_labels()[0])
    if not n:
        return
    where = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if n > 6 else {}
    ax.legend(**({"handles": handles} if handles is not None else {}), frameon=False, **where)


def _key_legend(ax: Axes, colours: dict[str, str], styles: dict[str, object]) -> None:
    """One legend entry per run (its colour) and one per line style (in grey), outside the axes."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, label=lab) for lab, c in colours.items()]
    if len(styles) > 1:
        handles += [Line2D([], [], color="0.4", linestyle=st, label=lab) for lab, st in styles.items()]
    _legend(ax, handles)


def plot_norm_growth(runs: Run | list[Run], ax: Axes | None = None, metric: str = "weight_l1",
                     layers: list[int] | None = None, relative: bool = True) -> Axes:
    """``weight_l1`` (or another layers-table metric) per edited layer against the edit index.

    ``relative`` divides by the unedited value (from the run's config) so runs and layers compare.
    """
    ax = _ax(ax)
    runs = _runs(runs)
    shown = sorted({int(x) for r in runs for x in r.layers.dropna(subset=[metric])["layer"]
                    if layers is None or int(x) in layers})
    styles = {f"layer {x}": STYLES[i % len(STYLES)] for i, x in enumerate(shown)}
    colours = {}
    for i, run in enumerate(runs):
        ly = run.layers.dropna(subset=[metric])
        colours[run_label(run)] = f"C{i}"
        for layer, g in ly.groupby("layer"):
            if layers is not None and layer not in layers:
                continue
            g = g.sort_values("edit_index")
            y = g[metric].to_numpy(float)
            init = run.config.get("initial_weights", {}).get(str(int(layer)), {}).get(metric)
            if relative and init:
                y = y / init
            ax.plot(g["edit_index"] + 1, y, linestyle=styles[f"layer {int(layer)}"], color=f"C{i}",
                    marker="." if len(g) < 30 else None, label=f"{run_label(run)}, layer {int(layer)}")
    ax.set_xlabel("edits applied")
    unit = {"weight_l1": "‖W‖₁ / numel", "weight_fro": "‖W‖_F", "drift_fro": "‖W − W₀‖_F / numel"}.get(metric, metric)
    ax.set_ylabel(f"{unit} / unedited" if relative else unit)
    ax.set_title("Norm growth of the edited matrices")
    _key_legend(ax, colours, styles)
    return ax


FORGETTING = {"retention": "retention", "efficacy": "efficacy", "paraphrase_score": "paraphrase",
              "neighborhood_score": "neighborhood"}


def plot_forgetting(runs: Run | list[Run], ax: Axes | None = None,
                    metrics: tuple[str, ...] = ("retention", "efficacy", "paraphrase_score", "neighborhood_score")
                    ) -> Axes:
    """Retention and the scores over earlier edits at each checkpoint, against the edit index."""
    ax = _ax(ax)
    styles = STYLES
    colours = {}
    for i, run in enumerate(_runs(runs)):
        ev = run.evals.dropna(subset=["edit_index"]).sort_values("edit_index")
        ev = ev[ev["n_edits"] > 0]
        color = colours[run_label(run)] = f"C{i}"
        for metric, style in zip(metrics, styles):
            ax.plot(ev["n_edits"], ev[metric], linestyle=style, color=color, marker=".",
                    label=f"{run_label(run)}: {FORGETTING.get(metric, metric)}")
    ax.set_xlabel("edits applied")
    ax.set_ylabel("share of earlier edits")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("Forgetting of earlier edits")
    _key_legend(ax, colours, {FORGETTING.get(m, m): st for m, st in zip(metrics, styles)})
    return ax


def _layer_edits(run: Run) -> pd.DataFrame:
    cols = ["edit_index", "subject_first_token", "case_id"]
    return run.layers.merge(run.edits[cols], on="edit_index", how="left")


def plot_denominator_vs_norm(runs: Run | list[Run], ax: Axes | None = None) -> Axes:
    """Update denominator against ‖ΔW‖_F, coloured by whether the subject is the prompt's first token."""
    ax = _ax(ax)
    markers = "osD^v<>"
    for i, run in enumerate(_runs(runs)):
        d = _layer_edits(run).dropna(subset=["denominator", "delta_fro"])
        for first, color in ((False, "C0"), (True, "C3")):
            sel = d[d["subject_first_token"].fillna(False).astype(bool) == first]
            if len(sel):
                ax.scatter(sel["denominator"], sel["delta_fro"], s=14, c=color, marker=markers[i % len(markers)],
                           alpha=0.8, label=f"{run_label(run)}, subject first: {'yes' if first else 'no'}")
    ax.set_xlabel("update denominator (key units)")
    ax.set_ylabel("‖ΔW‖_F")
    ax.set_yscale("log")
    ax.set_title("Small denominators make large updates")
    _legend(ax)
    return ax


def plot_key_stats(runs: Run | list[Run], ax: Axes | None = None) -> Axes:
    """Mahalanobis norm √(kᵀC⁻¹k) of the prefixed against the unprefixed key, coloured by cos(k_u, k̄)."""
    ax = _ax(ax)
    markers = "osD^v<>"
    sc = None
    lo, hi = np.inf, -np.inf
    for i, run in enumerate(_runs(runs)):
        d = run.layers.dropna(subset=["key_mahalanobis_prefixed", "key_mahalanobis_unprefixed"])
        if not len(d):
            continue
        sc = ax.scatter(d["key_mahalanobis_prefixed"], d["key_mahalanobis_unprefixed"], c=d["key_cosine"],
                        cmap="viridis", vmin=0, vmax=1, s=16, marker=markers[i % len(markers)], label=run_label(run))
        lo = min(lo, d["key_mahalanobis_prefixed"].min(), d["key_mahalanobis_unprefixed"].min())
        hi = max(hi, d["key_mahalanobis_prefixed"].max(), d["key_mahalanobis_unprefixed"].max())
    if sc is not None:
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=0.8, ls="--")
        ax.figure.colorbar(sc, ax=ax, label="cos(k_u, k̄)")
        _legend(ax)
    ax.set_xlabel("√(k̄ᵀC⁻¹k̄), prefixed keys")
    ax.set_ylabel("√(k_uᵀC⁻¹k_u), unprefixed key")
    ax.set_title("Prefixed vs unprefixed keys")
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
    """Neighborhood score against batch size, one line per editor (batch and sequential-batch runs alike)."""
    ax = _ax(ax)
    t = batch_table(runs).sort_values("batch_size")
    for editor, g in t.groupby("editor"):
        ax.plot(g["batch_size"], g["neighborhood_after_batch"], marker="o", label=f"{editor}: after its batch")
        if g["neighborhood_final"].notna().any():
            ax.plot(g["batch_size"], g["neighborhood_final"], marker="s", ls="--", label=f"{editor}: at the end")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("edits per update (batch size)")
    ax.set_ylabel("neighborhood score")
    ax.set_title("Batch size and locality")
    _legend(ax)
    return ax


def plot_perplexity(runs: Run | list[Run], flags: pd.DataFrame | list[pd.DataFrame] | None = None,
                    ax: Axes | None = None, entropy: bool = True) -> Axes:
    """Held-out perplexity (log scale) against the edit index, generation entropy on a second axis, and
    flagged edits (from ``flag_disabling_edits``) as vertical lines."""
    ax = _ax(ax)
    runs = _runs(runs)
    flag_list = flags if isinstance(flags, list) else [flags] * len(runs)
    ax2 = ax.twinx() if entropy else None
    for i, (run, fl) in enumerate(zip(runs, flag_list)):
        ev = run.evals.dropna(subset=["perplexity"]).sort_values("edit_index")
        color = f"C{i}"
        ax.plot(ev["n_edits"], ev["perplexity"], marker=".", color=color, label=f"{run_label(run)}: perplexity")
        if ax2 is not None:
            ax2.plot(ev["n_edits"], ev["generation_entropy"], ls=":", color=color,
                     label=f"{run_label(run)}: entropy")
        if fl is not None and len(fl):
            for j, x in enumerate(sorted(set(fl["edit_index"]))):
                ax.axvline(x + 1, color=color, alpha=0.35, lw=0.9, label=f"{run_label(run)}: flagged" if j == 0 else None)
    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo > 10:  # a collapse spans decades; otherwise a linear axis reads better
        ax.set_yscale("log")
        _plain_log_ticks(ax)
    ax.set_xlabel("edits applied")
    ax.set_ylabel("held-out perplexity")
    if ax2 is not None:
        ax2.set_ylabel("generation entropy (bits)")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, frameon=False,
                  **({"loc": "upper left", "bbox_to_anchor": (1.12, 1.0)} if len(h1 + h2) > 6 else {}))
    else:
        _legend(ax)
    ax.set_title("Model-level collapse signals")
    return ax


# No creation date or version: an unchanged figure is written as the same bytes.
FIXED_METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None, "Creator": None}}


def write_figures(runs: list[Run], out: str | os.PathLike) -> list[pathlib.Path]:
    """Every figure the runs have data for, as PNG and PDF under ``out``; returns the files written."""
    from .analysis import flag_disabling_edits

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    has = lambda table, col: any(getattr(r, table)[col].notna().any() for r in runs)  # noqa: E731
    figures = {"norm_growth": lambda ax: plot_norm_growth(runs, ax=ax)}
    if has("evals", "retention"):
        figures["forgetting"] = lambda ax: plot_forgetting(runs, ax=ax)
    if has("layers", "denominator"):
        figures["denominator_vs_norm"] = lambda ax: plot_denominator_vs_norm(runs, ax=ax)
    if has("layers", "key_mahalanobis_prefixed"):
        figures["key_stats"] = lambda ax: plot_key_stats(runs, ax=ax)
    if len({int(r.config.get("batch_size") or 1) for r in runs}) > 1:
        figures["batch_neighborhood"] = lambda ax: plot_batch_neighborhood(runs, ax=ax)
    if has("evals", "perplexity"):
        figures["perplexity"] = lambda ax: plot_perplexity(runs, [flag_disabling_edits(r) for r in runs], ax=ax)
    written = []
    with paper_style():
        for name, draw in figures.items():
            fig, ax = plt.subplots(figsize=(5.0, 3.4))
            draw(ax)
            for ext in ("png", "pdf"):
                path = out / f"{name}.{ext}"
                fig.savefig(path, metadata=FIXED_METADATA[ext])
                written.append(path)
            plt.close(fig)
    return written
