"""Post-hoc analysis of saved runs: tables computed from a ``Run``, never a model, never a figure.

``flags`` (cheap signals and disabling edits), ``phases`` (forgetting phases), ``warning`` (early warnings and the
phases verdict), ``trend`` (warnings fitted on some runs and scored on others), ``growth`` (weight-norm growth) and ``report`` (summary tables and text). Plots draw these;
confirming an edit on a live model is ``collapsediag.experiments.alone``.

>>> run = load_run("runs/rome")
>>> flag_disabling_edits(run)            # one row per (edit, signal that fired)
>>> forgetting_phases(run)["onset"]      # edit index where forgetting turns catastrophic
"""
from __future__ import annotations

from .flags import (COLLAPSE_RATIO, DENOMINATOR_SHARE, FLAG_COLUMNS, FLAG_COMPARED, GEOMETRY, KEY_RATIO,
                    UPDATE_RATIO, disabling_edits, edits_not_taken, flag_disabling_edits, flag_scores, geometry,
                    robust_z)
from .growth import CANNOT_SAY, growth_vs_forgetting, relative_growth, spearman_or_nan, weight_l1_growth
from .phases import change_point, departure, forgetting_phases, slope
from .trend import (FAMILIES, cross_fit, first_warning, fit_thresholds, onset_and_healthy, run_onset, score_warnings,
                    signal_table)
from .warning import (MIN_CHECKPOINTS, RETENTION_NOTE, TOO_FEW, WARNING_COLUMNS, WARNING_THRESHOLDS,
                      collapse_phases, early_warning, warning_lead, warning_signals)

__all__ = ["CANNOT_SAY", "COLLAPSE_RATIO", "DENOMINATOR_SHARE", "FLAG_COLUMNS", "FLAG_COMPARED", "GEOMETRY",
           "KEY_RATIO", "MIN_CHECKPOINTS", "RETENTION_NOTE", "TOO_FEW", "UPDATE_RATIO", "WARNING_COLUMNS",
           "WARNING_THRESHOLDS", "change_point", "collapse_phases", "departure", "disabling_edits", "early_warning",
           "edits_not_taken", "FAMILIES", "cross_fit", "first_warning", "fit_thresholds", "onset_and_healthy", "run_onset", "score_warnings",
           "signal_table", "flag_disabling_edits", "flag_scores", "forgetting_phases", "geometry",
           "growth_vs_forgetting", "relative_growth", "robust_z", "slope", "spearman_or_nan", "warning_lead",
           "warning_signals", "weight_l1_growth"]
