"""Writing figures to files: every figure the runs have data for (``write_figures``) or one (``write_figure``).

The one place in ``plots`` that saves: every ``plot_*`` only draws."""
from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.axes import Axes

from ..analysis.flags import flag_disabling_edits
from ..runs.store import Run
from .downstream import plot_downstream
from .forgetting import plot_forgetting, plot_spectral, plot_warnings
from .geometry import plot_batch_neighborhood, plot_denominator_vs_norm, plot_key_stats
from .norms import plot_norm_growth_by_family
from .perplexity import plot_perplexity
from .risk import plot_risk_scan
from .style import paper_style

FIXED_METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None, "Creator": None}}


def _figure_of(drawn: Axes | Sequence[Axes]) -> Any:
    return drawn.figure if isinstance(drawn, Axes) else drawn[0].figure


def write_figures(runs: list[Run], out: str | os.PathLike, scan: pd.DataFrame | None = None,
                  confirmed: Any = None, disabling: Mapping | pd.DataFrame | None = None) -> list[pathlib.Path]:
    """Every figure the runs have data for, as PNG and PDF under ``out``; returns the files written.

    ``scan``: a pre-edit risk scan, drawn as ``risk_scan`` with its ``confirmed`` collapses
    (``plot_risk_scan``). ``disabling``: confirmed disabling edits per run, marked on ``perplexity``
    (``plot_perplexity``). Multi-panel figures are sized by their panel count.
    """
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
