"""Disabling edits in a saved run: the cheap flags raised as it was edited, and the edits that were disabling.

>>> flag_disabling_edits(run)            # one row per (edit, signal that fired)
>>> disabling_edits(run)                 # edits after which held-out perplexity at least doubled
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..runs.store import Run

# Defaults calibrated on single ROME / r-ROME edits of CounterFact on the embedded model
# (benchmarks/disabling.py; README "Disabling edits: the scan and the flags against real edits"):
# the largest thresholds at which no disabling edit is missed and the fewest others are flagged.
KEY_RATIO = 0.01  # k_uᵀu / k̄ᵀu
UPDATE_RATIO = 2.0  # ‖ΔW‖_F / ‖W‖_F
DENOMINATOR_SHARE = 0.01  # of the run's median denominator
COLLAPSE_RATIO = 2.0  # an edit disables the model when held-out perplexity at least doubles with it

FLAG_COLUMNS = ["edit_index", "case_id", "layer", "signal", "value", "compared", "threshold", "first_edit"]
# What each signal holds against its threshold (``compared``); ``value`` is the signal's own measure.
FLAG_COMPARED = {"update_size": "‖ΔW‖_F / ‖W‖_F (= value)", "key_mismatch": "k_uᵀu / k̄ᵀu (= value)",
                 "update_norm": "robust z of log ‖ΔW‖_F in the run and layer (value: ‖ΔW‖_F)",
                 "denominator": "the denominator (= value; threshold: a share of the run's median)",
                 "perplexity_jump": "perplexity over the previous checkpoint's (= value)",
                 "entropy_drop": "bits lost since the previous checkpoint (= value)"}


def robust_z(values: pd.Series | np.ndarray) -> np.ndarray:
    """(x − median) / (1.4826 · MAD): a z-score that a few outliers cannot hide behind.

    With MAD = 0 (most values equal) every value off the median gets ±inf.
    """
    x = np.asarray(values, dtype=float)
    if np.isnan(x).all():  # a signal the run does not have: no z-scores, and no numpy warning
        return np.full(x.shape, np.nan)
    med = np.nanmedian(x)
    mad = 1.4826 * np.nanmedian(np.abs(x - med))
    if mad == 0 or not np.isfinite(mad):
        with np.errstate(invalid="ignore"):
            return np.where(x == med, 0.0, np.sign(x - med) * np.inf)
    return (x - med) / mad


def flag_disabling_edits(run: Run, norm_z: float = 3.5, denominator_ratio: float = DENOMINATOR_SHARE,
                         perplexity_ratio: float = 1.5, entropy_drop: float = 0.75, key_ratio: float = KEY_RATIO,
                         update_ratio: float = UPDATE_RATIO) -> pd.DataFrame:
    """Edits that may have disabled the model, one row per signal that fired.

    Signals (thresholds are the parameters):
      ``update_size``: ‖ΔW‖_F / ‖W‖_F of the weights before the update above ``update_ratio``;
      ``key_mismatch``: ROME's denominator k_uᵀu over r-ROME's k̄ᵀu below ``key_ratio`` (ROME family only;
      1 for r-ROME, whose update divides by k̄ᵀu);
      ``update_norm``: robust z-score of log ‖ΔW‖_F within the run and layer above ``norm_z`` (3.5);
      ``denominator``: the update denominator below ``denominator_ratio`` (0.01) × the run's median;
      ``perplexity_jump``: held-out perplexity over the previous checkpoint's above ``perplexity_ratio`` (1.5);
      ``entropy_drop``: generation entropy fell by more than ``entropy_drop`` bits (0.75) since the last
      checkpoint.
    Model-level signals name the checkpoint's last edit; ``first_edit`` is the first edit since the
    previous checkpoint (the edits between the two are the suspects). ``compared`` is the number held
    against ``threshold``: the robust z for ``update_norm`` (whose ``value`` is ‖ΔW‖_F), the value for the
    others (``FLAG_COMPARED``).
    """
    rows: list[dict[str, Any]] = []
    case = dict(zip(run.edits["edit_index"], run.edits["case_id"]))
    ly = run.layers.dropna(subset=["edit_index"])
    for layer, g in ly.groupby("layer"):
        for _, r in g.iterrows():
            size = float(r.get("update_ratio", np.nan))
            if size > update_ratio:
                rows.append({"edit_index": int(r["edit_index"]), "layer": int(layer), "signal": "update_size",
                             "value": size, "compared": size, "threshold": update_ratio, "score": size})
            mismatch = float(r["denominator"]) / float(r.get("denominator_consistent", np.nan))
            if mismatch < key_ratio:
                rows.append({"edit_index": int(r["edit_index"]), "layer": int(layer), "signal": "key_mismatch",
                             "value": mismatch, "compared": mismatch, "threshold": key_ratio,
                             "score": mismatch})
        norms = g["delta_fro"].astype(float)
        z = robust_z(np.log(norms.clip(lower=1e-30)))
        for (_, r), zi in zip(g.iterrows(), z):
            if zi > norm_z:
                rows.append({"edit_index": int(r["edit_index"]), "layer": int(layer), "signal": "update_norm",
                             "value": float(r["delta_fro"]), "compared": float(zi), "threshold": norm_z,
                             "score": float(zi)})
        den = g["denominator"].astype(float)
        med = den.median()
        if np.isfinite(med) and med > 0:
            for _, r in g[den < denominator_ratio * med].iterrows():
                rows.append({"edit_index": int(r["edit_index"]), "layer": int(layer), "signal": "denominator",
                             "value": float(r["denominator"]), "compared": float(r["denominator"]),
                             "threshold": denominator_ratio * med,
                             "score": float(r["denominator"] / med)})
    ev = run.evals.dropna(subset=["edit_index"]).sort_values("edit_index")
    prev = None
    for _, r in ev.iterrows():
        if prev is not None:
            first = int(prev["edit_index"]) + 1
            ratio = float(r["perplexity"] / prev["perplexity"])
            if ratio > perplexity_ratio:
                rows.append({"edit_index": int(r["edit_index"]), "signal": "perplexity_jump", "value": ratio,
                             "compared": ratio, "threshold": perplexity_ratio, "first_edit": first, "score": ratio})
            drop = float(prev["generation_entropy"] - r["generation_entropy"])
            if drop > entropy_drop:
                rows.append({"edit_index": int(r["edit_index"]), "signal": "entropy_drop", "value": drop,
                             "compared": drop, "threshold": entropy_drop, "first_edit": first, "score": drop})
        prev = r
    out = pd.DataFrame(rows, columns=FLAG_COLUMNS + ["score"])
    out["case_id"] = out["edit_index"].map(case)
    out["first_edit"] = out["first_edit"].fillna(out["edit_index"]).astype(int)
    return out.sort_values(["edit_index", "signal"]).reset_index(drop=True)


def flag_scores(flags: pd.DataFrame, confirmed: pd.DataFrame) -> pd.DataFrame:
    """Precision and recall of each cheap signal (and of any signal) against the confirmation.

    ``confirmed`` is the output of ``confirm_disabling_edits`` over the edits checked; only those edits count.
    """
    checked = set(confirmed["edit_index"])
    truth = set(confirmed.loc[confirmed["disabling"], "edit_index"])
    rows = []
    for signal in ["any"] + sorted(flags["signal"].unique()):
        sel = flags if signal == "any" else flags[flags["signal"] == signal]
        hit = set(sel["edit_index"]) & checked
        tp = len(hit & truth)
        rows.append({"signal": signal, "flagged": len(hit), "disabling": len(truth), "true_positives": tp,
                     "precision": tp / len(hit) if hit else np.nan,
                     "recall": tp / len(truth) if truth else np.nan})
    return pd.DataFrame(rows)


GEOMETRY = ["denominator", "denominator_unprefixed", "denominator_consistent", "key_cosine", "update_ratio"]


def geometry(run: Run) -> pd.DataFrame:
    """Per edit: the ROME-family key geometry of its (first) edited layer, and the subject-first flag."""
    ly = run.layers.dropna(subset=["edit_index"]).sort_values(["edit_index", "layer"])
    geo = ly.groupby("edit_index")[GEOMETRY].first()
    if run.config.get("editor") == "rome":  # ROME divides by k_uᵀu (runs before denominator_unprefixed)
        geo["denominator_unprefixed"] = geo["denominator_unprefixed"].fillna(geo["denominator"])
    e = run.edits.set_index("edit_index")
    geo["subject_first_token"] = e["subject_first_token"].reindex(geo.index)
    return geo


def disabling_edits(run: Run, perplexity_ratio: float = COLLAPSE_RATIO,
                    flags: pd.DataFrame | None = None) -> pd.DataFrame:
    """Edits after which held-out perplexity rose ``perplexity_ratio`` times or more since the checkpoint just
    before them, with the flag signals that fired and the key geometry that explains them: k_uᵀu
    (``denominator``), k̄ᵀu, cos(k_u, k̄), ‖ΔW‖/‖W‖, subject first; ``perplexity_vs_unedited`` compares with
    the unedited model (checkpoint −1).

    With a checkpoint after every edit the edit is named exactly. Otherwise ``first_edit`` is the first edit
    since the previous checkpoint, and ``edit_index`` the suspect among them with the largest update."""
    cols = ["edit_index", "first_edit", "case_id", "subject", "perplexity_before", "perplexity_after",
            "perplexity_ratio", "perplexity_vs_unedited", "signals", *GEOMETRY, "subject_first_token"]
    ev = run.evals.dropna(subset=["edit_index", "perplexity"]).sort_values("edit_index")
    if len(ev) < 2:
        return pd.DataFrame(columns=cols)
    flags = flag_disabling_edits(run) if flags is None else flags
    geo = geometry(run)
    e = run.edits.set_index("edit_index")
    base = ev.loc[ev["edit_index"] == -1, "perplexity"]
    base = float(base.iloc[0]) if len(base) else np.nan
    rows = []
    for prev, cur in zip(ev.itertuples(), ev.iloc[1:].itertuples()):
        ratio = cur.perplexity / prev.perplexity
        first, last = int(prev.edit_index) + 1, int(cur.edit_index)
        if ratio < perplexity_ratio or first > last:
            continue
        suspects = [i for i in range(first, last + 1) if i in e.index and e.loc[i, "status"] == "ok"]
        def size(i: int) -> float:  # the largest update among the edits since the last checkpoint
            v = geo["update_ratio"].get(i, np.nan) if i in geo.index else np.nan
            return float(v) if np.isfinite(v) else -np.inf

        worst = max(suspects, key=size, default=last)
        fired = sorted(set(flags.loc[flags["edit_index"] == worst, "signal"]))
        g = geo.loc[worst] if worst in geo.index else pd.Series(dtype=float)
        rows.append({"edit_index": worst, "first_edit": first, "case_id": e.loc[worst, "case_id"],
                     "subject": e.loc[worst, "subject"], "perplexity_before": float(prev.perplexity),
                     "perplexity_after": float(cur.perplexity), "perplexity_ratio": float(ratio),
                     "perplexity_vs_unedited": float(cur.perplexity) / base, "signals": ", ".join(fired) or "none",
                     **{c: g.get(c, np.nan) for c in GEOMETRY + ["subject_first_token"]}})
    return pd.DataFrame(rows, columns=cols)


def edits_not_taken(run: Run) -> pd.DataFrame:
    """Edits that succeeded as updates but did not take on the bare prompt (p_new ≤ p_true right after), with
    the key geometry that explains it: a small k_uᵀu against k̄ᵀu means the bare prompt's key barely reaches
    an update built on the prefix-averaged key (r-ROME's cost)."""
    cols = ["edit_index", "case_id", "subject", "p_new_after", "p_true_after", *GEOMETRY, "subject_first_token"]
    e = run.edits
    miss = e[(e["status"] == "ok") & ~e["efficacy"].fillna(False).astype(bool)]
    if miss.empty:
        return pd.DataFrame(columns=cols)
    geo = geometry(run).drop(columns="subject_first_token")
    out = miss.set_index("edit_index").join(geo, how="left").reset_index()
    return out[cols].reset_index(drop=True)
