"""What every command shares: the logger, option types and groups, the help formatter, loading the model."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from ..errors import CollapseDiagError

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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
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

    from ..editors import EDITORS

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


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def find_runs(dirs: list[str]) -> list[str]:
    """The runs that ``dirs`` name (runs, sweeps, folders of runs; ``sweep.run_dirs``), each folder left out
    told in one line on stderr; ``CollapseDiagError`` when there is no run at all."""
    from ..experiments.sweep import run_dirs

    runs, skipped = run_dirs(dirs)
    for note in skipped:
        print(f"collapsediag: {note}", file=sys.stderr)
    if not runs:
        raise CollapseDiagError(f"no collapsediag run in {' '.join(dirs)}: give run folders (with config.json), "
                                "a sweep folder or a folder of runs such as runs/demo")
    return runs


def model_option(p: argparse.ArgumentParser) -> None:
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


def load_model_of(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model and tokenizer of ``--model`` with ``--dtype``, ``--device`` and ``--device-map``."""
    from ..models import load_model

    quiet_weight_loading(getattr(args, "verbose", 0), getattr(args, "quiet", False))
    return load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map)


def stats_options(p: argparse.ArgumentParser, corpus: bool = True) -> None:
    """Where the key statistics come from and where they are cached."""
    if corpus:
        p.add_argument("--stats-corpus", default=None,
                       help="text file for the key statistics C = E[kkᵀ] (default: the packaged corpus)")
    p.add_argument("--stats-tokens", type=positive_int, default=100_000, help="tokens of key statistics")
    p.add_argument("--cache-dir", default=None,
                   help="statistics cache (default: $COLLAPSEDIAG_CACHE or ~/.cache/collapsediag)")


def stats_corpus(args: argparse.Namespace) -> object:
    """The ``--stats-corpus`` text (default: the packaged corpus)."""
    from ..stats import TextCorpus

    return TextCorpus.from_file(args.stats_corpus) if args.stats_corpus else TextCorpus.packaged()


def common_options(in_subcommand: bool) -> argparse.ArgumentParser:
    """-v and -q, accepted before and after the subcommand (a subcommand keeps what was given before it)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS if in_subcommand else 0,
                        help="more log output (-v: collapsediag's debug messages; -vv: other libraries' too, and "
                             "transformers' progress bars)")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS if in_subcommand else False,
                        help="no progress bars")
    return common
