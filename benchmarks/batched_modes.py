"""The same N CounterFact edits with MEMIT and EMMET as N × 1 (sequential), N/B × B (sequential-batch) and
1 × N (batch), plus N sequential D4S edits, on one model. Every run is saved under --out and ends with one
checkpoint that re-tests all N edits on the final model (efficacy, paraphrase, neighborhood, perplexity).

Run: python benchmarks/batched_modes.py --n-edits 64 --batch-size 16 --out runs/modes
     python benchmarks/batched_modes.py --reuse runs/modes      # summarise runs already written
Prints one JSON object per run and a markdown table. Every method edits the same layers (default MEMIT's
3–7), so a target z computed for one run is reused by another when the model is in the same state.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from collapsediag import EditSession, load_model, load_run
from collapsediag.data import load_data
from collapsediag.editors import get_editor
from collapsediag.editors.target import TargetCache
from collapsediag.signals.evaluate import request_probs, request_scores
from collapsediag.requests import EditRequest


def configurations(n: int, b: int) -> list[tuple[str, str, str, int, dict]]:
    """(run name, editor, mode, batch size, extra hyper-parameters) of every run; the batch runs first so
    later runs reuse their targets."""
    grid = [("memit", "batch", n), ("emmet", "batch", n), ("d4s", "sequential", 1)]
    grid += [(e, m, s) for m, s in (("sequential-batch", b), ("sequential", 1)) for e in ("memit", "emmet")]
    runs = [(f"{e}-{n // s}x{s}", e, m, s, {}) for e, m, s in grid]
    return runs + [(f"d4s-remeasure-{n}x1", "d4s", "sequential", 1, {"remeasure_residuals": True})]


def summarise(path: pathlib.Path) -> dict:
    """The figures the closing note quotes, from one saved run."""
    run = load_run(path)
    e, cfg = run.edits, run.config
    ok = e[e["status"] == "ok"]
    last = run.layers[run.layers["edit_index"] == run.layers["edit_index"].max()]
    final = run.evals.iloc[-1] if len(run.evals) else {}
    return {"run": path.name, "editor": cfg["editor"], "mode": cfg.get("mode"), "batch_size": cfg.get("batch_size"),
            "lambda": cfg["hparams"].get("mom2_update_weight"), "edits": len(e), "ok": len(ok),
            "efficacy_after_batch": float(ok["efficacy"].astype(float).mean()),
            "neighborhood_after_batch": float(ok["neighborhood_score"].mean()),
            "efficacy_final": float(final.get("efficacy", np.nan)),
            "paraphrase_final": float(final.get("paraphrase_score", np.nan)),
            "neighborhood_final": float(final.get("neighborhood_score", np.nan)),
            "perplexity_final": float(final.get("perplexity", np.nan)),
            "weight_l1_final": {int(r.layer): float(r.weight_l1) for r in last.itertuples()},
            "weight_l1_initial": {int(k): v["weight_l1"] for k, v in cfg["initial_weights"].items()},
            "edit_seconds": float(e["seconds"].sum()),
            "eval_seconds": float(run.evals["seconds"].sum()) if len(run.evals) else 0.0}


def unedited_scores(model: object, tok: object, records: list[dict]) -> dict:
    """Efficacy, paraphrase and neighborhood scores of the records on the unedited model (the reference
    point of the locality numbers)."""
    reqs = [EditRequest.from_dict(r, case_id=i) for i, r in enumerate(records)]
    probs = [request_probs(model, tok, r) for r in reqs]
    scores = [request_scores(model, tok, r) for r in reqs]
    return {"efficacy": float(np.mean([p_new > p_true for p_new, p_true in probs])),
            "paraphrase": float(np.nanmean([s["paraphrase_score"] for s in scores])),
            "neighborhood": float(np.nanmean([s["neighborhood_score"] for s in scores]))}


def table(rows: list[dict]) -> str:
    """A markdown table of the summaries."""
    out = ["| editor | mode | efficacy (after batch / final) | neighborhood (after batch / final) | "
           "final weight_l1 per layer (initial) | edit s |", "|---|---|---|---|---|---|"]
    for r in rows:
        l1 = ", ".join(f"{k}: {v:.5f} ({r['weight_l1_initial'][k]:.5f})" for k, v in r["weight_l1_final"].items())
        n = r["edits"] // max(1, r["batch_size"] or 1)
        out.append(f"| {r['editor']} | {n} × {r['batch_size']} | {r['efficacy_after_batch']:.3f} / "
                   f"{r['efficacy_final']:.3f} | {r['neighborhood_after_batch']:.3f} / {r['neighborhood_final']:.3f} | "
                   f"{l1} | {r['edit_seconds']:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="counterfact:../shared/data/counterfact.json")
    ap.add_argument("--n-edits", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lambda", dest="lam", type=float, default=None, help="MEMIT and D4S λ (default: the editor's)")
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 4, 5, 6, 7],
                    help="edited layers of every method (the same for all, so they share targets)")
    ap.add_argument("--only", nargs="*", default=None, help="run names to run, e.g. memit-64x1 d4s-64x1")
    ap.add_argument("--out", default="runs/modes")
    ap.add_argument("--reuse", default=None, help="only summarise the runs in this directory")
    ap.add_argument("--unedited", action="store_true", help="only score the records on the unedited model")
    args = ap.parse_args()
    root = pathlib.Path(args.reuse or args.out)
    if args.unedited:
        model, tok = load_model(args.model)
        print(json.dumps({"unedited": unedited_scores(model, tok, load_data(args.data, args.n_edits))}))
        return
    if not args.reuse:
        records = load_data(args.data, args.n_edits)
        model, tok = load_model(args.model)
        templates = None
        cache = TargetCache()
        for name, editor, mode, b, extra in configurations(len(records), args.batch_size):
            if args.only and name not in args.only or (root / name / "evals.jsonl").exists():
                continue
            hp = {"layers": args.layers, **extra}
            if args.lam is not None and editor in ("memit", "d4s"):
                hp["mom2_update_weight"] = args.lam
            t0 = time.perf_counter()
            s = EditSession(model, tok, get_editor(editor, hp), out=root / name, templates=templates,
                            eval_every=len(records), progress=False, target_cache=cache,
                            config={"data": args.data, "n_edits": len(records), "mode": mode, "batch_size": b})
            templates = s.env.templates
            s.run(records, batch_size=b, progress=True)
            s.restore()
            print(json.dumps(dict(summarise(root / name), wall_seconds=time.perf_counter() - t0,
                                  targets={"hits": cache.hits, "misses": cache.misses})),
                  flush=True)
    rows = [summarise(p.parent) for p in sorted(root.glob("*/config.json"))]
    print(table(rows))


if __name__ == "__main__":
    main()
