"""Choose MEMIT's λ (mom2_update_weight) for a model by measurement: one batch of N CounterFact edits per λ
(or, with --single, N single edits each made on the unedited model).

The targets z are computed once (batch mode computes them on the unedited model, so every λ shares them);
for each λ the keys, the update and the scores are recomputed. Prints one JSON line per λ.

Run: python benchmarks/memit_lambda.py --data counterfact:../shared/data/counterfact.json --skip 64 --n 16
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from collapsediag import EditSession, load_model
from collapsediag.data import load_data
from collapsediag.editors import get_editor
from collapsediag.editors.target import TargetCache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="counterfact:../shared/data/counterfact.json")
    ap.add_argument("--skip", type=int, default=64, help="records to skip (keep tuning cases apart from test cases)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--editor", default="memit")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[15000, 2000, 200, 20, 2])
    ap.add_argument("--single", action="store_true",
                    help="one edit per update, each on the unedited model, instead of one batch of N")
    args = ap.parse_args()
    records = load_data(args.data, args.skip + args.n)[args.skip:]
    model, tok = load_model(args.model)
    cache = TargetCache()
    templates = None
    for lam in args.lambdas:
        t0 = time.perf_counter()
        s = EditSession(model, tok, get_editor(args.editor, {"mom2_update_weight": lam}), templates=templates,
                        progress=False, target_cache=cache)
        templates = s.env.templates
        if args.single:
            rows, layers = [], []
            for r in records:
                rows += s.edit_batch([r])
                layers += s.layer_rows[-len(s.layers):]
                s.restore()
        else:
            rows = s.run(records, batch_size=len(records), progress=False)
            layers = s.layer_rows
            s.restore()
        ok = [r for r in rows if r["status"] == "ok"]
        print(json.dumps({
            "lambda": lam, "ok": len(ok), "efficacy": float(np.mean([r["efficacy"] for r in ok])) if ok else None,
            "paraphrase": float(np.nanmean([r["paraphrase_score"] for r in ok])) if ok else None,
            "neighborhood": float(np.nanmean([r["neighborhood_score"] for r in ok])) if ok else None,
            "delta_fro": {r["layer"]: round(float(np.mean([x["delta_fro"] for x in layers if x["layer"] == r["layer"]])), 2)
                          for r in layers},
            "z_error": round(layers[0]["z_error"], 2) if layers else None,
            "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
