"""Loading published key statistics (kmeng01/rome npz layout) against computing them, on the embedded model.

Computes C for the edited layers from the packaged corpus into an empty cache (what a first run pays), writes
it in rome's layout (Σkkᵀ unnormalised, float32, `mom2.count`, `sample_size`), and times `published_stats`
reading it back. Prints one JSON line.

Run alone: python benchmarks/published_stats.py [--layers 3 4 5 6 7] [--tokens 100000]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import numpy as np

from collapsediag import arch_for, load_model
from collapsediag.editors.published import published_stats
from collapsediag.stats import StatsCache, TextCorpus


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 4, 5, 6, 7])
    ap.add_argument("--tokens", type=int, default=100_000)
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    arch = arch_for(model)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        stats = StatsCache(pathlib.Path(tmp) / "cache").get(model, tok, arch, args.layers, TextCorpus.packaged(),
                                                             n_tokens=args.tokens, progress=False)
        computed = time.perf_counter() - t0
        folder = pathlib.Path(tmp) / "stats" / "smollm2-135m" / "wikipedia_stats"
        folder.mkdir(parents=True)
        for layer, s in stats.items():
            np.savez(folder / f"{arch.rewrite_name(layer)}_float32_mom2_{s.count}.npz",
                     **{"mom2.mom2": (s.mom2.numpy() * s.count).astype(np.float32), "mom2.count": np.array(s.count),
                        "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
                        "sample_size": np.array(s.count)})
        t0 = time.perf_counter()
        loaded = published_stats(pathlib.Path(tmp) / "stats", model, arch, args.layers, "smollm2-135m")
        load = time.perf_counter() - t0
        err = max(float((loaded[k].mom2 - stats[k].mom2).abs().max() / stats[k].mom2.abs().max()) for k in stats)
    print(json.dumps({"layers": args.layers, "tokens": args.tokens, "compute_seconds": round(computed, 2),
                      "load_seconds": round(load, 3), "speedup": round(computed / load, 1),
                      "max_relative_difference": err}))


if __name__ == "__main__":
    main()
