"""Precision and recall of the cheap disabling-edit flags against the confirmation, on the embedded model.

A sequential ROME run with a checkpoint after every edit (so every signal names one edit) is flagged with
``flag_disabling_edits``; then every edit's update is applied alone to the unedited model and the held-out
perplexity ratio decides whether it disables the model (``confirm_disabling_edits``, passages the run's
checkpoints did not use).

Run: python benchmarks/flag_precision.py --data counterfact:../shared/data/counterfact.json --n-edits 30 \
         --out runs/flags     (--reuse to score a run already there). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

from collapsediag.analysis import flag_disabling_edits, flag_scores
from collapsediag.data import load_data
from collapsediag.editors import get_editor
from collapsediag.signals.fluency import GENERATION_PROMPTS, heldout_texts
from collapsediag.models import load_model
from collapsediag.runs.session import EditSession
from collapsediag.runs.store import load_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="counterfact:../shared/data/counterfact.json")
    ap.add_argument("--n-edits", type=int, default=30)
    ap.add_argument("--editor", default="rome")
    ap.add_argument("--out", default="runs/flags")
    ap.add_argument("--reuse", action="store_true", help="score the run already in --out")
    ap.add_argument("--confirm-ratio", type=float, default=1.5, help="perplexity ratio that confirms an edit")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    texts = heldout_texts()
    run_texts, confirm_texts = texts[:24], texts[24:72]
    model, tok = load_model()
    t0 = time.perf_counter()
    if not args.reuse:
        s = EditSession(model, tok, get_editor(args.editor), out=out, eval_every=1, eval_texts=run_texts,
                        generation_prompts=GENERATION_PROMPTS[:4],
                        config={"data": args.data, "n_edits": args.n_edits, "mode": "sequential", "batch_size": 1})
        s.run(load_data(args.data, args.n_edits))
        s.restore()
    t_run = time.perf_counter() - t0
    run = load_run(out)
    ok = run.edits.loc[run.edits["status"] == "ok", "edit_index"].astype(int).tolist()
    flags = flag_disabling_edits(run)
    t1 = time.perf_counter()
    confirmed = confirm_disabling_edits(run, ok, model, tok, confirm_texts, perplexity_ratio=args.confirm_ratio)
    t_confirm = time.perf_counter() - t1
    scores = flag_scores(flags, confirmed)
    den = run.layers.set_index("edit_index")["denominator"]
    norm = run.layers.set_index("edit_index")["delta_fro"]
    edits = run.edits.set_index("edit_index")
    detail = [{"edit_index": int(r.edit_index), "case_id": str(edits.loc[r.edit_index, "case_id"]),
               "subject": str(edits.loc[r.edit_index, "subject"]), "ratio": round(float(r.ratio), 4),
               "disabling": bool(r.disabling), "denominator": round(float(den.get(r.edit_index)), 4),
               "delta_fro": round(float(norm.get(r.edit_index)), 2),
               "flags": sorted(set(flags.loc[flags["edit_index"] == r.edit_index, "signal"]))}
              for r in confirmed.sort_values("ratio", ascending=False).itertuples()]
    print(json.dumps({"editor": args.editor, "edits": len(run.edits), "ok": len(ok),
                      "confirm_ratio": args.confirm_ratio, "perplexity_base": float(confirmed["perplexity_base"].iloc[0]),
                      "scores": scores.to_dict("records"), "edits_by_ratio": detail,
                      "run_seconds": t_run, "confirm_seconds": t_confirm}, indent=1, default=str))


if __name__ == "__main__":
    main()
