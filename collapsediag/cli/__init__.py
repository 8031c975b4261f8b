"""Command line: collapsediag run | study | sweep | scan | report | figures | demo.

One module per command group: ``run`` (editing runs), ``scan`` (the risk scan), ``report`` (report and figures of
saved runs) and ``study`` (demo, study and sweep); ``common`` holds what they share. Each command imports the
library lazily, so ``collapsediag --help`` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..errors import CollapseDiagError
from . import report, run, scan, study
from .common import (EXAMPLES, HelpFormatter, common_options, editors_help, find_runs, log, nonnegative_int,
                     parse_value, positive_int, quiet_weight_loading)
from .report import figures_command, report_command
from .run import check_mode, context_lengths, parse_hparams, resume_inputs, run_command
from .scan import scan_command
from .study import demo_command, study_command, sweep_command

__all__ = ["EXAMPLES", "HelpFormatter", "build_parser", "check_mode", "context_lengths", "demo_command", "editors_help",
           "figures_command", "find_runs", "main", "nonnegative_int", "parse_hparams", "parse_value", "positive_int",
           "quiet_weight_loading", "report_command", "resume_inputs", "run_command", "scan_command",
           "setup_logging", "study_command", "sweep_command"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(
        prog="collapsediag", formatter_class=HelpFormatter, parents=[common_options(False)], epilog=EXAMPLES,
        description="Why and when a language model breaks while you edit its knowledge: run knowledge editors "
                    "and record every signal per edit and layer, then report, flag disabling edits and draw "
                    "figures.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = common_options(True)
    run.add_parser(sub, common)
    study.add_study_parser(sub, common)
    study.add_sweep_parser(sub, common)
    scan.add_parser(sub, common)
    report.add_parsers(sub, common)
    study.add_demo_parser(sub, common)
    return p


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """collapsediag's messages to stderr at INFO (DEBUG with -v); other libraries stay at WARNING (INFO with
    -vv); ``quiet`` hides the progress bars. transformers' own bars ("Loading weights") are hidden where the
    command loads a model (``quiet_weight_loading``) unless -vv."""
    from ..progress import set_progress

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    root = logging.getLogger()
    root.setLevel(logging.INFO if verbose > 1 else logging.WARNING)
    if verbose > 1 and not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    set_progress(not quiet)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``collapsediag`` command."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except CollapseDiagError as exc:
        print(f"collapsediag: error: {exc}", file=sys.stderr)
        return 2
