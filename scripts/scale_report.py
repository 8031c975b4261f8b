"""Compact results and figures of the scale study, from its runs as they stand (finished or not).

  python scripts/scale_report.py [--runs ~/collapsediag-runs/scale] [--energy] [--figures figures/scale]

Writes benchmarks/results/scale/: summary.csv (one row per run: edits, onset or "none by N", the last
checkpoint's retention, perplexity ratio, downstream accuracy, ‖W‖_F and σ₁ growth, edits per hour),
checkpoints.csv, downstream.csv, growth.csv (‖W‖₁, ‖W‖_F and σ₁ per 100 edits, largest layer) and
warnings.csv (trend warnings fitted on half the editors and scored on the other half, both ways, beside ‖W‖
growth and hyperspherical energy). ``--energy`` replays each run on the embedded model for the energy of runs
that did not record it. Figures (write_figures) of the runs under --figures, and scale.png (``plot_scale``)
drawn from the compact tables, so it holds the runs of earlier sittings too.

The runs of one sitting do not outlive it on every machine, so the compact tables accumulate: rows of a run
that is not under --runs are kept from the tables already in --out (column ``sitting``: the date its last
edit was made). ``--readme README.md`` writes the findings table between the README's scale-table markers.
"""
from __future__ import annotations

import argparse
import json
import pathlib

import datetime

import numpy as np
import pandas as pd

from collapsediag.analysis import TOO_FEW, collapse_phases, cross_fit
from collapsediag.plots import plot_scale, write_figure, write_figures
from collapsediag.runs.store import load_run

ROOT = pathlib.Path(__file__).resolve().parents[1]
GROUPS = {"fit: memit, alphaedit, d4s": ("memit", "alphaedit", "d4s"),
          "fit: emmet, encore, r-rome": ("emmet", "encore", "r-rome")}


def growth_rows(run, name: str) -> list[dict]:
    """Per 100 edits: the largest layer's ‖W‖₁ (mean |w|), ‖W‖_F and σ₁ growth since W₀, in %."""
    ly = run.layers.dropna(subset=["edit_index"])
    init = run.config.get("initial_weights", {})
    rows = []
    for idx, g in ly.groupby("edit_index"):
        rel = {m: max(float(r[m]) / init[str(int(r["layer"]))][m] - 1 for _, r in g.iterrows())
               for m in ("weight_l1", "weight_fro")}
        rows.append({"run": name, "edit_index": int(idx), "weight_l1_growth_pct": 100 * rel["weight_l1"],
                     "weight_fro_growth_pct": 100 * rel["weight_fro"],
                     "sigma1_growth_pct": 100 * (float(g["weight_sigma1_ratio"].max()) - 1)})
    return rows


def sitting(run) -> str:
    """The date (UTC) the run's last edit was written."""
    p = run.path / "edits.jsonl"
    t = p.stat().st_mtime if p.exists() else run.path.stat().st_mtime
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d")


def summary_row(run, name: str) -> dict:
    ev = run.evals.sort_values("edit_index")
    base, last = (ev.iloc[0], ev.iloc[-1]) if len(ev) else (None, None)
    ph = collapse_phases(run)
    onset = ph["onset"] if ph["catastrophic"] is True else (TOO_FEW if ph["catastrophic"] == TOO_FEW else
                                                            f"none by {len(run.edits)}")
    ok = run.edits[run.edits["status"] == "ok"]
    hours = float(run.edits["seconds"].sum() + ev["seconds"].sum()) / 3600
    row = {"run": name, "editor": run.config["editor"], "batch_size": int(run.config.get("batch_size") or 1),
           "edits": len(run.edits), "planned": run.config.get("n_edits"), "onset": onset,
           "efficacy": float(ok["efficacy"].mean()) if len(ok) else np.nan,
           "retention_last": float(last["retention"]) if last is not None else np.nan,
           "perplexity_ratio": float(last["perplexity"] / base["perplexity"]) if last is not None else np.nan,
           "edits_per_hour": len(run.edits) / hours if hours else np.nan}
    for task, g in run.downstream.sort_values("edit_index").groupby("task"):
        row[f"{task}_first"], row[f"{task}_last"] = float(g["accuracy"].iloc[0]), float(g["accuracy"].iloc[-1])
    gr = growth_rows(run, name)
    if gr:
        row.update({k: gr[-1][k] for k in ("weight_l1_growth_pct", "weight_fro_growth_pct", "sigma1_growth_pct")})
    return row


TABLES = ("summary", "checkpoints", "downstream", "growth")
MARKERS = ("<!-- SCALE-TABLE -->", "<!-- /SCALE-TABLE -->")


def keep_earlier(new: pd.DataFrame, old_csv: pathlib.Path) -> pd.DataFrame:
    """``new`` plus the rows of ``old_csv`` whose run is not in ``new`` (runs measured in an earlier sitting)."""
    if not old_csv.exists():
        return new
    old = pd.read_csv(old_csv)
    old = old[~old["run"].isin(set(new["run"]))] if "run" in old and "run" in new else old.iloc[:0]
    return pd.concat([new, old], ignore_index=True) if len(old) else new


def _pct(v: float) -> str:
    return "" if pd.isna(v) else f"+{v:.1f} %" if v >= 0 else f"{v:.1f} %"


def findings_table(summary: pd.DataFrame) -> str:
    """The README's table: one row per run, onset, retention, perplexity, downstream, norm growth, speed."""
    head = ("| run | edits (planned) | onset | retention | perplexity | sst2 | mmlu | ‖W‖_F | σ₁ | "
            "edits/hour | sitting |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for _, r in summary.sort_values("run").iterrows():
        down = {t: (f"{r[f'{t}_first']:.3f} → {r[f'{t}_last']:.3f}" if f"{t}_first" in r and
                    pd.notna(r[f"{t}_first"]) else "") for t in ("sst2", "mmlu")}
        lines.append(f"| {r['run']} | {int(r['edits']):,} ({int(r['planned']):,}) | {r['onset']} | "
                     f"{r['retention_last']:.3f} | ×{r['perplexity_ratio']:.2f} | {down['sst2']} | "
                     f"{down['mmlu']} | {_pct(r['weight_fro_growth_pct'])} | {_pct(r['sigma1_growth_pct'])} | "
                     f"{r['edits_per_hour']:.0f} | {'' if pd.isna(r.get('sitting')) else r['sitting']} |")
    return "\n".join(lines)


def write_readme(readme: pathlib.Path, table: str) -> None:
    """Put ``table`` between the README's scale-table markers."""
    text = readme.read_text(encoding="utf-8")
    a, b = text.index(MARKERS[0]), text.index(MARKERS[1])
    readme.write_text(text[:a + len(MARKERS[0])] + "\n" + table + "\n" + text[b:], encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default=str(pathlib.Path.home() / "collapsediag-runs" / "scale"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale"))
    ap.add_argument("--figures", default=str(ROOT / "figures" / "scale"))
    ap.add_argument("--energy", action="store_true")
    ap.add_argument("--readme", default=None, help="write the findings table into this README")
    args = ap.parse_args()
    runs = {p.name: load_run(p) for p in sorted(pathlib.Path(args.runs).expanduser().iterdir())
            if (p / "config.json").exists()}
    runs = {k: r for k, r in runs.items() if len(r.edits)}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frames = {"summary": pd.DataFrame([{**summary_row(r, k), "sitting": sitting(r)} for k, r in runs.items()]),
              "checkpoints": pd.concat([r.evals.assign(run=k) for k, r in runs.items()]),
              "downstream": pd.concat([r.downstream.assign(run=k) for k, r in runs.items()]),
              "growth": pd.DataFrame([x for k, r in runs.items() for x in growth_rows(r, k)])}
    tables = {name: keep_earlier(frames[name], out / f"{name}.csv") for name in TABLES}
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
    energy = {}
    if args.energy:
        from collapsediag.models import load_model
        from collapsediag.runs.rebuild import run_energy

        for k, r in runs.items():
            model, _ = load_model("smollm2-135m")
            energy[str(r.path)] = run_energy(r, model)
        pd.concat([e.assign(run=pathlib.Path(p).name) for p, e in energy.items()]).to_csv(out / "energy.csv",
                                                                                           index=False)
    groups = {g: [r for r in runs.values() if r.config["editor"] in eds] for g, eds in GROUPS.items()}
    groups = {g: rs for g, rs in groups.items() if rs}
    if len(groups) == 2:
        scores, fitted = cross_fit(groups, energy)
        scores.assign(run=scores["run"].map(lambda p: pathlib.Path(p).name)).to_csv(out / "warnings.csv", index=False)
        (out / "thresholds.json").write_text(json.dumps(fitted, indent=1) + "\n")
    write_figures(list(runs.values()), args.figures)
    write_figure(lambda: plot_scale(tables["checkpoints"], tables["downstream"], tables["growth"]),
                 pathlib.Path(args.figures) / "scale")
    summary = tables["summary"]
    if args.readme:
        write_readme(pathlib.Path(args.readme), findings_table(summary))
    print(summary.to_string(index=False))


if __name__ == "__main__":
    main()
