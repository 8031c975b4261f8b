"""Summary tables of saved runs (computed here; printing is the CLI's job)."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .store import Run


def summary(run: Run) -> pd.DataFrame:
    """One row per edited layer: edits, efficacy, denominators, weight_l1 growth in percent, time per edit."""
    e, ly = run.edits, run.layers
    ok = e[e["status"] == "ok"]
    init = run.config.get("initial_weights", {})
    rows = []
    layers = sorted(ly["layer"].dropna().astype(int).unique()) or [None]
    for layer in layers:
        lrows = ly[ly["layer"] == layer] if layer is not None else ly.iloc[0:0]
        den = lrows["denominator"].dropna()
        last = lrows.sort_values("edit_index").tail(1)
        w0 = init.get(str(layer), {}).get("weight_l1", np.nan)
        w_last = float(last["weight_l1"].iloc[0]) if len(last) else np.nan
        rows.append({
            "run": run.path.name, "editor": run.config.get("editor"), "layer": layer,
            "edits": len(e), "ok": len(ok),
            "efficacy": float(ok["efficacy"].astype(float).mean()) if len(ok) else np.nan,
            "p_new_after_median": float(ok["p_new_after"].median()) if len(ok) else np.nan,
            "denominator_min": float(den.min()) if len(den) else np.nan,
            "denominator_median": float(den.median()) if len(den) else np.nan,
            "denominator_max": float(den.max()) if len(den) else np.nan,
            "delta_fro_max": float(lrows["delta_fro"].max()) if len(lrows) else np.nan,
            "weight_l1_growth_pct": 100 * (w_last / w0 - 1) if w0 and np.isfinite(w0) else np.nan,
            "seconds_per_edit": float(e["seconds"].mean()) if len(e) else np.nan,
        })
    return pd.DataFrame(rows)


def failed_edits(run: Run) -> pd.DataFrame:
    """Edits whose status is not ``ok``."""
    e = run.edits
    return e.loc[e["status"] != "ok", ["edit_index", "case_id", "status"]].reset_index(drop=True)


NOISE = 1e-10  # |value| below this prints as 0 (e.g. a fitted slope of 1e-17 on flat data)


def readable_cell(value: object, column: str = "", floatfmt: str = "{:.4g}") -> str:
    """One value as a reader wants it: yes/no for booleans, 0 for float noise, percent for ``*_pct``."""
    if value is None or (np.ndim(value) == 0 and not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        v = 0.0 if abs(value) < NOISE else float(value)
        if column.endswith("_pct"):
            return f"{v:+.2f} %" if v else "0 %"
        return "0" if v == 0 else floatfmt.format(v)
    return str(value)


def readable(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> pd.DataFrame:
    """``df`` with every cell as ``readable_cell`` text."""
    return pd.DataFrame({c: [readable_cell(v, str(c), floatfmt) for v in df[c].tolist()] for c in df.columns},
                        index=df.index)


def markdown_table(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    """``df`` as a GitHub markdown table (readable cells: yes/no, 0 for float noise, percent columns)."""
    cells = readable(df, floatfmt)
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def _k_u_u(r: Any) -> float:
    """k_uᵀu of a row (``denominator_unprefixed``; NaN where a run did not record it)."""
    return float(r.denominator_unprefixed)


def _geometry_text(r: Any) -> str:
    k_u_u = _k_u_u(r)
    ratio = k_u_u / r.denominator_consistent if r.denominator_consistent else np.nan
    first = "" if pd.isna(r.subject_first_token) else (
        ", the subject is the prompt's first token" if bool(r.subject_first_token) else
        ", the subject is not the first token")
    return (f"k_uᵀu = {readable_cell(k_u_u)} against k̄ᵀu = "
            f"{readable_cell(float(r.denominator_consistent))} (ratio {readable_cell(float(ratio), floatfmt='{:.3g}')}), "
            f"cos(k_u, k̄) = {readable_cell(float(r.key_cosine), floatfmt='{:.3f}')}{first}")


def explain(run: Run, perplexity_ratio: float | None = None, most: int = 5) -> list[str]:
    """Sentences for a ROME or r-ROME run: each disabling edit (perplexity ×``perplexity_ratio`` right after
    it; default ``analysis.COLLAPSE_RATIO``) with the signals that flagged it and the key geometry that
    explains it; and each edit that did not take on the bare prompt, with the same geometry (at most ``most``
    of each kind). Other editors have no such geometry: an empty list."""
    from .analysis import COLLAPSE_RATIO, KEY_RATIO, disabling_edits, edits_not_taken

    name, editor = run.path.name, run.config.get("editor")
    if editor not in ("rome", "r-rome"):
        return []
    lines = []
    dis = disabling_edits(run, perplexity_ratio or COLLAPSE_RATIO)
    miss = edits_not_taken(run)
    missed = dict(zip(miss["edit_index"], miss.itertuples()))
    miss = miss[~miss["edit_index"].isin(dis["edit_index"])]  # a disabling edit is told once, as disabling
    for r in dis.head(most).itertuples():
        which = (f"edit {r.edit_index}" if r.first_edit == r.edit_index else
                 f"edit {r.edit_index} (the largest update of edits {r.first_edit}-{r.edit_index}, one checkpoint)")
        size = "" if pd.isna(r.update_ratio) else \
            f"; the update is {float(r.update_ratio):.2f} times the norm of the matrix it edits"
        lines.append(f"{name}: {which} ({r.case_id}, subject {r.subject!r}) disabled the model: held-out "
                     f"perplexity {r.perplexity_before:.2f} -> {r.perplexity_after:.2f} (x{r.perplexity_ratio:.1f}; "
                     f"x{r.perplexity_vs_unedited:.1f} the unedited model's). Flagged by: {r.signals}. "
                     f"Why: {_geometry_text(r)}{size}." + (
                         f" It did not take on the bare prompt either (p_new {float(m.p_new_after):.3g} < p_true "
                         f"{float(m.p_true_after):.3g})." if (m := missed.get(r.edit_index)) is not None else ""))
    for r in miss.head(most).itertuples():
        ratio = _k_u_u(r) / float(r.denominator_consistent) if r.denominator_consistent else np.nan
        why = _geometry_text(r)
        if editor == "r-rome" and ratio < KEY_RATIO:
            why += ": r-ROME writes along the prefix-averaged key k̄, which the bare prompt's key barely reaches"
        lines.append(f"{name}: edit {r.edit_index} ({r.case_id}) did not take on the bare prompt "
                     f"(p_new {float(r.p_new_after):.3g} < p_true {float(r.p_true_after):.3g}). Key geometry: {why}.")
    for kind, df in (("disabling edits", dis), ("edits that did not take", miss)):
        if len(df) > most:
            lines.append(f"{name}: {len(df) - most} more {kind} (collapsediag.analysis)")
    return lines


def format_report(runs: list[Run], fmt: str = "text") -> str:
    """Report of saved runs: the summary table, the flagged edits, the forgetting phases and every edit
    that did not succeed; ``fmt`` is ``text`` or ``markdown``."""
    from .analysis import early_warning, flag_disabling_edits, forgetting_phases, warning_lead

    if fmt not in ("text", "markdown"):
        raise ValueError(f"unknown report format {fmt!r}: text or markdown")
    table = pd.concat([summary(r) for r in runs], ignore_index=True)
    flags = pd.concat([flag_disabling_edits(r).assign(run=r.path.name) for r in runs], ignore_index=True)
    flags = flags[["run"] + [c for c in flags.columns if c != "run"]]
    warns = {r.path.name: early_warning(r) for r in runs}
    phases = pd.DataFrame([dict(run=r.path.name, **forgetting_phases(r),
                                **{k: v for k, v in warning_lead(r, warns[r.path.name]).items()
                                   if k != "catastrophic_onset"}) for r in runs])
    warn_table = pd.concat([w.assign(run=name) for name, w in warns.items()], ignore_index=True)
    warn_table = warn_table[["run"] + [c for c in warn_table.columns if c != "run"]]
    sections = [("Summary", table), ("Flagged edits (possible disabling edits)", flags),
                ("Forgetting phases and the early warnings (lead = onset − first warning; collapse_lead = onset − "
                 "first warning after the gradual phase)", phases),
                ("Early warnings (signals at edit time crossing their thresholds)", warn_table)]
    stories = [line for r in runs for line in explain(r)]
    for r in runs:
        bad = failed_edits(r)
        if len(bad):
            sections.append((f"Edits not ok in {r.path.name}", bad))
    parts = []
    if stories:
        title = "Disabling edits and edits that did not take"
        parts += ([f"## {title}", ""] + [f"- {x}" for x in stories] + [""] if fmt == "markdown"
                  else [title] + stories + [""])
    for title, df in sections:
        if fmt == "markdown":
            parts += [f"## {title}", "", markdown_table(df) if len(df) else "(none)", ""]
        else:
            with pd.option_context("display.width", 200, "display.max_columns", 30):
                parts += [title, readable(df).to_string(index=False) if len(df) else "(none)", ""]
    return "\n".join(parts).rstrip() + "\n"
