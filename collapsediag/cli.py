"""Command line: collapsediag run | scan | report | figures | demo."""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
from typing import Any

from .checkpoints import DEFAULT_SAMPLE
from .errors import CollapseDiagError

log = logging.getLogger("collapsediag")

EXAMPLES = """examples:
  collapsediag demo
      the study on the embedded SmolLM2-135M: runs under runs/demo, figures in runs/demo/figures
  collapsediag run --editor rome --data own --n-edits 20 --layers 5 --eval-every 5 --out runs/rome
  collapsediag run --editor memit --data counterfact:counterfact.json --mode sequential-batch \\
                   --batch-size 8 --n-edits 64 --layers 3 4 5 6 7 --out runs/memit-b8
  collapsediag run --out runs/rome --resume                continue a run cut by a crash
  collapsediag scan --data counterfact:counterfact.json --layers 5 --out scan.csv
  collapsediag report runs/rome runs/memit-b8 --format markdown
  collapsediag figures runs/rome runs/memit-b8 --out figures
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks and appends each option's default (unless the help states it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and action.default is not None and action.default is not False
                and action.default is not argparse.SUPPRESS and "default" not in text):
            text += " (default: %(default)s)"
        return text


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value
    return parse


positive_int = _int_at_least(1, "at least 1")
nonnegative_int = _int_at_least(0, "0 or more")


def editors_help() -> str:
    """One line per editor: its name and how many layers it edits (with the default layers)."""
    import dataclasses

    from .editors import EDITORS

    parts = []
    for name, cls in EDITORS.items():
        hp = cls.HParams()
        fields = {f.name for f in dataclasses.fields(hp)}
        if "layers" in fields and len(hp.layers) > 1:
            parts.append(f"{name} (one or more layers, default layers {' '.join(map(str, hp.layers))})")
        elif "layers" in fields:  # a multi-layer editor whose default is one layer (EMMET)
            parts.append(f"{name} (one or more layers, default layer {hp.layers[0]} alone)")
        else:
            parts.append(f"{name} (one layer, default layer {hp.layer})")
    return ", ".join(parts)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_hparams(pairs: list[str], layers: list[int] | None, editor: str = "rome") -> dict[str, Any]:
    """``key=value`` overrides (values parsed as JSON when they can be), plus ``--layers``."""
    import dataclasses

    from .editors import EDITORS

    hp: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise CollapseDiagError(f"--hparam expects key=value, got {pair!r}")
        hp[key.strip()] = _value(value)
    if layers:
        fields = {f.name for f in dataclasses.fields(EDITORS[editor].HParams)} if editor in EDITORS else set()
        if "layers" in fields:
            hp["layers"] = list(layers)
        elif len(layers) != 1:
            raise CollapseDiagError(f"{editor} edits one layer: give one --layers value")
        else:
            hp["layer"] = layers[0]
    return hp


def run_command(args: argparse.Namespace) -> int:
    """``collapsediag run``: an editing run (sequential, batch or sequential-batch) saved to --out."""
    from .checks import check_layers, check_records
    from .data import load_data
    from .editors import get_editor
    from .fluency import heldout_texts
    from .models import load_config, n_layers
    from .report import format_report
    from .session import EditSession
    from .stats import StatsCache
    from .store import load_run

    resuming = args.resume and (pathlib.Path(args.out) / "config.json").exists()
    spec = None
    if args.hparams_file and not resuming:
        from .hparams_file import read_hparams_file

        spec = read_hparams_file(args.hparams_file, args.editor)
        args.editor = spec.editor
    if args.editor is None and not resuming:
        raise CollapseDiagError(f"no run to resume in {args.out} (no config.json): give --editor to start one"
                                if args.resume else "--editor is required (except with --resume)")
    editor = None
    if resuming:
        resume_inputs(args)
    else:
        if args.data is None:
            raise CollapseDiagError("--data is required to start a run")
        check_mode(args.editor, args.mode, args.batch_size)
        editor = get_editor(args.editor, {**(spec.hparams if spec else {}),
                                          **parse_hparams(args.hparam, args.layers, args.editor)})
    records = check_records(load_data(args.data, args.n_edits), args.data)
    if editor is not None:
        check_layers(editor.layers(), n_layers(load_config(args.model)), args.model)
    suite = _downstream(args, resuming)  # tasks checked before the model loads
    model, tok = _load(args)
    corpus = _corpus(args)
    cache = StatsCache(args.cache_dir)
    if resuming:
        session = EditSession.resume(args.out, model, tok, records, cache=cache, corpus=corpus)
        batch_size = int(session.config.get("batch_size") or 1)
        log.info("resuming %s after %d edits", args.out, session.n_edits)
    else:
        batch_size = len(records) if args.mode == "batch" else (args.batch_size or 1)
        stats = _published(args, model, editor)
        notes = _check_hparams_file(spec, model) if spec else []
        session = EditSession(model, tok, editor, out=args.out, corpus=corpus, stats_tokens=args.stats_tokens,
                              stats=stats,
                              cache=cache, seed=args.seed, eval_every=args.eval_every,
                              retention_sample=args.retention_sample, snapshot_every=args.snapshot_every,
                              eval_texts=heldout_texts(args.eval_text) if args.eval_every else [],
                              downstream=suite,
                              templates=_templates(model, tok, args, spec),
                              config={"data": args.data, "n_edits": args.n_edits, "mode": args.mode,
                                      "hparams_file": str(pathlib.Path(args.hparams_file).resolve())
                                      if spec else None, "hparams_file_notes": notes,
                                      "projector_file": str(pathlib.Path(args.projector).resolve())
                                      if args.projector else None,
                                      "batch_size": batch_size, "stats_corpus": corpus.name,
                                      "eval_text": args.eval_text})
    session.run(records[session.n_edits:], batch_size=batch_size)
    print(format_report([load_run(args.out)]))
    return 0


def _downstream(args: argparse.Namespace, resuming: bool) -> Any:
    """The ``--downstream`` tasks, loaded and checked (None without the option); a resumed run scores its own."""
    if not args.downstream:
        return None
    if resuming:
        raise CollapseDiagError("--downstream: a resumed run scores the tasks it started with; leave it out")
    if not args.eval_every:
        raise CollapseDiagError("--downstream scores at checkpoints: give --eval-every K")
    from .downstream import load_tasks
    from .downstream_score import DownstreamSuite

    return DownstreamSuite(load_tasks(args.downstream, args.downstream_data, args.downstream_n), args.downstream_n)


def _published(args: argparse.Namespace, model: Any, editor: Any) -> Any:
    """Statistics from ``--stats-dir`` (None: compute or take them from the cache); ``--projector`` given to
    AlphaEdit."""
    from .arch import arch_for
    from .models import model_name

    if args.projector:
        if not hasattr(editor, "set_projector"):
            raise CollapseDiagError(f"--projector is AlphaEdit's null-space projector; {editor.name} does not use one")
        editor.set_projector(args.projector, model)
    if not args.stats_dir:
        return None
    from .published import published_stats

    return published_stats(args.stats_dir, model, arch_for(model), editor.layers(), model_name(model))


def resume_inputs(args: argparse.Namespace) -> None:
    """With ``--resume``: take ``--data`` and ``--n-edits`` from the run's config, and refuse values that
    contradict it (a resumed run edits the same records as the run it continues)."""
    config = json.loads((pathlib.Path(args.out) / "config.json").read_text(encoding="utf-8"))
    for key, option in (("data", "--data"), ("n_edits", "--n-edits")):
        given, recorded = getattr(args, key), config.get(key)
        if given is not None and recorded is not None and given != recorded:
            raise CollapseDiagError(f"{option} {given} differs from the run's ({recorded}); leave it out with --resume")
        setattr(args, key, recorded if given is None else given)
    if args.data is None:
        raise CollapseDiagError(f"the run in {args.out} does not record its data set: give --data")


def scan_command(args: argparse.Namespace) -> int:
    """``collapsediag scan``: the pre-edit risk table of every record (no edit made), sorted by risk."""
    import pandas as pd

    from .checks import check_layers, check_records
    from .data import load_data
    from .models import load_config, n_layers
    from .report import readable
    from .scan import scan, write_scan
    from .stats import StatsCache

    if pathlib.Path(args.out).suffix.lower() not in (".csv", ".parquet"):
        raise CollapseDiagError(f"--out must end in .csv or .parquet, got {args.out!r}")
    records = check_records(load_data(args.data, args.n_edits), args.data, warn=False)  # scan warns itself
    check_layers(args.layers, n_layers(load_config(args.model)), args.model)
    model, tok = _load(args)
    corpus, cache = _corpus(args), StatsCache(args.cache_dir)
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


def check_mode(editor: str, mode: str, batch_size: int | None) -> None:
    """Reject a mode the editor cannot run, or a batch size that contradicts the mode (``ModeError``)."""
    from .editors import EDITORS
    from .errors import ModeError

    cls = EDITORS.get(editor)
    if cls is None:
        raise CollapseDiagError(f"unknown editor {editor!r}; known: {sorted(EDITORS)}")
    if mode != "sequential" and cls.single_edit_only:
        raise ModeError(f"{editor} edits one fact at a time: mode {mode!r} is not available, use --mode sequential")
    if mode == "sequential" and batch_size not in (None, 1):
        raise ModeError("--batch-size needs --mode sequential-batch (or --mode batch for one batch of all edits)")
    if mode == "sequential-batch" and (batch_size is None or batch_size < 1):
        raise ModeError("--mode sequential-batch needs --batch-size B (B >= 1)")
    if mode == "batch" and batch_size is not None:
        raise ModeError("--mode batch makes one batch of all --n-edits edits: leave out --batch-size")


def context_lengths(editor: str, n: int) -> tuple[tuple[int, int], ...]:
    """``--context N``: N prefixes spread evenly over the editor's prefix lengths (ROME: ≤5 and ≤10 tokens;
    MEMIT and its descendants: ≤10)."""
    from .editors import EDITORS

    groups = EDITORS[editor].context_lengths
    return tuple((length, n // len(groups) + (i < n % len(groups))) for i, (length, _) in enumerate(groups))


def _templates(model: object, tok: object, args: argparse.Namespace, spec: Any = None) -> list[str] | None:
    """Context templates from ``--context`` or the hparams file's ``context_template_length_params`` (None:
    the editor's own, generated by the session)."""
    from .editors.context import generate_templates

    if args.context is not None:
        return generate_templates(model, tok, context_lengths(args.editor, args.context), seed=args.seed)
    if spec is not None and spec.context_lengths:
        return generate_templates(model, tok, spec.context_lengths, seed=args.seed)
    return None


def _check_hparams_file(spec: Any, model: Any) -> list[str]:
    """The hparams file's environment keys checked against the loaded model; the notes are logged."""
    from .arch import arch_for
    from .hparams_file import check_environment
    from .models import n_layers

    arch = arch_for(model)
    notes = check_environment(spec, model, arch, n_layers(model.config))
    for note in notes:
        log.info("hparams file: %s", note)
    return notes


def find_runs(dirs: list[str]) -> list[str]:
    """The runs that ``dirs`` name (runs, sweeps, folders of runs; ``sweep.run_dirs``), each folder left out
    told in one line on stderr; ``CollapseDiagError`` when there is no run at all."""
    from .sweep import run_dirs

    runs, skipped = run_dirs(dirs)
    for note in skipped:
        print(f"collapsediag: {note}", file=sys.stderr)
    if not runs:
        raise CollapseDiagError(f"no collapsediag run in {' '.join(dirs)}: give run folders (with config.json), "
                                "a sweep folder or a folder of runs such as runs/demo")
    return runs


def report_command(args: argparse.Namespace) -> int:
    """``collapsediag report DIR [DIR ...]``: runs, sweep folders or folders of runs."""
    from .report import format_report, markdown_table, text_table
    from .store import load_run
    from .sweep import sweep_table

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

    from .analysis import disabling_edits
    from .plots import write_figures
    from .scan import read_scan
    from .store import load_run

    runs = [load_run(d) for d in find_runs(args.dirs)]
    disabling = {r.path.name: disabling_edits(r) for r in runs}
    # on ROME's risk scan, mark the ROME runs' collapses
    confirmed = [d for r in runs if r.config.get("editor") == "rome" and len(d := disabling[r.path.name])]
    for path in write_figures(runs, args.out, scan=read_scan(args.scan) if args.scan else None,
                              disabling=disabling, confirmed=pd.concat(confirmed) if confirmed else None):
        print(path)
    return 0


def demo_command(args: argparse.Namespace) -> int:
    """``collapsediag demo``: the risk scan of the own facts, then the study on the embedded model, its report
    (naming the disabling edit and why), figures and findings."""
    import dataclasses
    import time

    from .data import own_facts
    from .editors.rome import Rome
    from .plots import write_figures
    from .report import format_report, markdown_table, text_table, wrap_text
    from .scan import write_scan
    from .stats import StatsCache
    from .study import (SIZES, demo_scan, disabling_by_run, run_study, study_findings, study_layers,
                        warm_statistics)

    t0 = time.perf_counter()
    size = SIZES[args.size]
    if args.n_edits:
        size = dataclasses.replace(size, n_edits=args.n_edits,
                                   batch_sizes=tuple(sorted({min(b, args.n_edits) for b in size.batch_sizes})))
    out = pathlib.Path(args.out)
    figures_dir = pathlib.Path(args.figures) if args.figures else out / "figures"
    hparams = _value(pathlib.Path(args.hparams).read_text() if args.hparams and pathlib.Path(args.hparams).exists()
                     else args.hparams) if args.hparams else None
    if hparams is not None and not isinstance(hparams, dict):
        raise CollapseDiagError(f"--hparams must be a JSON object {{editor: {{key: value}}}}, got {args.hparams!r}")
    model, tok = _load(args)
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
    from .checks import check_records
    from .data import load_data
    from .longstudy import LongStudyPlan, run_long_study
    from .stats import StatsCache

    if args.report:
        from .studyreport import write_study_report

        print(write_study_report(args.out, args.figures))
        return 0
    if args.data is None:
        raise CollapseDiagError("--data is required to run the study (leave it out only with --report)")
    plan = LongStudyPlan(n_edits=args.n_edits, editors=tuple(args.editors), eval_every=args.eval_every,
                         retention_sample=args.retention_sample, batch_editors=tuple(args.batch_editors),
                         batch_sizes=tuple(args.batch_sizes), batch_edits=args.batch_edits, seed=args.seed)
    need = max(plan.n_edits, plan.batch_edits if args.batch_editors else 0)
    records = check_records(load_data(args.data, need), args.data)
    model, tok = _load(args)
    parts = ("seq", "batch") if args.part == "all" else (args.part,)
    result = run_long_study(model, tok, records, args.out, plan, batches=bool(args.batch_editors), parts=parts,
                            data=args.data,
                            corpus=_corpus(args), cache=StatsCache(args.cache_dir), stats_tokens=args.stats_tokens,
                            progress=not args.quiet)
    from .studyreport import write_study_report

    print(write_study_report(args.out, args.figures))
    print(f"study in {args.out}: {len(result['seq'])} sequential runs, {len(result['batch'])} batch runs "
          f"(timings in {pathlib.Path(args.out) / 'study.json'}, findings in {pathlib.Path(args.out) / 'findings.md'})")
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    """``collapsediag sweep SPEC.toml --out DIR``: every cell of the grid, skipping finished ones."""
    from .sweep import sweep, sweep_table

    t0 = __import__("time").perf_counter()
    results = sweep(args.spec, args.out, engine=args.engine, workers=args.workers, address=args.address)
    failed = [r for r in results if r["returncode"] != 0]
    done = sum(not r["skipped"] for r in results)
    print(f"{len(results)} cells: {done} run, {len(results) - done} already finished, {len(failed)} failed "
          f"({__import__('time').perf_counter() - t0:.0f} s, engine {args.engine})")
    for r in failed:
        print(f"  {r['cell']}: exit {r['returncode']} (stderr in {pathlib.Path(args.out) / (r['cell'] + '.err')})")
    from .report import readable

    print(readable(sweep_table(args.out)).to_string(index=False))
    return 1 if failed else 0


def _model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="Hugging Face name or local path of a causal LM, or smollm2-135m (the embedded model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the model's forward passes (statistics, solves and norms stay float32/float64)")
    p.add_argument("--device", default="cpu", help="device of the model, e.g. cuda or cuda:1")
    p.add_argument("--device-map", default=None,
                   help="spread the model over devices (e.g. auto, with accelerate); overrides --device")


def quiet_weight_loading(verbose: int = 0, quiet: bool = False) -> None:
    """transformers' own progress bars ("Loading weights") hidden unless ``-vv``; the Hugging Face Hub's
    download bars stay (hidden with ``quiet``)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_bars = not are_progress_bars_disabled()
    if verbose > 1:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()  # switches the Hub's bars off too: back on below
    if quiet:
        disable_progress_bars()
    elif hub_bars:
        enable_progress_bars()


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model and tokenizer of ``--model`` with ``--dtype``, ``--device`` and ``--device-map``."""
    from .models import load_model

    quiet_weight_loading(getattr(args, "verbose", 0), getattr(args, "quiet", False))
    return load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map)


def _stats_options(p: argparse.ArgumentParser, corpus: bool = True) -> None:
    """Where the key statistics come from and where they are cached."""
    if corpus:
        p.add_argument("--stats-corpus", default=None,
                       help="text file for the key statistics C = E[kkᵀ] (default: the packaged corpus)")
    p.add_argument("--stats-tokens", type=positive_int, default=100_000, help="tokens of key statistics")
    p.add_argument("--cache-dir", default=None,
                   help="statistics cache (default: $COLLAPSEDIAG_CACHE or ~/.cache/collapsediag)")


def _corpus(args: argparse.Namespace) -> object:
    """The ``--stats-corpus`` text (default: the packaged corpus)."""
    from .stats import TextCorpus

    return TextCorpus.from_file(args.stats_corpus) if args.stats_corpus else TextCorpus.packaged()


def _common_options(in_subcommand: bool) -> argparse.ArgumentParser:
    """-v and -q, accepted before and after the subcommand (a subcommand keeps what was given before it)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS if in_subcommand else 0,
                        help="more log output (-v: collapsediag's debug messages; -vv: other libraries' too, and "
                             "transformers' progress bars)")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS if in_subcommand else False,
                        help="no progress bars")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(
        prog="collapsediag", formatter_class=_Formatter, parents=[_common_options(False)], epilog=EXAMPLES,
        description="Why and when a language model breaks while you edit its knowledge: run knowledge editors "
                    "and record every signal per edit and layer, then report, flag disabling edits and draw "
                    "figures.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options(True)

    r = sub.add_parser("run", help="run a sequence of edits and save every signal", parents=[common],
                       formatter_class=_Formatter, epilog=EXAMPLES,
                       description="Edit a model fact by fact (or in batches) and save every signal to --out.")
    _model_option(r)
    r.add_argument("--editor", default=None,
                   help=f"one of: {editors_help()}. Taken from the run with --resume (required otherwise)")
    r.add_argument("--data", default=None,
                   help="counterfact:PATH (ROME or EasyEdit schema), zsre:PATH (MEND eval schema), "
                        "facts:PATH (.jsonl or .csv) or own (the project's fact set); required, except with "
                        "--resume (default: the run's)")
    r.add_argument("--n-edits", type=positive_int, default=None,
                   help="edit the first N records (default: all records of --data; with --resume, the run's)")
    r.add_argument("--mode", default="sequential", choices=["sequential", "batch", "sequential-batch"],
                   help="sequential: one edit per update; batch: one update of all edits; "
                        "sequential-batch: updates of --batch-size edits one after another")
    r.add_argument("--batch-size", type=positive_int, default=None,
                   help="edits per update with --mode sequential-batch (default: 1, or all with --mode batch)")
    r.add_argument("--layers", type=int, nargs="+", default=None,
                   help="edited layer(s), 0-based (default: the editor's, see --editor)")
    r.add_argument("--seed", type=int, default=0, help="seed of the context templates, v* and generations")
    r.add_argument("--eval-every", type=nonnegative_int, default=0,
                   help="re-test earlier edits and measure perplexity every K edits and at the end (0: never)")
    r.add_argument("--retention-sample", type=nonnegative_int, default=DEFAULT_SAMPLE, metavar="M",
                   help="a checkpoint re-tests every edit since the previous one plus at most M older ones, "
                        "seeded (0: every earlier edit)")
    r.add_argument("--snapshot-every", type=nonnegative_int, default=1000, metavar="N",
                   help="store the edited matrices every N edits, so model_at and --resume replay at most N "
                        "updates (0: never)")
    r.add_argument("--downstream", default=None, metavar="TASK[,TASK...]",
                   help="score these tasks few-shot at every checkpoint: built-in sst2, mrpc, cola, rte, nli, mmlu, "
                        "or NAME=path/spec.json for your own (needs --eval-every)")
    r.add_argument("--downstream-n", type=positive_int, default=200, metavar="N",
                   help="examples scored per task (a seeded subset, the same at every checkpoint)")
    r.add_argument("--downstream-data", default=None, metavar="DIR",
                   help="folder of the built-in tasks' data files (default: $COLLAPSEDIAG_GLUE_EVAL, else "
                        "../shared/data/glue_eval)")
    r.add_argument("--eval-text", default=None,
                   help="held-out text file for perplexity (default: the packaged held-out passages)")
    r.add_argument("--context", type=nonnegative_int, default=None,
                   help="number of prefixed context templates (default: the editor's, 20 for ROME, 5 for MEMIT)")
    r.add_argument("--out", required=True, help="run directory to write (or to continue with --resume)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out after a crash")
    r.add_argument("--hparams-file", default=None, metavar="FILE.yaml",
                   help="EasyEdit hyper-parameters (ROME, R-ROME, MEMIT, EMMET, AlphaEdit): the editor from its "
                        "alg_name, the layers from its layers; --hparam and --layers override it")
    r.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                   help="override an editor hyper-parameter, repeatable (e.g. v_num_grad_steps=25; "
                        "default: the editor's defaults)")
    _stats_options(r)
    r.add_argument("--stats-dir", default=None,
                   help="load the key statistics from kmeng01/rome or kmeng01/memit npz files under DIR (the root "
                        "of model folders, or the folder of the npz files) instead of computing them")
    r.add_argument("--projector", default=None,
                   help="AlphaEdit: its null_space_project.pt ([n_layers, d, d], layers in --layers order) instead "
                        "of the projector computed from the statistics")
    r.set_defaults(func=run_command)

    st = sub.add_parser("study", help="the long study: hundreds of sequential edits per editor, then MEMIT and EMMET "
                                      "at several batch sizes (resumable: run it again to go on)",
                        parents=[common], formatter_class=_Formatter,
                        description="Sequential runs of every editor over the same records (advanced together, one "
                                    "checkpoint interval at a time), then the batch study; each run resumes where it "
                                    "stopped when the command is run again with the same --out.")
    _model_option(st)
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
    _stats_options(st)
    st.set_defaults(func=study_command)

    sw = sub.add_parser("sweep", help="a grid of runs from a TOML spec (local processes or Ray tasks); run it again "
                                      "to finish what is missing", parents=[common], formatter_class=_Formatter,
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

    sc = sub.add_parser("scan", help="pre-edit risk scan: ROME's denominators and key geometry of every record, "
                                     "no edit made", parents=[common], formatter_class=_Formatter,
                        description="Rank records by the risk that a ROME edit disables the model, from their keys "
                                    "alone (same statistics, context templates and key code as a run).")
    _model_option(sc)
    sc.add_argument("--data", required=True, help="counterfact:PATH, zsre:PATH, facts:PATH or own")
    sc.add_argument("--layers", type=int, nargs="+", required=True, help="layer(s) to scan, 0-based")
    sc.add_argument("--editor", default="rome", choices=["rome", "r-rome"],
                    help="whose denominator ranks the records (both are always recorded)")
    sc.add_argument("--out", required=True, help="output table, .csv or .parquet (metadata beside it, .meta.json)")
    sc.add_argument("--n-edits", type=positive_int, default=None, help="scan the first N records (default: all)")
    sc.add_argument("--seed", type=int, default=0, help="seed of the context templates (as a run with that seed)")
    sc.add_argument("--batch-size", type=positive_int, default=128, help="sequences per forward")
    sc.add_argument("--top", type=nonnegative_int, default=10, help="rows of the risk table to print")
    _stats_options(sc)
    sc.set_defaults(func=scan_command)

    rp = sub.add_parser("report", help="summary, flagged edits and forgetting phases of saved runs",
                        parents=[common], formatter_class=_Formatter)
    rp.add_argument("dirs", nargs="+", help="run folders, sweep folders or folders of runs (e.g. runs/demo); "
                                            "other folders are skipped")
    rp.add_argument("--format", default="text", choices=["text", "markdown"], help="output format")
    rp.set_defaults(func=report_command)

    fg = sub.add_parser("figures", help="write the figures of saved runs (PNG and PDF)", parents=[common],
                        formatter_class=_Formatter)
    fg.add_argument("dirs", nargs="+", help="run folders, sweep folders or folders of runs (e.g. runs/demo); "
                                            "other folders are skipped")
    fg.add_argument("--out", default="figures", help="folder for the figures")
    fg.add_argument("--scan", default=None,
                    help="a risk scan (.csv or .parquet from collapsediag scan) to draw with the runs' disabling "
                         "edits marked (default: none)")
    fg.set_defaults(func=figures_command)

    d = sub.add_parser("demo", help="the study: a risk scan of the own facts, then ROME, r-ROME, MEMIT (sequential "
                                    "and batched) and D4S on the embedded model, with figures and findings",
                       parents=[common], formatter_class=_Formatter,
                       description="The demo study on the embedded model and the project's own facts.")
    d.add_argument("--size", choices=["small", "full"], default="small",
                   help="small: 8 edits per run (about 12 min on 2 cores); full: 48")
    _model_option(d)
    d.add_argument("--hparams", default=None,
                   help='JSON object or file: {"memit": {"layers": [3, 4]}, ...} (default: each editor\'s own)')
    d.add_argument("--out", default="runs/demo", help="folder for the runs and the findings")
    d.add_argument("--figures", default=None,
                   help="folder for the figures, PNG and PDF (default: OUT/figures; the maintainers "
                        "regenerate the committed ones with --figures figures)")
    d.add_argument("--n-edits", type=positive_int, default=None, help="edits per run (default: the size's)")
    d.add_argument("--seed", type=int, default=0, help="seed of every run")
    _stats_options(d, corpus=False)
    d.set_defaults(func=demo_command)
    return p


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """collapsediag's messages to stderr at INFO (DEBUG with -v); other libraries stay at WARNING (INFO with
    -vv); ``quiet`` hides the progress bars. transformers' own bars ("Loading weights") are hidden where the
    command loads a model (``quiet_weight_loading``) unless -vv."""
    from .progress import set_progress

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


if __name__ == "__main__":
    sys.exit(main())
