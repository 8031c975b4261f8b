"""Summary tables of saved runs (computed here; printing is the CLI's job)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .store import Run


def summary(run: Run) -> pd.DataFrame:
    """One row per edited layer: edits, efficacy, denominators, norm growth, time per edit."""
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
            "weight_l1_growth": w_last / w0 if w0 and np.isfinite(w0) else np.nan,
            "seconds_per_edit": float(e["seconds"].mean()) if len(e) else np.nan,
        })
    return pd.DataFrame(rows)


def failed_edits(run: Run) -> pd.DataFrame:
    """Edits whose status is not ``ok``."""
    e = run.edits
    return e.loc[e["status"] != "ok", ["edit_index", "case_id", "status"]].reset_index(drop=True)


def format_report(runs: list[Run]) -> str:
    """Plain-text report: the summary table, then every edit that did not succeed."""
    table = pd.concat([summary(r) for r in runs], ignore_index=True)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format",
                           "{:.4g}".format):
        parts = ["Summary", table.to_string(index=False)]
        for r in runs:
            bad = failed_edits(r)
            if len(bad):
                parts += [f"\nEdits not ok in {r.path.name}:", bad.to_string(index=False)]
    return "\n".join(parts)
