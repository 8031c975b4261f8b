"""Trend warnings fitted on some runs and scored on others, beside the anchors' signals.

Every signal exists when the edit is made (never perplexity, retention or downstream scores: they are the
ground truth). Per run and edit it is the largest value over the edited layers.

* collapsediag's warning: ``sigma1_growth_rate``, ``v_star_growth``, ``weight_sigma1_ratio`` and
  ``update_ratio`` (``warning.warning_signals``); it fires when the first of them passes its threshold.
* ‖W‖ growth (the anchor of Norm-Anchor Scaling and ENCORE): ``weight_norm_growth`` = ‖W‖_F / ‖W₀‖_F.
* hyperspherical energy (SPHERE): ``energy_drift`` = |HE(W)/HE(W₀) − 1| (``signals.energy``).

``fit_thresholds`` chooses one threshold per signal on the fit runs: above the largest value any run without a
collapse reached (so the fit runs have no false alarm), and, when the collapsing fit runs all rose above that
by the last checkpoint that still measured them healthy, midway (geometrically) between the two.
``score_warnings`` applies them to other runs: the first warning of each family, the onset (``collapse_phases``),
the lead in edits and the false alarms. A signal row is read after its edit (or batch) is applied, and the
onset is a checkpoint, so the collapse began somewhere after the checkpoint before it (``healthy``: the last
one that still measured the model healthy, or the edit before a disabling batch). A warning is in time only
when it came at or before ``healthy``; ``lead_healthy`` = healthy − warning is the lead that is sure to
precede the break, ``lead`` = onset − warning the one the checkpoints can resolve. ``cross_fit``
fits on each group of runs (half the editors, or one record ordering) and scores on the rest, so no run is
ever scored by thresholds fitted on it.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import pandas as pd

from ..runs.store import Run
from .warning import TOO_FEW, collapse_phases, warning_signals

FAMILIES: dict[str, tuple[str, ...]] = {
    "collapsediag": ("sigma1_growth_rate", "v_star_growth", "weight_sigma1_ratio", "update_ratio"),
    "weight norm": ("weight_norm_growth",),
    "energy": ("energy_drift",),
}
SCORE_COLUMNS = ["run", "family", "signal", "threshold", "first_warning", "onset", "healthy", "lead",
                 "lead_healthy", "false_alarm", "verdict"]


def signal_table(run: Run, energy: pd.DataFrame | None = None, window: int = 20) -> pd.DataFrame:
    """Per edit (index, the batch's last edit): every trend signal, the largest value over the edited layers.

    ``energy`` holds ``signals.energy.run_energy``'s rows for a run whose ``layers`` table has no
    weight_energy_ratio (runs written before it was recorded); without either, energy_drift is NaN."""
    sig = warning_signals(run, window)
    if sig.empty:
        return pd.DataFrame(columns=[s for f in FAMILIES.values() for s in f])
    out = pd.DataFrame({name: sig[name].max(axis=1) for name in FAMILIES["collapsediag"]
                        if name in sig.columns.get_level_values(0)})
    ly = run.layers.dropna(subset=["edit_index"])
    init = {int(k): v.get("weight_fro") for k, v in (run.config.get("initial_weights") or {}).items()}
    growth = {}
    for layer, g in ly.groupby("layer"):
        g = g.sort_values("edit_index").set_index("edit_index")
        w0 = init.get(int(layer)) or float(g["weight_fro"].iloc[0])
        growth[int(layer)] = g["weight_fro"].astype(float) / w0
    out["weight_norm_growth"] = pd.DataFrame(growth).max(axis=1)
    if "weight_energy_ratio" in ly.columns and ly["weight_energy_ratio"].notna().any():
        he = ly
    elif energy is not None and len(energy):
        he = energy
    else:
        he = None
    out["energy_drift"] = (he.assign(d=(he["weight_energy_ratio"].astype(float) - 1).abs())
                           .groupby("edit_index")["d"].max() if he is not None else np.nan)
    out.index = out.index.astype(int)
    return out.sort_index()


def run_onset(run: Run) -> int | None | str:
    """The catastrophic onset (edit) of ``collapse_phases``, None when the run did not collapse, or
    ``TOO_FEW`` when it has too few checkpoints to tell."""
    return onset_and_healthy(run)[0]


def onset_and_healthy(run: Run) -> tuple[int | None | str, int | None]:
    """``run_onset`` and the last edit after which the model was still measured healthy (the checkpoint
    before the onset, or the edit before a disabling edit's batch); None without an onset."""
    ph = collapse_phases(run, warnings=pd.DataFrame(columns=["edit_index", "signal"]))
    if ph["catastrophic"] == TOO_FEW:
        return TOO_FEW, None
    if not ph["catastrophic"]:
        return None, None
    healthy = ph.get("last_gradual")
    return int(ph["onset"]), int(healthy) if healthy is not None else int(ph["onset"]) - 1


def _peak(series: pd.Series, upto: int | None) -> float:
    s = series.dropna()
    s = s[s.index <= upto] if upto is not None else s
    return float(s.max()) if len(s) else float("nan")


def fit_thresholds(runs: list[Run], energy: Mapping[str, pd.DataFrame] | None = None,
                   onsets: Mapping[str, Any] | None = None) -> dict[str, float]:
    """One threshold per signal, chosen on ``runs`` (module docstring); NaN where no fit run has the signal.

    ``onsets`` maps a run's path to its onset (else ``run_onset``); runs with too few checkpoints are left out."""
    tables, onset_of = _prepare(runs, energy, onsets)
    out = {}
    for name in [s for f in FAMILIES.values() for s in f]:
        calm = [_peak(t[name], None) for k, t in tables.items() if onset_of[k][0] is None and name in t]
        hit = [_peak(t[name], onset_of[k][1]) for k, t in tables.items()
               if isinstance(onset_of[k][0], int) and name in t]
        calm, hit = [v for v in calm if math.isfinite(v)], [v for v in hit if math.isfinite(v)]
        if not calm and not hit:
            out[name] = float("nan")
        elif not calm:
            out[name] = float(np.nextafter(min(hit), -math.inf))  # the lowest peak still warns
        elif hit and min(hit) > max(calm):
            lo, hi = max(calm), min(hit)
            out[name] = math.sqrt(lo * hi) if lo > 0 else (lo + hi) / 2
        else:
            out[name] = max(calm)  # above every calm run: no false alarm on the fit runs
    return out


def _onset(run: Run, onsets: Mapping[str, Any] | None) -> tuple[int | None | str, int | None]:
    """(onset, healthy) of a run: from ``onsets`` (a run's path to an onset, or to an (onset, healthy) pair;
    an onset alone is taken as healthy up to the edit before it), else measured."""
    given = (onsets or {}).get(str(run.path), "?")
    if isinstance(given, str) and given == "?":
        return onset_and_healthy(run)
    if isinstance(given, tuple):
        return given
    return given, (given - 1 if isinstance(given, int) else None)


def _prepare(runs: list[Run], energy: Mapping[str, pd.DataFrame] | None,
             onsets: Mapping[str, Any] | None) -> tuple[dict[str, pd.DataFrame], dict[str, tuple]]:
    tables, onset_of = {}, {}
    for run in runs:
        key = str(run.path)
        both = _onset(run, onsets)
        if both[0] == TOO_FEW:
            continue
        tables[key] = signal_table(run, (energy or {}).get(key))
        onset_of[key] = both
    return tables, onset_of


def first_warning(table: pd.DataFrame, thresholds: Mapping[str, float],
                  signals: tuple[str, ...]) -> tuple[int | None, str | None]:
    """The first edit at which any of ``signals`` is above its threshold, and which signal it was."""
    best: tuple[int | None, str | None] = (None, None)
    for name in signals:
        limit = thresholds.get(name, float("nan"))
        if name not in table or not math.isfinite(limit):
            continue
        above = table[name].dropna()
        above = above[above > limit]
        if len(above) and (best[0] is None or int(above.index[0]) < best[0]):
            best = (int(above.index[0]), name)
    return best


def score_warnings(runs: list[Run], thresholds: Mapping[str, float],
                   energy: Mapping[str, pd.DataFrame] | None = None,
                   onsets: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Per run and family: the first warning, the onset, ``healthy`` (module docstring), lead = onset − warning
    and lead_healthy = healthy − warning (edits), and false_alarm (a warning on a run that never collapsed).
    ``verdict``: in time (warning at or before ``healthy``), late, missed, false alarm, quiet (no collapse, no
    warning) or too few checkpoints."""
    rows = []
    for run in runs:
        key = str(run.path)
        onset, healthy = _onset(run, onsets)
        table = signal_table(run, (energy or {}).get(key)) if onset != TOO_FEW else None
        for family, signals in FAMILIES.items():
            if table is None:
                rows.append({"run": key, "family": family, "verdict": TOO_FEW, "onset": None})
                continue
            first, signal = first_warning(table, thresholds, signals)
            lead = onset - first if isinstance(onset, int) and first is not None else None
            sure = healthy - first if isinstance(onset, int) and first is not None else None
            verdict = ("in time" if sure is not None and sure >= 0 else "late" if sure is not None else
                       "missed" if isinstance(onset, int) else "false alarm" if first is not None else "quiet")
            rows.append({"run": key, "family": family, "signal": signal,
                         "threshold": thresholds.get(signal) if signal else None, "first_warning": first,
                         "onset": onset, "healthy": healthy if isinstance(onset, int) else None, "lead": lead,
                         "lead_healthy": sure, "false_alarm": onset is None and first is not None,
                         "verdict": verdict})
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def cross_fit(groups: Mapping[str, list[Run]], energy: Mapping[str, pd.DataFrame] | None = None,
              onsets: Mapping[str, Any] | None = None) -> tuple[pd.DataFrame, dict[str, dict[str, float]]]:
    """Fit on each group, score on every other group's runs: the scores (with column ``fitted_on``) and the
    thresholds fitted on each group. Needs two groups or more."""
    if len(groups) < 2:
        raise ValueError("cross_fit needs at least two groups of runs (fit on one, score on the others)")
    paths = [str(r.path) for rs in groups.values() for r in rs]
    if len(set(paths)) < len(paths):
        raise ValueError("cross_fit's groups share a run: it would be scored by thresholds fitted on it")
    onsets = dict(onsets or {})
    for run in [r for rs in groups.values() for r in rs]:
        onsets.setdefault(str(run.path), onset_and_healthy(run))
    frames, fitted = [], {}
    for name, fit_runs in groups.items():
        fitted[name] = fit_thresholds(fit_runs, energy, onsets)
        others = [r for g, rs in groups.items() if g != name for r in rs]
        frames.append(score_warnings(others, fitted[name], energy, onsets).assign(fitted_on=name))
    return pd.concat(frames, ignore_index=True), fitted
