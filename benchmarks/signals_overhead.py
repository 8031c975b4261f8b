"""What the spectral signals cost against the edit itself, on the embedded model (goal: ≤ 5 % of edit time).

Makes N sequential ROME edits (layer 5) and N sequential MEMIT edits (layers 3–7) of CounterFact records with
diagnostics on, timing every call of the spectral tracker (σ₁(W), σ₁ and top-8 of W − W₀ per edited layer).
Prints one JSON line per editor: seconds per edit, spectral seconds per edit, their ratio, all the per-layer
diagnostics of an edit (norms, drift, spectral signals, conditions: ``EditSession._layer_rows``) and their ratio,
the iterations the
warm-started subspace iteration needed per call, and cond(W) seconds per checkpoint (once per checkpoint only).

Run alone: python benchmarks/signals_overhead.py [--n 6]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from collapsediag import EditSession, load_model
from collapsediag.data import load_data
from collapsediag.editors import get_editor
from collapsediag.runs.session import EditSession as Session
from collapsediag.signals.spectral import SpectralTracker


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--data", default="counterfact:../shared/data/counterfact.json")
    args = ap.parse_args()
    records = load_data(args.data, 100 + args.n)[100:]
    model, tok = load_model("smollm2-135m")
    spent: list[float] = []
    iters: list[int] = []
    real_update, real_condition = SpectralTracker.update, SpectralTracker.condition

    def timed_update(self, w):
        t0 = time.perf_counter()
        out = real_update(self, w)
        spent.append(time.perf_counter() - t0)
        iters.append(self.iterations)
        return out

    rows_spent: list[float] = []
    real_rows = Session._layer_rows

    def timed_rows(self, *a, **kw):
        t0 = time.perf_counter()
        out = real_rows(self, *a, **kw)
        rows_spent.append(time.perf_counter() - t0)
        return out

    SpectralTracker.update = timed_update
    Session._layer_rows = timed_rows
    for name in ("rome", "memit"):
        spent.clear()
        iters.clear()
        rows_spent.clear()
        s = EditSession(model, tok, get_editor(name), progress=False, eval_every=0)
        rows = s.run(records, progress=False)
        edit_s = float(np.median([r["seconds"] for r in rows[1:]]))  # the first pays one-time set-up
        per_edit = float(np.median([sum(spent[i:i + len(s.layers)]) for i in range(len(s.layers), len(spent),
                                                                                    len(s.layers))]))
        w = next(iter(s.spectra.values()))
        t0 = time.perf_counter()
        real_condition(s.model.get_submodule(s.arch.rewrite_name(s.layers[0])).weight.detach())
        cond_s = time.perf_counter() - t0
        s.restore()
        print(json.dumps({"editor": name, "layers": len(s.layers), "edits": len(rows), "seconds_per_edit": round(edit_s, 2),
                          "spectral_seconds_per_edit": round(per_edit, 4),
                          "spectral_share": round(per_edit / edit_s, 4),
                          "diagnostics_seconds_per_edit": round(float(np.median(rows_spent[1:])), 4),
                          "diagnostics_share": round(float(np.median(rows_spent[1:])) / edit_s, 4),
                          "iterations_per_call_median": float(np.median(iters[len(s.layers):])),
                          "sigma1_w0": round(w.sigma1_w0, 3),
                          "condition_seconds_per_layer": round(cond_s, 3)}), flush=True)


if __name__ == "__main__":
    main()
