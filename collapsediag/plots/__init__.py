"""Figures of saved runs and of a pre-edit risk scan (``collapsediag.signals.scan``), one module per
figure family: ``norms``, ``forgetting``, ``geometry``, ``perplexity``, ``risk``, ``downstream`` and ``scale`` (the
scale study from its compact tables); ``style`` holds
what they share and ``figures`` writes them to files (the only module here that saves).

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

from .downstream import plot_downstream
from .figures import FIXED_METADATA, write_figure, write_figures
from .forgetting import FORGETTING, plot_forgetting, plot_spectral, plot_warnings
from .geometry import DENOMINATOR_PANELS, batch_table, plot_batch_neighborhood, plot_denominator_vs_norm, plot_key_stats
from .norms import (FAMILIES, NORM_UNITS, OTHER_FAMILY, editor_family, plot_norm_comparison, plot_norm_growth,
                    plot_norm_growth_by_family)
from .perplexity import plot_perplexity
from .risk import plot_risk_scan
from .scale import plot_scale
from .style import PAPER_RC, ROME_FAMILY, SIZE, edits_applied, paper_style, run_label

__all__ = ["DENOMINATOR_PANELS", "FAMILIES", "FIXED_METADATA", "FORGETTING", "NORM_UNITS", "OTHER_FAMILY", "PAPER_RC",
           "ROME_FAMILY", "SIZE", "batch_table", "editor_family", "edits_applied", "paper_style", "plot_batch_neighborhood",
           "plot_denominator_vs_norm", "plot_downstream", "plot_forgetting", "plot_key_stats", "plot_norm_comparison",
           "plot_norm_growth", "plot_norm_growth_by_family", "plot_perplexity", "plot_risk_scan", "plot_scale", "plot_spectral",
           "plot_warnings", "run_label", "write_figure", "write_figures"]
