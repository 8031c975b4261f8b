"""The long study's findings, from whatever runs it has finished so far (``collapsediag study --report``).

Per editor: how far it got, the catastrophic onset ``forgetting_phases`` finds, final retention, perplexity and
norm growth, the first early warning and its lead, and edits per hour. Findings: (i) the onset per editor,
(ii) Spearman ρ of weight_l1 growth against 1 − retention and D4S's and ENCORE's norm growth against MEMIT's
at the same edit, (iii) the neighborhood score at each batch size.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import pandas as pd

from ..analysis.flags import disabling_edits
from ..analysis.growth import CANNOT_SAY, growth_vs_forgetting, spearman_or_nan, weight_l1_growth
from ..analysis.phases import forgetting_phases
from ..analysis.warning import early_warning, warning_lead
from .longstudy import read_status, run_timing
from ..runs.store import Run, load_run

# editors on MEMIT's update (and its norm-bounded variants): drawn side by side, apart from ROME's far larger growth
NORM_BOUNDED_FAMILY = ("memit", "d4s", "alphaedit", "encore")


def study_runs(out: str | os.PathLike) -> tuple[dict[str, Run], dict[str, Run]]:
    """The study's sequential runs by editor and batch runs by name (those with at least one edit)."""
    out = pathlib.Path(out)

    def runs(sub: str) -> dict[str, Run]:
        found = {}
        for p in sorted((out / sub).glob("*/config.json")):
            run = load_run(p.parent)
            if len(run.edits):
                found[p.parent.name] = run
        return found

    return runs("seq"), runs("batch")


def sigma1_ratio(run: Run) -> pd.Series:
    """Largest σ₁(W)/σ₁(W₀) over the edited layers, per edit index."""
    ly = run.layers.dropna(subset=["weight_sigma1_ratio"])
    return ly.groupby("edit_index")["weight_sigma1_ratio"].max()


def editor_table(seq: dict[str, Run]) -> pd.DataFrame:
    """One row per sequential run: progress, forgetting, norms, warnings and speed."""
    rows = []
    for name, run in seq.items():
        ph = forgetting_phases(run)
        warns = early_warning(run)
        lead = warning_lead(run, warns)
        ev = run.evals.dropna(subset=["perplexity"]).sort_values("edit_index")
        growth, s1 = weight_l1_growth(run), sigma1_ratio(run)
        rows.append({"editor": name, "edits": len(run.edits),
                     "efficacy": float(run.edits["efficacy"].astype(float).mean()),
                     "retention_final": float(run.evals["retention"].dropna().iloc[-1])
                     if run.evals["retention"].notna().any() else np.nan,
                     "catastrophic_onset": ph["onset"] if ph["catastrophic"] else None,
                     "gradual_slope_per_100": 100 * ph["gradual_slope"] if ph.get("gradual_slope") is not None
                     else np.nan,
                     "perplexity_ratio": float(ev["perplexity"].iloc[-1] / ev["perplexity"].iloc[0])
                     if len(ev) > 1 else np.nan,
                     "weight_l1_growth_pct": 100 * float(growth.iloc[-1]) if len(growth) else np.nan,
                     "sigma1_ratio": float(s1.iloc[-1]) if len(s1) else np.nan,
                     "first_warning": lead["first_warning"], "warning_signal": lead["first_signal"],
                     "lead_edits": lead["lead"], "collapse_warning": lead["collapse_warning"],
                     "collapse_signal": lead["collapse_signal"], "false_alarm": lead["false_alarm"],
                     **{k: v for k, v in run_timing(run).items() if k != "edits"}})
    return pd.DataFrame(rows)


DISABLING_COLUMNS = ["editor", "edit_index", "first_edit", "case_id", "subject", "perplexity_before",
                     "perplexity_after", "perplexity_ratio", "signals", "denominator", "key_cosine", "update_ratio"]


def disabling_table(seq: dict[str, Run]) -> pd.DataFrame:
    """The sequential runs' disabling edits (``analysis.disabling_edits``: perplexity up ``COLLAPSE_RATIO``
    times between two checkpoints, the suspect being the largest update in between), one row each."""
    frames = [disabling_edits(run).assign(editor=name) for name, run in seq.items()]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True)[DISABLING_COLUMNS] if frames else pd.DataFrame(columns=DISABLING_COLUMNS)


def batch_table(batch: dict[str, Run]) -> pd.DataFrame:
    """One row per batch run: editor, batch size, edits, and the scores at its last checkpoint."""
    rows = []
    for name, run in batch.items():
        ev = run.evals.dropna(subset=["neighborhood_score"]).sort_values("edit_index")
        last = ev.iloc[-1] if len(ev) else None
        rows.append({"run": name, "editor": run.config.get("editor"), "batch_size": int(run.config["batch_size"]),
                     "edits": len(run.edits),
                     "efficacy_end": float(last["efficacy"]) if last is not None else np.nan,
                     "paraphrase_end": float(last["paraphrase_score"]) if last is not None else np.nan,
                     "neighborhood_end": float(last["neighborhood_score"]) if last is not None else np.nan,
                     "neighborhood_after_each_edit": float(run.edits["neighborhood_score"].mean()),
                     **{k: v for k, v in run_timing(run).items() if k != "edits"}})
    return pd.DataFrame(rows)


def _span(sitting: dict[str, Any]) -> tuple[pd.Timestamp, pd.Timestamp] | None:
    """When a sitting that did something ran, or None when it is not known (or it did nothing)."""
    if not sitting.get("started") or not sitting.get("seconds") or not sitting.get("edits"):
        return None
    t0 = pd.Timestamp(sitting["started"])
    return t0, t0 + pd.Timedelta(seconds=float(sitting["seconds"]))


def timing_table(out: str | os.PathLike, runs: dict[str, Run]) -> pd.DataFrame:
    """Edits per hour of each run in each setting it was made in: one row per sitting and run from study.json's
    sittings log (``runs`` keyed "seq/<editor>", "batch/<name>"), with the sitting's torch threads and whether
    it ran alone: no other sitting that made edits overlapped it in time. A sitting may say so itself
    (``"alone"``); one with no start time that does not is unknown (None)."""
    sittings = read_status(out).get("sittings", [])
    spans = [_span(s) for s in sittings]
    rows = []
    for i, s in enumerate(sittings):
        alone = s.get("alone")
        if alone is None and spans[i] is not None:
            a0, a1 = spans[i]
            alone = not any(o is not None and a0 < o[1] and o[0] < a1 for j, o in enumerate(spans) if j != i)
        for name, (a, b) in s.get("edits", {}).items():
            if b > a and name in runs:
                rows.append({"run": name, "sitting": i, "threads": s.get("threads"),
                             "alone": None if alone is None else bool(alone),
                             "from_edit": a, "to_edit": b,
                             **{k: v for k, v in run_timing(runs[name], a, b).items() if k != "edits"}})
    return pd.DataFrame(rows, columns=["run", "sitting", "threads", "alone", "from_edit", "to_edit", "seconds",
                                       "seconds_per_edit_median", "edits_per_hour"])


def _common_edit(a: pd.Series, b: pd.Series) -> int | None:
    both = sorted(set(a.index) & set(b.index))
    return int(both[-1]) if both else None


def _warning_finding(seq: dict[str, Run]) -> dict[str, Any]:
    """Whether every run that turned catastrophic warned, after its gradual phase, no later than its onset
    checkpoint; the warnings and the false alarms."""
    leads = {n: warning_lead(r) for n, r in seq.items()}
    hit = {n: w for n, w in leads.items() if w["catastrophic_onset"] is not None}
    told = [f"{n}: steep from checkpoint {w['catastrophic_onset']} (gradual up to {w['last_gradual']}); " +
            (f"first warning after {w['last_gradual']} at edit {w['collapse_warning']} ({w['collapse_signal']}, "
             f"{w['collapse_lead']} edits before the onset checkpoint); first warning of the run at edit "
             f"{w['first_warning']} ({w['first_signal']}, lead {w['lead']})" if w["collapse_warning"] is not None
             else "no warning during the collapse")
            for n, w in hit.items()]
    alarms = [n for n, w in leads.items() if w["false_alarm"]]
    told.append(f"false alarms (warned, never catastrophic): {', '.join(alarms) if alarms else 'none'}"
                f" of {len(leads) - len(hit)} runs without an onset")
    return {"finding": "early warning: every catastrophic collapse warned no later than its onset checkpoint",
            "reproduced": all(w["collapse_lead"] is not None and w["collapse_lead"] >= 0 for w in hit.values())
            if hit else CANNOT_SAY,
            "evidence": "; ".join(told)}


def study_findings(seq: dict[str, Run], batch: dict[str, Run]) -> pd.DataFrame:
    """One row per finding: reproduced (True / False / "cannot say") and the numbers behind it."""
    rows: list[dict[str, Any]] = []
    onsets = {n: forgetting_phases(r) for n, r in seq.items()}
    told = "; ".join(f"{n}: " + (f"edit {p['onset']}" if p["catastrophic"] else f"none in {len(seq[n].edits)} edits")
                     for n, p in onsets.items())
    rows.append({"finding": "(i) gradual forgetting turns catastrophic (onset edit per editor)",
                 "reproduced": any(p["catastrophic"] for p in onsets.values()) if onsets else CANNOT_SAY,
                 "evidence": told or "no sequential run yet"})
    per_run = {n: growth_vs_forgetting(run) for n, run in seq.items()}
    per = {n: rho for n, xs in per_run.items() if np.isfinite(rho := spearman_or_nan(xs))}
    pts = [p for xs in per_run.values() for p in xs]
    rho = spearman_or_nan(pts)
    rows.append({"finding": "(ii) weight_l1 growth tracks forgetting (Spearman ρ of growth vs 1 − retention)",
                 "reproduced": bool(rho > 0.5) if np.isfinite(rho) else CANNOT_SAY,
                 "evidence": (f"ρ = {rho:.2f} over {len(pts)} checkpoints of all sequential runs; per editor: " +
                              ", ".join(f"{n} {v:.2f}" for n, v in per.items())) if np.isfinite(rho)
                 else f"retention never changes over the {len(pts)} checkpoints: ρ undefined"})
    if "memit" in seq:
        g_m = weight_l1_growth(seq["memit"])
        s_m = sigma1_ratio(seq["memit"])
        parts, verdict = [], []
        for n in ("d4s", "encore"):
            if n not in seq:
                continue
            g = weight_l1_growth(seq[n])
            e = _common_edit(g, g_m)
            if e is None:
                continue
            s = sigma1_ratio(seq[n])
            parts.append(f"at edit {e}: {n} weight_l1 {100 * g[e]:+.2f} % vs MEMIT {100 * g_m[e]:+.2f} %, "
                         f"σ₁ ratio {s.get(e, np.nan):.3f} vs {s_m.get(e, np.nan):.3f}")
            verdict.append(bool(abs(g[e]) < abs(g_m[e])))
        rows.append({"finding": "(ii) D4S and ENCORE keep norm growth below MEMIT's",
                     "reproduced": all(verdict) if verdict else CANNOT_SAY,
                     "evidence": "; ".join(parts) or "no D4S or ENCORE run beside MEMIT yet"})
    rows.append(_warning_finding(seq))
    bt = batch_table(batch)
    for editor, g in bt.groupby("editor") if len(bt) else []:
        g = g.sort_values("batch_size")
        done = g[g["edits"] == g["edits"].max()]
        rows.append({"finding": f"(iii) bigger batches lower {editor.upper()}'s neighborhood score",
                     "reproduced": bool(done["neighborhood_end"].iloc[-1] < done["neighborhood_end"].iloc[0])
                     if len(done) > 1 else CANNOT_SAY,
                     "evidence": ", ".join(f"batch {int(r.batch_size)}: {r.neighborhood_end:.3f} after {r.edits} edits"
                                           for r in g.itertuples())})
    return pd.DataFrame(rows, columns=["finding", "reproduced", "evidence"])


def _tables(out: str | os.PathLike, seq: dict[str, Run], batch: dict[str, Run]) -> dict[str, pd.DataFrame]:
    return {"findings": study_findings(seq, batch), "editors": editor_table(seq), "disabling": disabling_table(seq),
            "batches": batch_table(batch),
            "timing": timing_table(out, {**{f"seq/{n}": r for n, r in seq.items()},
                                         **{f"batch/{n}": r for n, r in batch.items()}})}


def study_report(out: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """The tables of the study in ``out`` (what exists so far): findings, editors (sequential runs), disabling
    (their disabling edits), batches (the batch study) and timing (edits per hour by sitting)."""
    return _tables(out, *study_runs(out))


TITLES = {"findings": "Findings", "editors": "Sequential runs", "disabling": "Disabling edits in the sequential runs",
          "batches": "Batch study", "timing": "Timing by sitting"}


def write_study_report(out: str | os.PathLike, figures: str | os.PathLike | None = None) -> str:
    """Write ``findings.md`` (the three tables, markdown) into ``out`` and the figures of the sequential runs
    (and of each batch-study editor) under ``figures`` (default ``out/figures``); returns the markdown."""
    from ..plots.figures import write_figure, write_figures
    from ..plots.norms import plot_norm_comparison
    from ..analysis.report import markdown_table

    out = pathlib.Path(out)
    seq, batch = study_runs(out)
    tables = _tables(out, seq, batch)
    text = "\n".join(f"## {TITLES[key]}\n\n{markdown_table(df) if len(df) else '(none yet)'}\n"
                     for key, df in tables.items())
    (out / "findings.md").write_text(text, encoding="utf-8")
    fig_dir = pathlib.Path(figures) if figures else out / "figures"
    if seq:
        write_figures(list(seq.values()), fig_dir / "seq")
        family = [r for n, r in seq.items() if n in NORM_BOUNDED_FAMILY]
        if len(family) > 1:  # their growth is too small to read beside ROME's
            write_figure(lambda: plot_norm_comparison(family), fig_dir / "seq" / "norm_growth_memit_family")
    for editor in sorted({r.config.get("editor") for r in batch.values()}):
        write_figures([r for r in batch.values() if r.config.get("editor") == editor], fig_dir / f"batch-{editor}")
    return text
