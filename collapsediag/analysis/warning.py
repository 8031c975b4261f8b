"""Early warnings of a saved run, their lead on the collapse, and the phases verdict the report tells.

>>> early_warning(run)                   # the edit at which each signal rose to its threshold, per layer
>>> collapse_phases(run)                 # forgetting phases and warnings, or "too few checkpoints"
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..runs.store import Run
from .flags import UPDATE_RATIO, disabling_edits
from .phases import forgetting_phases, slope

# Early warning (ALGORITHMS.md §15): thresholds on signals that exist when the edit is made, never on held-out
# perplexity or retention (the ground truth they must anticipate).
WARNING_THRESHOLDS = {
    "weight_sigma1_ratio": 1.5,  # σ₁(W)/σ₁(W₀): the edited matrix's spectral norm up by half
    "sigma1_growth_rate": 0.01,  # d log σ₁(W) / d edit over the trailing window: exponential norm growth
    "v_star_growth": 2.0,  # ‖v*‖/‖v_init‖ over its median in the run's first window: the value-norm loop
    "update_ratio": UPDATE_RATIO,  # one update larger than the matrix it changes
}
WARNING_COLUMNS = ["edit_index", "signal", "layer", "value", "threshold"]


def warning_signals(run: Run, window: int = 20) -> pd.DataFrame:
    """Per edit (index) and layer (columns level 1): the early-warning signals, from ``run.layers``.

    sigma1_growth_rate is the slope of log σ₁(W) (log ‖W‖_F for runs without σ₁) per edit between each row and
    the last row at least ``window`` edits before it (the first row while there is none; rows of batched runs
    are a batch apart); v_star_growth is v_star_ratio over its median in the first ``window`` edits.
    """
    ly = run.layers.dropna(subset=["edit_index"]).sort_values(["layer", "edit_index"])
    frames = {}
    for layer, g in ly.groupby("layer"):
        g = g.set_index("edit_index")
        sig = g["weight_sigma1"] if g["weight_sigma1"].notna().any() else g["weight_fro"]
        x = pd.Series(g.index.to_numpy(float), index=g.index)
        logs = np.log(sig.astype(float))
        idx = np.maximum(x.searchsorted(x - window, side="right") - 1, 0)  # last row ≥ `window` edits back
        base = pd.Series(logs.to_numpy()[np.minimum(idx, len(x) - 1)], index=g.index)
        span = pd.Series(x.to_numpy() - x.to_numpy()[np.minimum(idx, len(x) - 1)], index=g.index)
        rate = ((logs - base) / span.where(span >= window / 2)).where(x >= x.iloc[0] + window / 2)
        vs = g["v_star_ratio"].astype(float)
        ref = vs[x <= x.iloc[0] + window].median()
        frames[int(layer)] = pd.DataFrame({"weight_sigma1_ratio": g["weight_sigma1_ratio"].astype(float),
                                           "sigma1_growth_rate": rate, "v_star_growth": vs / ref,
                                           "update_ratio": g["update_ratio"].astype(float)})
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, axis=1).swaplevel(axis=1).sort_index(axis=1)


def early_warning(run: Run, thresholds: dict[str, float] | None = None, window: int = 20) -> pd.DataFrame:
    """One row per warning: the edit at which a signal rose to its threshold (``WARNING_THRESHOLDS``) at a layer.

    A warning is a rising edge: the first edit at or above the threshold after one below it (or after the
    start), so a signal that stays high warns once. Uses only per-edit signals of the ``layers`` table.
    Columns edit_index, signal, layer, value, threshold; sorted by edit.
    """
    limits = dict(WARNING_THRESHOLDS, **(thresholds or {}))
    sig = warning_signals(run, window)
    rows = []
    for name, limit in limits.items():
        if sig.empty or name not in sig.columns.get_level_values(0):
            continue
        for layer, s in sig[name].items():
            s = s.dropna()
            above = s >= limit
            edges = above & ~above.shift(1, fill_value=False)
            rows += [{"edit_index": int(i), "signal": name, "layer": int(layer), "value": float(s[i]),
                      "threshold": float(limit)} for i in s.index[edges]]
    out = pd.DataFrame(rows, columns=WARNING_COLUMNS)
    return out.sort_values(["edit_index", "signal", "layer"], kind="stable").reset_index(drop=True)


def warning_lead(run: Run, warnings: pd.DataFrame | None = None) -> dict[str, Any]:
    """The early warnings against the catastrophic onset that ``forgetting_phases`` finds.

    ``lead`` = onset − the run's first warning, in edits (positive = the warning came first). The onset is
    the first checkpoint of the steep segment, so the collapse began after the checkpoint before it
    (``last_gradual``). ``collapse_warning`` is the first warning after that checkpoint (``collapse_signal``)
    and ``collapse_lead`` = onset − collapse_warning: how many edits sooner than the checkpoints it told of
    the collapse (negative: after the onset checkpoint). It tells a warning on the collapsing edits from one
    raised long before by another event. ``false_alarm``: the run warned and never turned catastrophic."""
    warnings = early_warning(run) if warnings is None else warnings
    phases = forgetting_phases(run)
    onset = phases["onset"] if phases["catastrophic"] else None
    last_gradual = None
    if onset is not None:
        checks = run.evals.dropna(subset=["retention"])["edit_index"]
        earlier = checks[checks < onset]
        last_gradual = int(earlier.max()) if len(earlier) else -1
    return _lead(warnings, onset, last_gradual)


def _lead(warnings: pd.DataFrame, onset: int | None, last_gradual: int | None) -> dict[str, Any]:
    """``warning_lead``'s columns for a given onset (None: no collapse) and last checkpoint before it."""
    first = int(warnings["edit_index"].min()) if len(warnings) else None
    hit = None
    if onset is not None:
        after = warnings[warnings["edit_index"] > last_gradual]
        hit = after.iloc[0] if len(after) else None
    return {"first_warning": first, "first_signal": warnings["signal"].iloc[0] if len(warnings) else None,
            "catastrophic_onset": onset, "lead": onset - first if onset is not None and first is not None else None,
            "last_gradual": last_gradual,
            "collapse_warning": int(hit["edit_index"]) if hit is not None else None,
            "collapse_signal": hit["signal"] if hit is not None else None,
            "collapse_lead": onset - int(hit["edit_index"]) if hit is not None else None,
            "false_alarm": bool(onset is None and first is not None)}


# A verdict on the phases needs this many retention checkpoints: the two-segment fit takes 3 a segment, and
# with fewer than 10 one noisy checkpoint moves its break (the demo's runs have 2-8, the long study's 12).
MIN_CHECKPOINTS = 10
TOO_FEW = "too few checkpoints"
RETENTION_NOTE = ("Retention compares p(target_new) with p(target_true) on earlier edits: a broken model can still "
                  "rank the two, so retention can stay high while perplexity is high.")


def collapse_phases(run: Run, warnings: pd.DataFrame | None = None,
                    min_checkpoints: int = MIN_CHECKPOINTS) -> dict[str, Any]:
    """The forgetting phases and the early warnings of one run, as the report tells them.

    A disabling edit (``disabling_edits``: perplexity ×``COLLAPSE_RATIO`` right after it) is a collapse at
    that edit: ``onset`` is the first one, ``shape`` "disabling edit", and the warnings are measured against it
    (the gradual phase ends at the checkpoint before it). In a run of batches (batch size > 1) the edits of a
    batch share one update, so no single edit is named: the onset is the checkpoint that measured the jump and
    the shape "perplexity jump". Otherwise a run with fewer than ``min_checkpoints``
    retention checkpoints gets ``TOO_FEW`` in place of each verdict (onset, catastrophic, lead, collapse_lead,
    false_alarm), and a longer run gets ``forgetting_phases`` and ``warning_lead``'s."""
    warnings = early_warning(run) if warnings is None else warnings
    ev = run.evals.dropna(subset=["retention"]).sort_values("edit_index")
    enough = len(ev) >= min_checkpoints
    dis = disabling_edits(run)
    if len(dis):
        onset, last_gradual = int(dis["edit_index"].iloc[0]), int(dis["first_edit"].iloc[0]) - 1
        shape = "disabling edit"
        if int(run.config.get("batch_size") or 1) > 1:  # edits in batches share their update: no one edit to name
            checks = run.evals.dropna(subset=["perplexity"])["edit_index"]
            onset, shape = int(checks[checks >= onset].min()), "perplexity jump"
        before = ev[ev["edit_index"] <= last_gradual]
        phases = {"checkpoints": len(ev), "onset": onset, "catastrophic": True, "shape": shape,
                  "gradual_slope": slope(before["edit_index"].to_numpy(float), before["retention"].to_numpy(float))
                  if enough else None,
                  "retention_final": float(ev["retention"].iloc[-1]) if len(ev) else None,
                  "perplexity_onset": onset}
        return dict(phases, **{k: v for k, v in _lead(warnings, onset, last_gradual).items()
                               if k != "catastrophic_onset"})
    if not enough:
        lead = _lead(warnings, None, None)
        return {"checkpoints": len(ev), "onset": TOO_FEW, "catastrophic": TOO_FEW,
                "retention_final": float(ev["retention"].iloc[-1]) if len(ev) else None,
                "first_warning": lead["first_warning"], "first_signal": lead["first_signal"], "lead": TOO_FEW,
                "collapse_lead": TOO_FEW, "false_alarm": TOO_FEW}
    lead = warning_lead(run, warnings)
    return dict(forgetting_phases(run), **{k: v for k, v in lead.items() if k != "catastrophic_onset"})
