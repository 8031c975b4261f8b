"""The pre-edit guard on the long study's ROME records: are edits 163 and 195 warned before they are made?

The long study edited the first 300 records of CounterFact (counterfact.json, file order) with ROME at layer 5
of the embedded model; edits 163 (case 17674) and 195 (case 10214) disabled it (perplexity ×3.1 and ×81.8).
ROME's keys at layer 5 are the inputs of the matrix it edits, computed by layers 0–4 and layer 5's attention,
none of which ROME changes, and C is fixed: so the guard reads, before edit i, exactly what it reads on the
unedited model. This script builds the run's EditSession (same templates seed, statistics and editor) with
``--guard warn`` and screens all 300 requests through the session's own guard path, without editing.

Run: python benchmarks/guard.py [--data ../shared/data/counterfact.json] [--n 300]
Writes benchmarks/results/guard.json and prints it.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

from collapsediag import EditSession, get_editor
from collapsediag.data import load_data
from collapsediag.models import load_model
from collapsediag.requests import as_request
from collapsediag.runs.guard import Guard

ROOT = pathlib.Path(__file__).resolve().parents[1]
DISABLING = {163: "17674", 195: "10214"}  # benchmarks/results/study/findings.md, rome


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "counterfact.json"))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--ratio", type=float, default=Guard().min_ratio)
    args = ap.parse_args()
    records = load_data(f"counterfact:{args.data}", args.n)
    model, tok = load_model("smollm2-135m")
    session = EditSession(model, tok, get_editor("rome", {"layer": 5}), guard=Guard("warn", args.ratio),
                          progress=False)
    t0 = time.perf_counter()
    todo = [({"edit_index": i}, as_request(r, i)) for i, r in enumerate(records)]
    session._screen(todo)  # noqa: SLF001  (the session's own pre-edit path, here without the edits)
    seconds = time.perf_counter() - t0
    rows = session.guard_rows
    warned = [r for r in rows if r["risky"]]
    out = {"records": len(records), "min_ratio": args.ratio, "seconds": round(seconds, 1),
           "warned": [{"edit_index": r["edit_index"], "case_id": r["case_id"],
                       "denominator_ratio": r["denominator_ratio"], "key_cosine": r["key_cosine"],
                       "subject_first_token": r["subject_first_token"]} for r in warned],
           "disabling_warned": {str(i): any(r["edit_index"] == i and r["case_id"] == c for r in warned)
                                for i, c in DISABLING.items()}}
    (ROOT / "benchmarks" / "results" / "guard.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
