"""Summary tables of saved runs (computed here; printing is the CLI's job)."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..runs.store import Run
from ..signals.downstream_score import downstream_summary
from .flags import COLLAPSE_RATIO, FLAG_COMPARED, KEY_RATIO, disabling_edits, edits_not_taken, flag_disabling_edits
from .warning import MIN_CHECKPOINTS, RETENTION_NOTE, collapse_phases, early_warning


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


def downstream_table(runs: list[Run]) -> pd.DataFrame:
    """``downstream_score.downstream_summary`` of every run that scored downstream tasks, with its run's name."""

    parts = [downstream_summary(r).assign(run=r.path.name) for r in runs if len(r.downstream)]
    if not parts:
        return pd.DataFrame()
    d = pd.concat(parts, ignore_index=True)
    return d[["run"] + [c for c in d.columns if c != "run"]]


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


WIDTH = 100  # columns of printed tables and report text
MIN_WRAP = 24  # a longer cell may wrap down to this width (or its column's header, if wider)


def _fair_widths(natural: list[int], low: list[int], width: int) -> list[int]:
    """Column widths from ``low`` towards ``natural``, the narrowest growing first, until the total is ``width``."""
    widths = list(low)
    while sum(widths) < width:
        open_ = [i for i, (w, n) in enumerate(zip(widths, natural)) if w < n]
        if not open_:
            break
        widths[min(open_, key=lambda i: widths[i])] += 1
    return widths


def _blocks(low: list[int], width: int) -> list[list[int]]:
    """Columns split into blocks that fit ``width`` at their ``low`` widths; each later block repeats column 0."""
    blocks, cur, used = [], [0], low[0]
    for i in range(1, len(low)):
        if used + 2 + low[i] > width and len(cur) > 1:
            blocks.append(cur)
            cur, used = [0], low[0]
        cur.append(i)
        used += 2 + low[i]
    return blocks + [cur]


def _numeric(col: pd.Series) -> bool:
    """Every value of the column is a number (not a boolean) or missing: its cells are right-aligned."""
    values = [v for v in col.tolist() if not (v is None or (isinstance(v, float) and np.isnan(v)))]
    return bool(values) and all(isinstance(v, (int, float, np.integer, np.floating))
                                and not isinstance(v, (bool, np.bool_)) for v in values)


def text_table(df: pd.DataFrame, width: int = WIDTH, floatfmt: str = "{:.4g}") -> str:
    """``df`` as plain text within ``width`` columns: readable cells (``readable``), long cells wrapped onto
    further lines, and columns that still do not fit continued in blocks below that repeat the first column."""
    import textwrap

    if df.empty:
        return "(none)"
    cells = readable(df, floatfmt)
    heads = [str(c) for c in df.columns]
    rows = [list(r) for r in cells.itertuples(index=False)]
    natural = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads)]
    low = [max(len(h), min(n, MIN_WRAP)) for h, n in zip(heads, natural)]
    right = [_numeric(df[c]) for c in df.columns]
    out = []
    for block in _blocks(low, width):
        widths = _fair_widths([natural[i] for i in block], [low[i] for i in block], width - 2 * (len(block) - 1))
        fmt = [(w, right[i]) for w, i in zip(widths, block)]
        out.append("  ".join(heads[i].rjust(w) if r else heads[i].ljust(w) for (w, r), i in zip(fmt, block)).rstrip())
        for row in rows:
            parts = [textwrap.wrap(row[i], w, break_on_hyphens=False) or [""] for (w, _), i in zip(fmt, block)]
            for k in range(max(map(len, parts))):
                line = [(p[k] if k < len(p) else "") for p in parts]
                out.append("  ".join(x.rjust(w) if r else x.ljust(w) for x, (w, r) in zip(line, fmt)).rstrip())
        out.append("")
    return "\n".join(out).rstrip()


def wrap_text(text: str, width: int = WIDTH, indent: str = "") -> str:
    """``text`` wrapped at ``width`` columns, later lines indented by ``indent``."""
    import textwrap

    return textwrap.fill(text, width, subsequent_indent=indent, break_on_hyphens=False, break_long_words=False)


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


PHASE_COLUMNS = ["run", "checkpoints", "onset", "catastrophic", "shape", "gradual_slope", "catastrophic_slope",
                 "retention_at_onset", "retention_final", "fit_gain", "perplexity_onset", "first_warning",
                 "first_signal", "lead", "last_gradual", "collapse_warning", "collapse_signal", "collapse_lead",
                 "false_alarm"]


def phases_table(runs: list[Run], warns: dict[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """One row per run: ``analysis.collapse_phases`` (a disabling edit is a collapse at that edit; "too few
    checkpoints" in place of a verdict on a short run), in ``PHASE_COLUMNS`` order."""

    warns = warns or {}
    df = pd.DataFrame([dict(run=r.path.name, **collapse_phases(r, warns.get(r.path.name))) for r in runs])
    return df[[c for c in PHASE_COLUMNS if c in df.columns] + [c for c in df.columns if c not in PHASE_COLUMNS]]


def _phase_notes() -> list[str]:
    return [f"A disabling edit (perplexity x{COLLAPSE_RATIO:g} or more right after it) is a collapse at that edit "
            f"(shape \"disabling edit\"; in a run of batches, at the checkpoint that measured it: \"perplexity jump\"); otherwise a verdict needs {MIN_CHECKPOINTS} checkpoints with "
            "retention, and a shorter run says \"too few checkpoints\".", RETENTION_NOTE]


def _flag_notes(flags: pd.DataFrame) -> list[str]:
    return ["compared: the number held against threshold; " + "; ".join(
        f"{s}: {FLAG_COMPARED[s]}" for s in sorted(set(flags["signal"])) if s in FLAG_COMPARED) + "."] \
        if len(flags) else []


def format_report(runs: list[Run], fmt: str = "text") -> str:
    """Report of saved runs: the summary table, the flagged edits, the forgetting phases and every edit
    that did not succeed; ``fmt`` is ``text`` (tables and lines within ``WIDTH`` columns, long cells wrapped)
    or ``markdown`` (full text)."""

    if fmt not in ("text", "markdown"):
        raise ValueError(f"unknown report format {fmt!r}: text or markdown")
    table = pd.concat([summary(r) for r in runs], ignore_index=True)
    flags = pd.concat([flag_disabling_edits(r).assign(run=r.path.name) for r in runs], ignore_index=True)
    flags = flags[["run"] + [c for c in flags.columns if c not in ("run", "score")]]
    warns = {r.path.name: early_warning(r) for r in runs}
    phases = phases_table(runs, warns)
    warn_table = pd.concat([w.assign(run=name) for name, w in warns.items()], ignore_index=True)
    warn_table = warn_table[["run"] + [c for c in warn_table.columns if c != "run"]]
    sections = [("Summary", table, []), ("Flagged edits (possible disabling edits)", flags, _flag_notes(flags)),
                ("Forgetting phases and the early warnings (lead = onset − first warning; collapse_lead = onset − "
                 "first warning after the gradual phase)", phases, _phase_notes()),
                ("Early warnings (signals at edit time crossing their thresholds)", warn_table, [])]
    down = downstream_table(runs)
    if len(down):  # runs with --downstream
        sections.append(("Downstream accuracy (unedited, with its 95 % Wilson interval, and at the last checkpoint)",
                         down, ["A task whose unedited interval holds chance is uninformative for that model: "
                                "informative no, and it never counts as dropped (dropped: the last accuracy is "
                                "below the unedited interval)."]))
    stories = [line for r in runs for line in explain(r)]
    for r in runs:
        bad = failed_edits(r)
        if len(bad):
            sections.append((f"Edits not ok in {r.path.name}", bad, []))
    parts = []
    if stories:
        title = "Disabling edits and edits that did not take"
        parts += ([f"## {title}", ""] + [f"- {x}" for x in stories] + [""] if fmt == "markdown"
                  else [title] + [wrap_text(x, indent="  ") for x in stories] + [""])
    for title, df, notes in sections:
        if fmt == "markdown":
            parts += [f"## {title}", "", markdown_table(df) if len(df) else "(none)", ""]
            parts += [f"{n}\n" for n in notes]
        else:
            parts += [wrap_text(title), text_table(df)] + ([""] if notes else []) + [wrap_text(n) for n in notes] + [""]
    return "\n".join(parts).rstrip() + "\n"
