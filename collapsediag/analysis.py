"""Post-hoc analysis of saved runs (DESIGN.md §6): disabling edits and forgetting phases.

>>> run = load_run("runs/rome")
>>> flag_disabling_edits(run)            # one row per (edit, signal that fired)
>>> forgetting_phases(run)["onset"]      # edit index where forgetting turns catastrophic
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from .arch import ArchSpec
from .editors.base import apply_deltas
from .errors import CollapseDiagError
from .models import model_fingerprint
from .rebuild import run_deltas
from .store import Run

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


def confirm_disabling_edits(run: Run, edit_indices: list[int], model: nn.Module, tok: object,
                            texts: list[str], perplexity_ratio: float = 1.5) -> pd.DataFrame:
    """Apply each edit's update alone to the unedited ``model`` and measure held-out perplexity.

    Returns edit_index, perplexity_base, perplexity_alone, ratio and ``disabling`` (ratio above
    ``perplexity_ratio``). The model is left unedited.
    """
    from .fluency import perplexity

    if model_fingerprint(model) != run.config.get("model_fingerprint"):
        raise CollapseDiagError("confirmation needs the run's unedited base model (fingerprint differs)")
    arch = ArchSpec(**run.config["arch"])
    device = next(model.parameters()).device
    base = perplexity(model, tok, texts)
    rows = []
    for i in edit_indices:
        match = run.edits.loc[run.edits["edit_index"] == i, "batch_index"]
        if match.empty:
            raise CollapseDiagError(f"run {run.path} has no edit {i}")
        with apply_deltas(model, run_deltas(run, int(match.iloc[0]), arch, device)):
            alone = perplexity(model, tok, texts)
        rows.append({"edit_index": int(i), "perplexity_base": base, "perplexity_alone": alone,
                     "ratio": alone / base, "disabling": bool(alone / base > perplexity_ratio)})
    return pd.DataFrame(rows, columns=["edit_index", "perplexity_base", "perplexity_alone", "ratio", "disabling"])


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


def change_point(x: np.ndarray, y: np.ndarray, min_size: int = 3) -> tuple[int, float]:
    """Split of (x, y) into two straight-line segments with the least total squared error.

    Returns (index of the first point of the second segment, the SSE reduction over one line as a share).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x)
    if n < 2 * min_size:
        raise CollapseDiagError(f"change point needs at least {2 * min_size} points, got {n}")

    def sse(xs: np.ndarray, ys: np.ndarray) -> float:
        if len(xs) < 2 or np.ptp(xs) == 0:
            return float(((ys - ys.mean()) ** 2).sum())
        coef = np.polyfit(xs, ys, 1)
        return float(((np.polyval(coef, xs) - ys) ** 2).sum())

    whole = sse(x, y)
    best, best_k = np.inf, min_size
    for k in range(min_size, n - min_size + 1):
        s = sse(x[:k], y[:k]) + sse(x[k:], y[k:])
        if s < best:
            best, best_k = s, k
    return best_k, (1 - best / whole) if whole > 0 else 0.0


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.polyfit(x, y, 1)[0]) if len(x) >= 2 and np.ptp(x) > 0 else float("nan")


def departure(x: np.ndarray, y: np.ndarray, margin: float, min_size: int = 3) -> int | None:
    """Index of the first point from which every later point lies more than ``margin`` below the straight line
    fitted to the points before it (at least ``min_size`` of them): where y leaves its earlier trend for good.
    At least two points must lie below (one low last point is no departure). None when it never does; x
    sorted, y finite."""
    if min_size < 2:
        raise CollapseDiagError(f"departure needs min_size >= 2 points to fit a trend, got {min_size}")
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    for j in range(min_size, len(x) - 1):
        if np.ptp(x[:j]) == 0:
            continue
        line = np.polyval(np.polyfit(x[:j], y[:j], 1), x[j:])
        if np.all(y[j:] < line - margin):
            return j
    return None


def forgetting_phases(run: Run, min_size: int = 3, steepening: float = 3.0, min_drop: float = 0.2
                      ) -> dict[str, Any]:
    """The gradual phase and the onset of catastrophic forgetting, from the evals table.

    Fits two line segments to retention over the edit index (and to log perplexity). ``onset`` is the
    first checkpoint of the second retention segment; ``catastrophic`` says whether that segment falls
    ``steepening`` times faster than the gradual one and loses at least ``min_drop`` retention
    (``shape`` "steeper"). A collapse that levels off (a step down, then a plateau) fits a flat second
    segment, so a second rule looks for it: the first checkpoint from which retention stays more than
    ``min_drop``/2 below the line through the checkpoints before it, and ends ``min_drop`` below both that
    line and the checkpoint before (``shape`` "step"; ``steepening`` plays no part, ``catastrophic_slope`` is
    the fall from the checkpoint before the onset to the lowest one after it). Slopes are per edit;
    ``fit_gain`` is the two-segment fit's.
    """
    ev = run.evals.dropna(subset=["retention"]).sort_values("edit_index")
    x, ret = ev["edit_index"].to_numpy(float), ev["retention"].to_numpy(float)
    out: dict[str, Any] = {"checkpoints": len(ev)}
    if len(ev) < 2 * min_size:
        return dict(out, onset=None, catastrophic=False, shape=None, gradual_slope=_slope(x, ret),
                    catastrophic_slope=None, perplexity_onset=None)
    k, gain = change_point(x, ret, min_size)
    before, after = _slope(x[:k], ret[:k]), _slope(x[k:], ret[k:])
    drop = float(ret[k - 1] - ret[-1])
    catastrophic = bool(after < 0 and after < steepening * min(before, 0) - 1e-12 and drop >= min_drop)
    shape = "steeper" if catastrophic else None
    j = None if catastrophic else departure(x, ret, min_drop / 2, min_size)
    if j is not None:
        gradual = np.polyfit(x[:j], ret[:j], 1)  # the trend departure() left
        if np.polyval(gradual, x[-1]) - ret[-1] >= min_drop and ret[j - 1] - ret[-1] >= min_drop:
            low = j + int(np.argmin(ret[j:]))
            k, catastrophic, shape = j, True, "step"
            span = x[low] - x[j - 1]
            before, after = float(gradual[0]), float((ret[low] - ret[j - 1]) / span) if span > 0 else np.nan
    ppl = run.evals.dropna(subset=["perplexity"]).sort_values("edit_index")
    p_onset = None
    if len(ppl) >= 2 * min_size:
        pk, _ = change_point(ppl["edit_index"].to_numpy(float), np.log(ppl["perplexity"].to_numpy(float)), min_size)
        p_onset = int(ppl["edit_index"].iloc[pk])
    return dict(out, onset=int(x[k]), catastrophic=catastrophic, shape=shape, gradual_slope=before,
                catastrophic_slope=after, retention_at_onset=float(ret[k]), retention_final=float(ret[-1]),
                fit_gain=gain, perplexity_onset=p_onset)


GEOMETRY = ["denominator", "denominator_unprefixed", "denominator_consistent", "key_cosine", "update_ratio"]


def _geometry(run: Run) -> pd.DataFrame:
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
    geo = _geometry(run)
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
    geo = _geometry(run).drop(columns="subject_first_token")
    out = miss.set_index("edit_index").join(geo, how="left").reset_index()
    return out[cols].reset_index(drop=True)


def relative_growth(run: Run, metric: str = "weight_l1") -> pd.DataFrame:
    """The ``layers`` rows that have ``metric``, with ``growth``: the metric over its unedited value (from the
    run's config) minus 1."""
    init = {int(k): v[metric] for k, v in run.config["initial_weights"].items()}
    ly = run.layers.dropna(subset=["edit_index", metric])
    return ly.assign(growth=ly[metric] / ly["layer"].astype(int).map(init) - 1)


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
    the one ``window`` edits before; v_star_growth is v_star_ratio over its median in the first ``window`` edits.
    """
    ly = run.layers.dropna(subset=["edit_index"]).sort_values(["layer", "edit_index"])
    frames = {}
    for layer, g in ly.groupby("layer"):
        g = g.set_index("edit_index")
        sig = g["weight_sigma1"] if g["weight_sigma1"].notna().any() else g["weight_fro"]
        x = pd.Series(g.index.to_numpy(float), index=g.index)
        logs = np.log(sig.astype(float))
        idx = x.searchsorted(x - window)  # first row at least `window` edits back
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
    (the gradual phase ends at the checkpoint before it). Otherwise a run with fewer than ``min_checkpoints``
    retention checkpoints gets ``TOO_FEW`` in place of each verdict (onset, catastrophic, lead, collapse_lead,
    false_alarm), and a longer run gets ``forgetting_phases`` and ``warning_lead``'s."""
    warnings = early_warning(run) if warnings is None else warnings
    ev = run.evals.dropna(subset=["retention"]).sort_values("edit_index")
    enough = len(ev) >= min_checkpoints
    dis = disabling_edits(run)
    if len(dis):
        onset, last_gradual = int(dis["edit_index"].iloc[0]), int(dis["first_edit"].iloc[0]) - 1
        before = ev[ev["edit_index"] <= last_gradual]
        phases = {"checkpoints": len(ev), "onset": onset, "catastrophic": True, "shape": "disabling edit",
                  "gradual_slope": _slope(before["edit_index"].to_numpy(float), before["retention"].to_numpy(float))
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
