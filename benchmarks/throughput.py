"""MEMIT's throughput with the batch's targets optimised one request at a time against all together.

For each batch size B (default 1, 16 and 100) one update of B CounterFact edits is made from the unedited
model through ``EditSession`` (no checkpoints), once with ``batch_target=false`` and once batched; edits per
hour = B / the update's wall seconds (batch size 1: the median of 3 single edits). The seconds spent in the
target optimisation are timed inside the same runs. Then the batched target optimisation of the largest batch
is run again under ``torch.utils.flop_counter.FlopCounterMode`` (same model state, so the same shapes and steps)
to count its FLOPs, and its achieved GFLOP/s is compared with a dense 2048 × 2048 float32 matmul's in this
process (the practical peak).

Run alone: python benchmarks/throughput.py            (prints one JSON object)
           python benchmarks/throughput.py --sizes 1 4 --n-matmul 5   (a smoke run)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

from collapsediag import EditSession, load_model
from collapsediag.data import load_data
from collapsediag.editors import get_editor, target
from collapsediag.requests import EditRequest

GOAL_SPEEDUP = 2.0
GOAL_PEAK_SHARE = 0.40


class TargetTimer:
    """Wraps ``target.optimise_targets`` (which ``optimise_target`` calls too) and sums its seconds."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._saved = target.optimise_targets

    def __enter__(self) -> "TargetTimer":
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return self._saved(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0

        target.optimise_targets = timed
        return self

    def __exit__(self, *exc: object) -> None:
        target.optimise_targets = self._saved


def one_update(model, tok, records: list[dict], batched: bool, layers: list[int], templates) -> dict:
    """Seconds of one MEMIT update of ``records`` (and of its target optimisation) from the unedited model."""
    editor = get_editor("memit", {"layers": layers, "batch_target": batched})
    with tempfile.TemporaryDirectory() as out:
        s = EditSession(model, tok, editor, out=out, templates=templates, progress=False, eval_every=0,
                        config={"mode": "sequential-batch", "batch_size": len(records)})
        with TargetTimer() as timer:
            t0 = time.perf_counter()
            s.run(records, batch_size=len(records), progress=False)
            seconds = time.perf_counter() - t0
        s.restore()
    return {"seconds": seconds, "target_seconds": timer.seconds}


def matmul_gflops(n: int = 2048, repeats: int = 20) -> float:
    """Median GFLOP/s of a dense n × n float32 matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def target_flops(model, tok, records: list[dict], layers: list[int], templates: list[str]) -> float:
    """FLOPs of the batched target optimisation of ``records`` (forward and backward, from the shapes run)."""
    from torch.utils.flop_counter import FlopCounterMode

    from collapsediag.arch import arch_for

    editor = get_editor("memit", {"layers": layers})
    arch = arch_for(model)
    reqs = [EditRequest.from_dict(r, case_id=i) for i, r in enumerate(records)]
    with FlopCounterMode(display=False) as counter:
        target.optimise_targets(model, tok, reqs, templates, arch.block_name(max(layers)),
                                editor.hparams.target_settings(), arch)
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="counterfact:../shared/data/counterfact.json")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 100])
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 4, 5, 6, 7])
    ap.add_argument("--n-matmul", type=int, default=20, help="repeats of the reference matmul")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    records = load_data(args.data, max(args.sizes) + 2)
    warm = EditSession(model, tok, get_editor("memit", {"layers": args.layers}), progress=False)  # statistics
    templates = warm.env.templates
    out: dict = {"model": args.model, "threads": torch.get_num_threads(), "layers": args.layers,
                 "rows_per_pass": target.ROWS_PER_PASS, "sizes": {}}
    for b in args.sizes:
        row = {}
        for batched in (False, True):
            if b == 1:  # single edits: the median of 3
                got = [one_update(model, tok, records[i:i + 1], batched, args.layers, templates) for i in range(3)]
                secs = statistics.median(g["seconds"] for g in got)
                tsecs = statistics.median(g["target_seconds"] for g in got)
            else:
                g = one_update(model, tok, records[:b], batched, args.layers, templates)
                secs, tsecs = g["seconds"], g["target_seconds"]
            row["batched" if batched else "one_at_a_time"] = {
                "seconds": round(secs, 2), "target_seconds": round(tsecs, 2),
                "edits_per_hour": round(b * 3600 / secs, 1)}
        row["speedup"] = round(row["batched"]["edits_per_hour"] / row["one_at_a_time"]["edits_per_hour"], 3)
        row["target_speedup"] = round(row["one_at_a_time"]["target_seconds"] / row["batched"]["target_seconds"], 3)
        out["sizes"][str(b)] = row
        print(json.dumps({"batch_size": b, **row}), flush=True, file=sys.stderr)
    big = max(args.sizes)
    flops = target_flops(model, tok, records[:big], args.layers, templates)
    achieved = flops / out["sizes"][str(big)]["batched"]["target_seconds"] / 1e9
    peak = matmul_gflops(repeats=args.n_matmul)
    out["flops"] = {"batch_size": big, "target_gflop": round(flops / 1e9, 1), "achieved_gflops": round(achieved, 2),
                    "matmul_2048_gflops": round(peak, 2), "share_of_peak": round(achieved / peak, 3)}
    out["goals"] = {f"speedup_at_{big}": {"measured": out["sizes"][str(big)]["speedup"], "goal": GOAL_SPEEDUP,
                                          "met": out["sizes"][str(big)]["speedup"] >= GOAL_SPEEDUP},
                    "share_of_peak": {"measured": out["flops"]["share_of_peak"], "goal": GOAL_PEAK_SHARE,
                                      "met": out["flops"]["share_of_peak"] >= GOAL_PEAK_SHARE}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
