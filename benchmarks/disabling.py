"""Validation of the risk scan and the disabling-edit flags against real single edits (issue 13).

1. Scan every record of CounterFact (500 records) at layer 5 on the embedded model (no edit made).
2. Take the 15 records the scan ranks most at risk and a seeded random sample of 30 others.
3. Edit each of them alone on the unedited model with ROME and with r-ROME (same templates, statistics and
   v*: r-ROME reuses ROME's target through a shared TargetCache), measure held-out perplexity right after the
   edit, and put the weights back.
4. Score against the collapse criterion "perplexity ratio ≥ 2 with the edit alone": Spearman(1/denominator,
   ratio), precision and recall of each flag signal (``flag_disabling_edits`` with its defaults, on runs that
   have no checkpoints) and of the scan's top-k, for ROME and for r-ROME.

Run: python benchmarks/disabling.py [--out runs/disabling] [--reuse]   (--reuse rescores saved edits)
Writes benchmarks/results/disabling.json and disabling_edits.csv, and prints the JSON.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from collapsediag.analysis import COLLAPSE_RATIO, flag_disabling_edits, flag_scores
from collapsediag.data import load_counterfact
from collapsediag.signals.fluency import heldout_texts
from collapsediag.models import load_model
from collapsediag.signals.scan import read_scan, scan, write_scan
from collapsediag.runs.store import load_run
from collapsediag.experiments.alone import edit_each_alone

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "counterfact.json"


def select(df: pd.DataFrame, top: int, sample: int, seed: int) -> pd.DataFrame:
    """The ``top`` records most at risk, then ``sample`` others drawn with ``seed``."""
    ok = df[df["status"] == "ok"].sort_values("risk_rank")
    head = ok.head(top)
    rest = ok.iloc[top:].sample(n=min(sample, len(ok) - top), random_state=seed)
    return pd.concat([head.assign(group="top"), rest.assign(group="random")], ignore_index=True)


def make_edits(model, tok, records: list[dict], chosen: pd.DataFrame, out: pathlib.Path, texts: list[str],
               templates: list[str], layer: int) -> pd.DataFrame:
    """Each chosen record edited alone by ROME and r-ROME; one row per (editor, record) with the ratio."""
    index = chosen["record_index"].astype(int).tolist()
    edits = edit_each_alone(model, tok, [records[i] for i in index], ["rome", "r-rome"], texts, layer=layer,
                            templates=templates, out=out, log=lambda m: print(m, flush=True))
    edits["record_index"] = [i for i in index for _ in range(2)]
    return edits


def score(edits: pd.DataFrame, chosen: pd.DataFrame, out: pathlib.Path) -> dict:
    """Spearman, per-signal precision/recall and the scan's top-k, per editor."""
    result: dict = {"criterion": f"perplexity ratio >= {COLLAPSE_RATIO} with the edit alone"}
    scan_rank = chosen.set_index("record_index")["risk_rank"]
    for name in ("rome", "r-rome"):
        run = load_run(out / name)
        e = edits[edits["editor"] == name].copy()
        e["disabling"] = e["ratio"] >= COLLAPSE_RATIO
        layers = run.layers.set_index("edit_index")
        e["denominator"] = e["edit_index"].map(layers["denominator"])
        flags = flag_disabling_edits(run)
        table = flag_scores(flags, e[["edit_index", "disabling"]])
        rank = e["record_index"].map(scan_rank)
        topk = []
        for k in (5, 10, 15):
            hit = set(e.loc[rank <= rank.nsmallest(k).max(), "edit_index"])
            truth = set(e.loc[e["disabling"], "edit_index"])
            tp = len(hit & truth)
            topk.append({"signal": f"scan top-{k}", "flagged": len(hit), "disabling": len(truth),
                         "true_positives": tp, "precision": tp / len(hit) if hit else np.nan,
                         "recall": tp / len(truth) if truth else np.nan})
        table = pd.concat([table, pd.DataFrame(topk)], ignore_index=True)
        e["update_ratio"] = e["edit_index"].map(layers["update_ratio"])
        e["key_ratio"] = e["denominator"] / e["edit_index"].map(layers["denominator_consistent"])
        sweep = []
        for column, op, values in (("update_ratio", ">", (1.5, 1.7, 2.0, 2.2, 3.0)),
                                   ("key_ratio", "<", (0.005, 0.01, 0.02, 0.05, 0.3))):
            for t in values:
                sel = e[column] > t if op == ">" else e[column] < t
                tp = int((sel & e["disabling"]).sum())
                sweep.append({"rule": f"{column} {op} {t}", "flagged": int(sel.sum()), "true_positives": tp,
                              "precision": tp / sel.sum() if sel.sum() else np.nan,
                              "recall": tp / e["disabling"].sum() if e["disabling"].sum() else np.nan})
        ok = e.dropna(subset=["denominator", "ratio"])
        rho = spearmanr(1 / ok["denominator"].abs(), ok["ratio"]).statistic
        result[name] = {"edits": len(e), "disabling": int(e["disabling"].sum()),
                        "spearman_inv_denominator_ratio": float(rho),
                        "ratio_max": float(e["ratio"].max()), "ratio_median": float(e["ratio"].median()),
                        "scores": table.to_dict("records"), "threshold_sweep": sweep,
                        "by_ratio": e.sort_values("ratio", ascending=False).head(6)[
                            ["case_id", "ratio", "update_ratio", "key_ratio", "denominator"]].to_dict("records"),
                        "flagged": sorted(int(i) for i in flags["edit_index"].unique())}
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--sample", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--passages", type=int, default=24, help="held-out passages for perplexity")
    ap.add_argument("--out", default="runs/disabling")
    ap.add_argument("--reuse", action="store_true", help="rescore the scan and edits already in --out")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    if args.reuse:
        df = read_scan(out / "scan.parquet")
        edits = pd.read_csv(out / "edits.csv")
        saved = results / "disabling.json"
        scan_seconds = json.loads(saved.read_text()).get("scan_seconds") if saved.exists() else None
    else:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("rome", "r-rome"):
            if (out / name).exists():
                raise SystemExit(f"{out / name} exists: remove it or use --reuse")
        model, tok = load_model()
        records = load_counterfact(args.data)
        t0 = time.perf_counter()
        df = scan(model, tok, records, args.layer, seed=args.seed)
        scan_seconds = time.perf_counter() - t0
        write_scan(df, out / "scan.parquet")
        chosen = select(df, args.top, args.sample, args.seed)
        edits = make_edits(model, tok, records, chosen, out, heldout_texts(max_passages=args.passages),
                           df.attrs["context_templates"], args.layer)
        edits.to_csv(out / "edits.csv", index=False)
    chosen = select(df, args.top, args.sample, args.seed)
    result = {"records_scanned": len(df), "scan_seconds": scan_seconds, "top": args.top, "sample": args.sample,
              "seed": args.seed, "layer": args.layer, **score(edits, chosen, out)}
    detail = edits.merge(chosen[["record_index", "risk_rank", "group", "subject", "prompt", "denominator",
                                 "denominator_consistent", "denominator_ratio", "key_cosine",
                                 "subject_first_token"]], on="record_index")
    detail.to_csv(results / "disabling_edits.csv", index=False)
    (results / "disabling.json").write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
