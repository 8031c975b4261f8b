"""What a checkpoint's re-test of earlier edits costs on the embedded model.

Scores every rewrite, paraphrase and neighborhood prompt of N CounterFact records with their new and true
targets (``checkpoints.scored_prompts``, as a checkpoint re-testing N edits does) through ``target_probs``.
Prints one JSON object: the prompt-target pairs, the forward sequences they need (pairs with the same
teacher-forced inputs share one), and the median seconds of 3 repeats.

Run alone: python benchmarks/checkpoint_scoring.py [--n 100]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from collapsediag import load_model
from collapsediag.runs.checkpoints import scored_prompts
from collapsediag.data import load_data
from collapsediag.signals.evaluate import target_probs
from collapsediag.requests import EditRequest
from collapsediag.tokens import continuation, encode, target_ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100, help="records re-tested")
    ap.add_argument("--data", default="counterfact:../shared/data/counterfact.json")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    reqs = [EditRequest.from_dict(r, case_id=i) for i, r in enumerate(load_data(args.data, args.n))]
    prompts, targets, _, _ = scored_prompts(reqs)
    inputs = {tuple(continuation(encode(tok, p), target_ids(tok, t))[0]) for p, t in zip(prompts, targets)}
    target_probs(model, tok, prompts[:64], targets[:64])  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        target_probs(model, tok, prompts, targets)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"records": len(reqs), "pairs": len(prompts), "distinct_inputs": len(inputs),
                      "seconds_median": round(statistics.median(times), 2),
                      "seconds_per_record": round(statistics.median(times) / len(reqs), 3),
                      "seconds_all": [round(t, 2) for t in times]}))


if __name__ == "__main__":
    main()
