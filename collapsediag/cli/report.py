"""``collapsediag report`` and ``collapsediag figures``: tables and figures of saved runs (no model loaded)."""
from __future__ import annotations

import argparse
import pathlib
from typing import Any

from .common import HelpFormatter, find_runs

def report_command(args: argparse.Namespace) -> int:
    """``collapsediag report DIR [DIR ...]``: runs, sweep folders or folders of runs."""
    from ..analysis.report import format_report, markdown_table, text_table
    from ..runs.store import load_run
    from ..experiments.sweep import sweep_table

    dirs = find_runs(args.dirs)
    for d in args.dirs:
        if (pathlib.Path(d) / "sweep.json").exists():
            table = sweep_table(d)
            print(f"Sweep {d} ({len(table)} cells)")
            print((markdown_table(table) if args.format == "markdown" else text_table(table)) + "\n")
    print(format_report([load_run(d) for d in dirs], fmt=args.format), end="")
    return 0


def figures_command(args: argparse.Namespace) -> int:
    """``collapsediag figures DIR [DIR ...] --out figures/``: every figure as PNG and PDF (runs, sweep folders or
    folders of runs)."""
    import pandas as pd

    from ..analysis.flags import disabling_edits
    from ..plots.figures import write_figures
    from ..signals.scan import read_scan
    from ..runs.store import load_run

    runs = [load_run(d) for d in find_runs(args.dirs)]
    disabling = {r.path.name: disabling_edits(r) for r in runs}
    # on ROME's risk scan, mark the ROME runs' collapses
    confirmed = [d for r in runs if r.config.get("editor") == "rome" and len(d := disabling[r.path.name])]
    for path in write_figures(runs, args.out, scan=read_scan(args.scan) if args.scan else None,
                              disabling=disabling, confirmed=pd.concat(confirmed) if confirmed else None):
        print(path)
    return 0


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``report`` and ``figures`` subcommands."""
    rp = sub.add_parser("report", help="summary, flagged edits and forgetting phases of saved runs",
                        parents=[common], formatter_class=HelpFormatter)
    rp.add_argument("dirs", nargs="+", help="run folders, sweep folders or folders of runs (e.g. runs/demo); "
                                            "other folders are skipped")
    rp.add_argument("--format", default="text", choices=["text", "markdown"], help="output format")
    rp.set_defaults(func=report_command)

    fg = sub.add_parser("figures", help="write the figures of saved runs (PNG and PDF)", parents=[common],
                        formatter_class=HelpFormatter)
    fg.add_argument("dirs", nargs="+", help="run folders, sweep folders or folders of runs (e.g. runs/demo); "
                                            "other folders are skipped")
    fg.add_argument("--out", default="figures", help="folder for the figures")
    fg.add_argument("--scan", default=None,
                    help="a risk scan (.csv or .parquet from collapsediag scan) to draw with the runs' disabling "
                         "edits marked (default: none)")
    fg.set_defaults(func=figures_command)
