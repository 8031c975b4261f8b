"""``collapsediag demo``, ``study`` and ``sweep``: the experiments (``collapsediag.experiments``) from the command line."""
from __future__ import annotations

import argparse
import pathlib
from typing import Any

from ..errors import CollapseDiagError
from ..runs.checkpoints import DEFAULT_SAMPLE
from .common import (HelpFormatter, load_model_of, model_option, nonnegative_int, parse_value, positive_int,
                     stats_corpus, stats_options)

def demo_command(args: argparse.Namespace) -> int:
    """``collapsediag demo``: the risk scan of the own facts, then the study on the embedded model, its report
    (naming the disabling edit and why), figures and findings."""
    import dataclasses
    import time

    from ..data import own_facts
    from ..editors.rome import Rome
    from ..plots.figures import write_figures
    from ..analysis.report import format_report, markdown_table, text_table, wrap_text
    from ..signals.scan import write_scan
    from ..stats import StatsCache
    from ..experiments.demo import (SIZES, demo_scan, disabling_by_run, run_study, study_findings, study_layers,
                        warm_statistics)

    t0 = time.perf_counter()
    size = SIZES[args.size]
    if args.n_edits:
        size = dataclasses.replace(size, n_edits=args.n_edits,
                                   batch_sizes=tuple(sorted({min(b, args.n_edits) for b in size.batch_sizes})))
    out = pathlib.Path(args.out)
    figures_dir = pathlib.Path(args.figures) if args.figures else out / "figures"
    hparams = parse_value(pathlib.Path(args.hparams).read_text() if args.hparams and pathlib.Path(args.hparams).exists()
                     else args.hparams) if args.hparams else None
    if hparams is not None and not isinstance(hparams, dict):
        raise CollapseDiagError(f"--hparams must be a JSON object {{editor: {{key: value}}}}, got {args.hparams!r}")
    model, tok = load_model_of(args)
    cache = StatsCache(args.cache_dir)
    facts = own_facts()
    # one pass over the corpus for every layer the scan and the runs read (ROME's 5 lies inside MEMIT's 3–7)
    warm_statistics(model, tok, study_layers(size, hparams), stats_tokens=args.stats_tokens, cache=cache)
    risk = demo_scan(model, tok, facts, size, hparams=hparams, stats_tokens=args.stats_tokens, cache=cache,
                     seed=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    write_scan(risk, out / "scan.csv")
    cols = ["risk_rank", "case_id", "denominator", "denominator_consistent", "denominator_ratio", "key_cosine",
            "subject_first_token", "in_demo"]
    print(wrap_text(f"Risk scan of the {len(risk)} own facts at layer {risk.attrs['layer']} (no edit made; "
                    f"denominator = ROME's k_uᵀu, denominator_consistent = r-ROME's k̄ᵀu):"))
    print(text_table(risk[cols].head(6)) + "\n")
    runs = run_study(model, tok, facts, out, size, hparams=hparams, stats_tokens=args.stats_tokens,
                     cache=cache, seed=args.seed, templates={Rome.context_lengths: risk.attrs["context_templates"]})
    disabling = disabling_by_run(runs)
    figures = write_figures(list(runs.values()), figures_dir, scan=risk, disabling=disabling,
                            confirmed=disabling.get("rome"))
    findings = study_findings(runs)
    table = markdown_table(findings)
    (out / "findings.md").write_text(table)
    findings.to_csv(out / "findings.csv", index=False)
    print(format_report(list(runs.values())))
    print(f"figures: {len(figures)} files in {figures_dir}")
    print(wrap_text(f"runs: {out}; risk scan in {out / 'scan.csv'}; findings also in {out / 'findings.md'}"))
    print(f"\nFindings ({args.size} study, {size.n_edits} edits per run, {time.perf_counter() - t0:.0f} s):")
    print(text_table(findings))
    return 0


def study_command(args: argparse.Namespace) -> int:
    """``collapsediag study``: the long study (sequential runs of every editor, then the batch study), resumable."""
    from ..checks import check_records
    from ..data import load_data
    from ..experiments.longstudy import LongStudyPlan, run_long_study
    from ..stats import StatsCache

    if args.report:
        from ..experiments.studyreport import write_study_report

        print(write_study_report(args.out, args.figures))
        return 0
    if args.data is None:
        raise CollapseDiagError("--data is required to run the study (leave it out only with --report)")
    plan = LongStudyPlan(n_edits=args.n_edits, editors=tuple(args.editors), eval_every=args.eval_every,
                         retention_sample=args.retention_sample, batch_editors=tuple(args.batch_editors),
                         batch_sizes=tuple(args.batch_sizes), batch_edits=args.batch_edits, seed=args.seed)
    need = max(plan.n_edits, plan.batch_edits if args.batch_editors else 0)
    records = check_records(load_data(args.data, need), args.data)
    model, tok = load_model_of(args)
    parts = ("seq", "batch") if args.part == "all" else (args.part,)
    result = run_long_study(model, tok, records, args.out, plan, batches=bool(args.batch_editors), parts=parts,
                            data=args.data,
                            corpus=stats_corpus(args), cache=StatsCache(args.cache_dir), stats_tokens=args.stats_tokens,
                            progress=not args.quiet)
    from ..experiments.studyreport import write_study_report

    print(write_study_report(args.out, args.figures))
    print(f"study in {args.out}: {len(result['seq'])} sequential runs, {len(result['batch'])} batch runs "
          f"(timings in {pathlib.Path(args.out) / 'study.json'}, findings in {pathlib.Path(args.out) / 'findings.md'})")
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    """``collapsediag sweep SPEC.toml --out DIR``: every cell of the grid, skipping finished ones."""
    from ..experiments.sweep import sweep, sweep_table

    t0 = __import__("time").perf_counter()
    results = sweep(args.spec, args.out, engine=args.engine, workers=args.workers, address=args.address)
    failed = [r for r in results if r["returncode"] != 0]
    done = sum(not r["skipped"] for r in results)
    print(f"{len(results)} cells: {done} run, {len(results) - done} already finished, {len(failed)} failed "
          f"({__import__('time').perf_counter() - t0:.0f} s, engine {args.engine})")
    for r in failed:
        print(f"  {r['cell']}: exit {r['returncode']} (stderr in {pathlib.Path(args.out) / (r['cell'] + '.err')})")
    from ..analysis.report import readable

    print(readable(sweep_table(args.out)).to_string(index=False))
    return 1 if failed else 0


def add_study_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``study`` subcommand."""
    st = sub.add_parser("study", help="the long study: hundreds of sequential edits per editor, then MEMIT and EMMET "
                                      "at several batch sizes (resumable: run it again to go on)",
                        parents=[common], formatter_class=HelpFormatter,
                        description="Sequential runs of every editor over the same records (advanced together, one "
                                    "checkpoint interval at a time), then the batch study; each run resumes where it "
                                    "stopped when the command is run again with the same --out.")
    model_option(st)
    st.add_argument("--data", default=None, help="counterfact:PATH, zsre:PATH, facts:PATH or own (required, except "
                                                 "with --report)")
    st.add_argument("--report", action="store_true",
                    help="edit nothing: write findings.md and the figures of the runs made so far, and print them")
    st.add_argument("--figures", default=None, help="figure directory (default: OUT/figures)")
    st.add_argument("--n-edits", type=positive_int, default=300, help="sequential edits per editor")
    st.add_argument("--out", required=True, help="study directory (seq/<editor>, batch/<editor>-b<B>, study.json)")
    st.add_argument("--editors", nargs="+", default=["rome", "r-rome", "memit", "d4s", "alphaedit", "encore"],
                    help="editors of the sequential runs")
    st.add_argument("--eval-every", type=positive_int, default=25, help="checkpoint every K edits")
    st.add_argument("--retention-sample", type=nonnegative_int, default=DEFAULT_SAMPLE, metavar="M",
                    help="older edits re-tested per checkpoint, seeded (0: all)")
    st.add_argument("--batch-editors", nargs="*", default=["memit", "emmet"],
                    help="editors of the batch study (none: skip it)")
    st.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 16, 64, 256],
                    help="batch sizes of the batch study")
    st.add_argument("--batch-edits", type=positive_int, default=256, help="edits of each batch-study run")
    st.add_argument("--part", choices=["all", "seq", "batch"], default="all",
                    help="run only the sequential runs or only the batch study; processes may run parts at once "
                         "(give each OMP_NUM_THREADS=1 on a small machine): the sequential part in one, the batch "
                         "part in several, which share its runs; the batch part alone "
                         "leaves the runs it forks from a sequential run for a later call")
    st.add_argument("--seed", type=int, default=0, help="seed of the context templates, v* and generations")
    stats_options(st)
    st.set_defaults(func=study_command)


def add_sweep_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``sweep`` subcommand."""
    sw = sub.add_parser("sweep", help="a grid of runs from a TOML spec (local processes or Ray tasks); run it again "
                                      "to finish what is missing", parents=[common], formatter_class=HelpFormatter,
                        description="Every cell of SPEC's [grid] (lists multiply out) as one run in OUT/<cell>; "
                                    "finished cells are skipped, unfinished ones resumed. See examples/sweep.toml.")
    sw.add_argument("spec", help="the sweep's TOML file")
    sw.add_argument("--out", required=True, help="sweep directory (one run per cell, sweep.json)")
    sw.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="local: processes on this machine; ray: one Ray task per cell ([resources] of SPEC)")
    sw.add_argument("--workers", type=positive_int, default=1, help="--engine local: cells at once")
    sw.add_argument("--address", default=None,
                    help="--engine ray: auto or HOST:PORT of a running cluster (default: start a local one)")
    sw.set_defaults(func=sweep_command)


def add_demo_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand."""
    d = sub.add_parser("demo", help="the study: a risk scan of the own facts, then ROME, r-ROME, MEMIT (sequential "
                                    "and batched) and D4S on the embedded model, with figures and findings",
                       parents=[common], formatter_class=HelpFormatter,
                       description="The demo study on the embedded model and the project's own facts.")
    d.add_argument("--size", choices=["small", "full"], default="small",
                   help="small: 8 edits per run (about 12 min on 2 cores); full: 48")
    model_option(d)
    d.add_argument("--hparams", default=None,
                   help='JSON object or file: {"memit": {"layers": [3, 4]}, ...} (default: each editor\'s own)')
    d.add_argument("--out", default="runs/demo", help="folder for the runs and the findings")
    d.add_argument("--figures", default=None,
                   help="folder for the figures, PNG and PDF (default: OUT/figures; the maintainers "
                        "regenerate the committed ones with --figures figures)")
    d.add_argument("--n-edits", type=positive_int, default=None, help="edits per run (default: the size's)")
    d.add_argument("--seed", type=int, default=0, help="seed of every run")
    stats_options(d, corpus=False)
    d.set_defaults(func=demo_command)
