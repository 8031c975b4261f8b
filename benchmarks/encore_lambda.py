"""Choose ENCORE's λ_p (mom2_update_weight) and λ_n (update_norm_lambda) for a model by measurement.

For each (λ_p, λ_n) pair: N CounterFact edits made one after another (ENCORE's setting: sequential, MPES on),
then a checkpoint that re-tests all of them. Prints one JSON line per pair: mean efficacy, paraphrase and
neighborhood scores right after each edit, retention at the end, the final ‖W − W₀‖_F per layer and the mean
MPES step; also appends them to benchmarks/results/encore_lambda.jsonl. The records are those MEMIT's λ was
tuned on (--skip 64), apart from the study's first records.

Run: python benchmarks/encore_lambda.py --data counterfact:../shared/data/counterfact.json --n 16
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from collapsediag import EditSession, load_model
from collapsediag.data import load_data
from collapsediag.editors import get_editor

RESULTS = pathlib.Path(__file__).parent / "results" / "encore_lambda.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="counterfact:../shared/data/counterfact.json")
    ap.add_argument("--skip", type=int, default=64, help="records to skip (keep tuning cases apart from test cases)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--pairs", nargs="+", default=["2000:0", "2000:10", "2000:100", "2000:1000", "15000:10"],
                    help="λ_p:λ_n pairs")
    args = ap.parse_args()
    records = load_data(args.data, args.skip + args.n)[args.skip:]
    model, tok = load_model(args.model)
    templates = None
    for pair in args.pairs:
        lam_p, lam_n = (float(x) for x in pair.split(":"))
        t0 = time.perf_counter()
        editor = get_editor("encore", {"mom2_update_weight": lam_p, "update_norm_lambda": lam_n})
        s = EditSession(model, tok, editor, templates=templates, progress=False, retention_sample=0,
                        eval_every=0, eval_texts=[], generation_prompts=[])
        templates = s.env.templates
        rows = s.run(records, batch_size=1, progress=False)
        end = s.checkpoint()
        last = {r["layer"]: r for r in s.layer_rows if r["edit_index"] == len(records) - 1}
        numel = {layer: s.w0[layer].numel() for layer in last}
        s.restore()
        ok = [r for r in rows if r["status"] == "ok"]
        out = {"lambda_p": lam_p, "lambda_n": lam_n, "n": len(records), "ok": len(ok),
               "efficacy": float(np.mean([r["efficacy"] for r in ok])) if ok else None,
               "paraphrase": float(np.nanmean([r["paraphrase_score"] for r in ok])) if ok else None,
               "neighborhood": float(np.nanmean([r["neighborhood_score"] for r in ok])) if ok else None,
               "retention_end": end["retention"], "neighborhood_end": end["neighborhood_score"],
               "drift_fro_end": {layer: round(r["drift_fro"] * numel[layer], 3) for layer, r in last.items()},
               "mpes_step": float(np.nanmean([r.get("v_mpes_step", np.nan) for r in s.layer_rows])),
               "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(out), flush=True)
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
