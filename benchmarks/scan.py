"""Pre-edit risk scan throughput on the embedded model, every CounterFact record at layer 5.

Target: 500 records in ≤ 60 s on 2 CPU cores.

Run: python benchmarks/scan.py [--data ../shared/data/counterfact.json] [--layer 5] [--batch-size 128]
                               [--no-share-prefix] [--out scan.csv]
The key statistics are loaded from the cache (computed and cached the first time) before any timing.
Prints one JSON object:
  records, ok                   records scanned, and those with status "ok"
  seconds, records_per_second   the scan(...) call as a user makes it (context templates generated inside)
  templates_seconds             of which: generating the 20 context templates (timed separately)
  batch_size, share_prefix      sequences per forward; whether template prefixes shared their attention cache
  most_at_risk                  the five records ranked first (case_id, subject, denominator)
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

from collapsediag.arch import arch_for
from collapsediag.data import load_counterfact
from collapsediag.editors.context import DEFAULT_LENGTHS, generate_templates
from collapsediag.models import load_model
from collapsediag.signals.scan import scan, write_scan
from collapsediag.stats import StatsCache, TextCorpus

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "counterfact.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="CounterFact JSON (ROME schema)")
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--no-share-prefix", action="store_true", help="run every sequence from its first token")
    ap.add_argument("--out", default=None, help="also write the scan (.csv or .parquet)")
    args = ap.parse_args()

    model, tok = load_model("smollm2-135m")
    records = load_counterfact(pathlib.Path(args.data).resolve())
    stats = StatsCache().get(model, tok, arch_for(model), [args.layer], TextCorpus.packaged(), 100_000)

    t0 = time.perf_counter()
    generate_templates(model, tok, DEFAULT_LENGTHS, seed=0)
    templates_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    df = scan(model, tok, records, args.layer, stats=stats, seed=0, batch_size=args.batch_size,
              share_prefix=not args.no_share_prefix, progress=False)
    seconds = time.perf_counter() - t0
    if args.out:
        write_scan(df, args.out)
    top = df.head(5)
    print(json.dumps({
        "records": len(records), "ok": int((df["status"] == "ok").sum()),
        "seconds": round(seconds, 2), "records_per_second": round(len(records) / seconds, 2),
        "templates_seconds": round(templates_seconds, 2),
        "batch_size": args.batch_size, "share_prefix": not args.no_share_prefix, "layer": args.layer,
        "threads": torch.get_num_threads(),
        "most_at_risk": [{"case_id": r.case_id, "subject": r.subject, "denominator": round(r.denominator, 4)}
                         for r in top.itertuples()],
    }, indent=1))


if __name__ == "__main__":
    main()
