"""``collapsediag scan``: the pre-edit risk table of every record at one or more layers."""
from __future__ import annotations

import argparse
import pathlib
from typing import Any

from ..errors import CollapseDiagError
from .common import HelpFormatter, load_model_of, model_option, nonnegative_int, positive_int, stats_corpus, stats_options

def scan_command(args: argparse.Namespace) -> int:
    """``collapsediag scan``: the pre-edit risk table of every record (no edit made), sorted by risk."""
    import pandas as pd

    from ..checks import check_layers, check_records
    from ..data import load_data
    from ..models import load_config, n_layers
    from ..analysis.report import readable
    from ..signals.scan import scan, write_scan
    from ..stats import StatsCache

    if pathlib.Path(args.out).suffix.lower() not in (".csv", ".parquet"):
        raise CollapseDiagError(f"--out must end in .csv or .parquet, got {args.out!r}")
    records = check_records(load_data(args.data, args.n_edits), args.data, warn=False)  # scan warns itself
    check_layers(args.layers, n_layers(load_config(args.model)), args.model)
    model, tok = load_model_of(args)
    corpus, cache = stats_corpus(args), StatsCache(args.cache_dir)
    frames: list[pd.DataFrame] = []
    for layer in args.layers:  # the context templates do not depend on the layer: generated once
        df = scan(model, tok, records, layer, editor=args.editor, corpus=corpus, stats_tokens=args.stats_tokens,
                  cache=cache, seed=args.seed, batch_size=args.batch_size,
                  templates=frames[0].attrs["context_templates"] if frames else None)
        frames.append(df.assign(layer=layer))
    df = pd.concat(frames, ignore_index=True).sort_values(["risk_rank", "layer"], kind="stable")
    df = df.reset_index(drop=True)
    df.attrs = dict(frames[0].attrs, layer=args.layers[0] if len(args.layers) == 1 else list(args.layers),
                    data=args.data,
                    stats={str(f.attrs["layer"]): f.attrs["stats"] for f in frames},
                    module={str(f.attrs["layer"]): f.attrs["module"] for f in frames})
    path = write_scan(df, args.out)
    cols = ["risk_rank", "layer", "case_id", "subject", "denominator", "denominator_consistent",
            "denominator_ratio", "key_cosine", "subject_first_token"]
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 30):
        print(readable(df[cols].head(args.top)).to_string(index=False))
    print(f"\n{len(df)} rows ({len(records)} records x {len(args.layers)} layers) written to {path}")
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``scan`` subcommand."""
    sc = sub.add_parser("scan", help="pre-edit risk scan: ROME's denominators and key geometry of every record, "
                                     "no edit made", parents=[common], formatter_class=HelpFormatter,
                        description="Rank records by the risk that a ROME edit disables the model, from their keys "
                                    "alone (same statistics, context templates and key code as a run).")
    model_option(sc)
    sc.add_argument("--data", required=True, help="counterfact:PATH, zsre:PATH, facts:PATH or own")
    sc.add_argument("--layers", type=int, nargs="+", required=True, help="layer(s) to scan, 0-based")
    sc.add_argument("--editor", default="rome", choices=["rome", "r-rome"],
                    help="whose denominator ranks the records (both are always recorded)")
    sc.add_argument("--out", required=True, help="output table, .csv or .parquet (metadata beside it, .meta.json)")
    sc.add_argument("--n-edits", type=positive_int, default=None, help="scan the first N records (default: all)")
    sc.add_argument("--seed", type=int, default=0, help="seed of the context templates (as a run with that seed)")
    sc.add_argument("--batch-size", type=positive_int, default=128, help="sequences per forward")
    sc.add_argument("--top", type=nonnegative_int, default=10, help="rows of the risk table to print")
    stats_options(sc)
    sc.set_defaults(func=scan_command)
