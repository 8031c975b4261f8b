"""Downstream ability of the unedited embedded model, and what scoring it costs at a checkpoint.

For each task (default: the six built-in ones at n = 200, the subsets a run with ``--downstream`` scores):
the accuracy, its 95 % Wilson interval, chance (always the most common answer), whether the task is
informative for this model (the interval excludes chance), F1 and MCC where the task has them, the prompt
tokens scored, the tokens run per example (``tokens_per_example``: ``full`` with every prompt whole, ``shared``
with the demonstrations' common prefix run once per task, and the prefix's length), and the seconds the
scoring took (one checkpoint's cost for that task). Prints one JSON object.

Run alone: python benchmarks/downstream.py [--n 200] [--tasks sst2,mmlu] [--data DIR]
Quick check: python benchmarks/downstream.py --quick   (n = 8, sst2 and mmlu)
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from collapsediag import load_model
from collapsediag.signals.downstream import builtin_tasks, load_tasks
from collapsediag.signals.downstream_score import (encoded, is_informative, max_length, score_task, token_counts,
                                           wilson_interval)


def _round(v: float, k: int = 4) -> float | None:
    return None if v != v else round(float(v), k)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="examples per task")
    ap.add_argument("--tasks", default=",".join(builtin_tasks()), help="comma-separated tasks")
    ap.add_argument("--data", default=None, help="built-in tasks' data folder (default: see downstream.data_dir)")
    ap.add_argument("--quick", action="store_true", help="n = 8 on sst2 and mmlu (checks that it runs)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.tasks = 8, "sst2,mmlu"
    tasks = load_tasks(args.tasks, args.data, args.n)
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    load_s = time.perf_counter() - t0
    out = {"model": "smollm2-135m", "n": args.n, "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "load_seconds": round(load_s, 1), "tasks": {}}
    for task in tasks:
        row = score_task(model, tok, task)
        lo, hi = wilson_interval(row["accuracy"], row["n"])
        contexts, _ = encoded(task, tok, max_length(model))
        out["tasks"][task.name] = {
            "n": row["n"], "shots": task.spec.shots, "accuracy": _round(row["accuracy"]),
            "ci95": [_round(lo), _round(hi)], "chance": _round(row["chance"]),
            "informative": is_informative(row["accuracy"], row["n"], row["chance"]),
            "f1": _round(row["f1"]), "mcc": _round(row["mcc"]),
            "prompt_tokens_mean": round(sum(map(len, contexts[::len(task.labels)])) / row["n"], 1),
            "tokens_per_example": {k: round(v, 1) for k, v in token_counts(task, tok, max_length(model)).items()},
            "seconds": round(row["seconds"], 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
