"""``collapsediag run``: an editing run saved to --out (or resumed), and the checks it makes before the model loads."""
from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

from ..errors import CollapseDiagError
from ..runs.checkpoints import DEFAULT_SAMPLE
from .common import (EXAMPLES, HelpFormatter, editors_help, load_model_of, log, model_option, nonnegative_int,
                     parse_value, positive_int, stats_corpus, stats_options)

def parse_hparams(pairs: list[str], layers: list[int] | None, editor: str = "rome") -> dict[str, Any]:
    """``key=value`` overrides (values parsed as JSON when they can be), plus ``--layers``."""
    import dataclasses

    from ..editors import EDITORS

    hp: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise CollapseDiagError(f"--hparam expects key=value, got {pair!r}")
        hp[key.strip()] = parse_value(value)
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
    from ..checks import check_layers, check_records
    from ..data import load_data
    from ..editors import get_editor
    from ..signals.fluency import heldout_texts
    from ..models import load_config, n_layers
    from ..analysis.report import format_report
    from ..runs.session import EditSession
    from ..stats import StatsCache
    from ..runs.store import load_run

    resuming = args.resume and (pathlib.Path(args.out) / "config.json").exists()
    spec = None
    if args.hparams_file and not resuming:
        from ..editors.hparams_file import read_hparams_file

        spec = read_hparams_file(args.hparams_file, args.editor)
        args.editor = spec.editor
    if args.editor is None and not resuming:
        raise CollapseDiagError(f"no run to resume in {args.out} (no config.json): give --editor to start one"
                                if args.resume else "--editor is required (except with --resume)")
    editor = None
    if resuming:
        if args.guard:
            raise CollapseDiagError("--guard: a resumed run keeps the guard it started with; leave it out")
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
    model, tok = load_model_of(args)
    corpus = stats_corpus(args)
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
                              downstream=suite, guard=_guard(args),
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


def _guard(args: argparse.Namespace) -> Any:
    """The ``--guard`` of a new run (None without it)."""
    if args.guard is None:
        return None
    from ..runs.guard import Guard

    return Guard(args.guard, args.guard_ratio)


def _downstream(args: argparse.Namespace, resuming: bool) -> Any:
    """The ``--downstream`` tasks, loaded and checked (None without the option); a resumed run scores its own."""
    if not args.downstream:
        return None
    if resuming:
        raise CollapseDiagError("--downstream: a resumed run scores the tasks it started with; leave it out")
    if not args.eval_every:
        raise CollapseDiagError("--downstream scores at checkpoints: give --eval-every K")
    from ..signals.downstream import load_tasks
    from ..signals.downstream_score import DownstreamSuite

    return DownstreamSuite(load_tasks(args.downstream, args.downstream_data, args.downstream_n), args.downstream_n)


def _published(args: argparse.Namespace, model: Any, editor: Any) -> Any:
    """Statistics from ``--stats-dir`` (None: compute or take them from the cache); ``--projector`` given to
    AlphaEdit."""
    from ..arch import arch_for
    from ..models import model_name

    if args.projector:
        if not hasattr(editor, "set_projector"):
            raise CollapseDiagError(f"--projector is AlphaEdit's null-space projector; {editor.name} does not use one")
        editor.set_projector(args.projector, model)
    if not args.stats_dir:
        return None
    from ..editors.published import published_stats

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


def check_mode(editor: str, mode: str, batch_size: int | None) -> None:
    """Reject a mode the editor cannot run, or a batch size that contradicts the mode (``ModeError``)."""
    from ..editors import EDITORS
    from ..errors import ModeError

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
    from ..editors import EDITORS

    groups = EDITORS[editor].context_lengths
    return tuple((length, n // len(groups) + (i < n % len(groups))) for i, (length, _) in enumerate(groups))


def _templates(model: object, tok: object, args: argparse.Namespace, spec: Any = None) -> list[str] | None:
    """Context templates from ``--context`` or the hparams file's ``context_template_length_params`` (None:
    the editor's own, generated by the session)."""
    from ..editors.context import generate_templates

    if args.context is not None:
        return generate_templates(model, tok, context_lengths(args.editor, args.context), seed=args.seed)
    if spec is not None and spec.context_lengths:
        return generate_templates(model, tok, spec.context_lengths, seed=args.seed)
    return None


def _check_hparams_file(spec: Any, model: Any) -> list[str]:
    """The hparams file's environment keys checked against the loaded model; the notes are logged."""
    from ..arch import arch_for
    from ..editors.hparams_file import check_environment
    from ..models import n_layers

    arch = arch_for(model)
    notes = check_environment(spec, model, arch, n_layers(model.config))
    for note in notes:
        log.info("hparams file: %s", note)
    return notes


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``run`` subcommand."""
    r = sub.add_parser("run", help="run a sequence of edits and save every signal", parents=[common],
                       formatter_class=HelpFormatter, epilog=EXAMPLES,
                       description="Edit a model fact by fact (or in batches) and save every signal to --out.")
    model_option(r)
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
    r.add_argument("--guard", choices=("warn", "skip"), default=None,
                   help="before each edit read its request's key geometry (k_uᵀû / k̄ᵀû, cos(k_u, k̄), the subject's "
                        "position) and warn of a risky edit before making it (warn) or leave it out (skip); rows "
                        "in table guard")
    r.add_argument("--guard-ratio", type=float, default=0.05, metavar="R",
                   help="the guard's rule: risky when |k_uᵀû / k̄ᵀû| < R (ROME's update over 1/R times the "
                        "prefix-consistent one)")
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
    stats_options(r)
    r.add_argument("--stats-dir", default=None,
                   help="load the key statistics from kmeng01/rome or kmeng01/memit npz files under DIR (the root "
                        "of model folders, or the folder of the npz files) instead of computing them")
    r.add_argument("--projector", default=None,
                   help="AlphaEdit: its null_space_project.pt ([n_layers, d, d], layers in --layers order) instead "
                        "of the projector computed from the statistics")
    r.set_defaults(func=run_command)
