"""The command line's first hour: quiet output, strict early input checks, fast model errors, help."""
from __future__ import annotations

import argparse
import json
import time

import pytest

from collapsediag import models
from collapsediag.cli import build_parser, main, setup_logging
from collapsediag.errors import CollapseDiagError, ModelNotFoundError
from collapsediag.progress import progress_bar, set_progress
from collapsediag.analysis.report import readable, readable_cell
from tests.conftest import make_model

GOOD = {"case_id": "g1", "subject": "Paris", "prompt": "{} is located in", "target_new": "Italy",
        "target_true": "France"}


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model's weights start loading."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input check")
    monkeypatch.setattr(models, "load_model", refuse)


@pytest.fixture
def saved_model(tok, tmp_path):
    path = tmp_path / "model"
    make_model("gpt2", len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _run(tmp_path, data, *extra, model=None):
    argv = ["run", "--editor", "rome", "--data", data, "--out", str(tmp_path / "out"), *extra]
    return main(argv + (["--model", model] if model else []))


def test_empty_data_set_fails_before_the_model_loads(tmp_path, capsys, no_model_load):
    (tmp_path / "empty.json").write_text("[]")
    assert _run(tmp_path, f"counterfact:{tmp_path / 'empty.json'}") == 2
    assert "holds no records" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_no_valid_record_fails_and_names_them(tmp_path, capsys, no_model_load):
    bad = [dict(GOOD, case_id="a", prompt="no placeholder"), dict(GOOD, case_id="b", target_new="")]
    (tmp_path / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in bad))
    assert _run(tmp_path, f"facts:{tmp_path / 'bad.jsonl'}") == 2
    err = capsys.readouterr().err
    assert "holds no valid record" in err
    assert err.count("record 'a'") == 2 and err.count("record 'b'") == 1  # each warned once (a also in the error)


@pytest.mark.parametrize("option,value,message", [
    ("--n-edits", "0", "at least 1"), ("--n-edits", "-1", "at least 1"), ("--batch-size", "0", "at least 1"),
    ("--eval-every", "-1", "0 or more"), ("--n-edits", "x", "expected an integer")])
def test_bad_numbers_exit_2_naming_the_option(tmp_path, capsys, option, value, message, no_model_load):
    with pytest.raises(SystemExit) as exc:
        _run(tmp_path, "own", option, value)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert option in err and message in err


def test_layers_outside_the_model_fail_before_the_weights_load(tmp_path, capsys, saved_model, no_model_load):
    assert _run(tmp_path, "own", "--layers", "7", model=saved_model) == 2
    err = capsys.readouterr().err
    assert "layer 7 is outside model" in err and "3 layers (0 to 2)" in err
    assert main(["run", "--editor", "memit", "--layers", "1", "3", "--data", "own", "--model", saved_model,
                 "--out", str(tmp_path / "m")]) == 2
    assert "layer 3 is outside" in capsys.readouterr().err


def test_unknown_model_offline_fails_fast_with_the_builtin_names(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as exc:
        models.load_model("smollm2-136m")
    assert time.perf_counter() - t0 < 10
    text = str(exc.value)
    assert "Did you mean 'smollm2-135m'?" in text and "local path" in text
    with pytest.raises(ModelNotFoundError, match="Built-in: smollm2-135m"):
        models.load_config("someone/unknown-model")
    with pytest.raises(ModelNotFoundError, match="not a folder"):
        models.load_model("./no/such/folder")


def test_unknown_model_on_the_command_line_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _run(tmp_path, "own", "--n-edits", "1", model="smollm2-136m") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "smollm2-135m" in err


def test_every_option_has_help_with_its_default():
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in subs.items():
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
            text = sub.formatter_class("x")._get_help_string(action)
            if action.default not in (None, False, argparse.SUPPRESS, []):
                assert "default" in text, f"{name} {action.option_strings}: no default in {text!r}"
    top = parser.format_help()
    assert "examples:" in top and "``" not in top
    run_help = subs["run"].format_help()
    for editor in ("rome (one layer", "r-rome (one layer", "memit (one or more layers", "alphaedit"):
        assert editor in " ".join(run_help.split())
    assert "zsre:PATH" in run_help and "default: all records" in run_help


def test_logging_is_quiet_and_q_hides_progress(capsys):
    import logging

    setup_logging(0, quiet=True)
    logging.getLogger("fontTools.subset").info("maxp pruned")
    logging.getLogger("collapsediag").info("own message")
    assert progress_bar(range(3)).disable
    err = capsys.readouterr().err
    assert "maxp pruned" not in err and "own message" in err
    setup_logging(1, quiet=False)
    logging.getLogger("collapsediag").debug("debug message")
    assert not progress_bar(range(3), disable=False).disable
    assert "debug message" in capsys.readouterr().err
    set_progress(True)
    setup_logging(0)


def test_readable_cells():
    assert readable_cell(1.458e-17) == "0" and readable_cell(-3e-12) == "0"
    assert readable_cell(True) == "yes" and readable_cell(False) == "no"
    assert readable_cell(12.9, "weight_l1_growth_pct") == "+12.90 %"
    assert readable_cell(0.5) == "0.5" and readable_cell(float("nan")) == ""
    import pandas as pd

    df = readable(pd.DataFrame({"catastrophic": [True, False], "slope": [1e-17, -0.25]}))
    assert df["catastrophic"].tolist() == ["yes", "no"] and df["slope"].tolist() == ["0", "-0.25"]


def test_resume_takes_data_from_the_run_and_refuses_contradictions(tmp_path, capsys, no_model_load):
    assert main(["run", "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "no run to resume" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": "own", "n_edits": 3}))
    assert main(["run", "--resume", "--out", str(run), "--data", "zsre:x.json"]) == 2
    assert "--data zsre:x.json differs from the run's (own)" in capsys.readouterr().err
    assert main(["run", "--resume", "--out", str(run), "--n-edits", "5"]) == 2
    assert "--n-edits 5 differs from the run's (3)" in capsys.readouterr().err
    args = build_parser().parse_args(["run", "--resume", "--out", str(run)])
    from collapsediag.cli import resume_inputs

    resume_inputs(args)
    assert args.data == "own" and args.n_edits == 3


def test_cache_kwargs_follow_the_forward_signature():
    from collapsediag.forward import cache_kwargs

    class New:
        def forward(self, input_ids=None, cache=None, use_cache=None): ...

    class Old:
        def forward(self, input_ids=None, past_key_values=None, use_cache=None): ...

    assert cache_kwargs(New(), "c") == {"cache": "c", "use_cache": True}
    assert cache_kwargs(Old(), "c") == {"past_key_values": "c", "use_cache": True}


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory, tok):
    """A folder laid out as the demo's runs/demo: two small runs (ROME, MEMIT), figures/ and scan.csv."""
    from collapsediag import EditSession, get_editor
    from collapsediag.arch import arch_for
    from collapsediag.signals.scan import write_scan
    from collapsediag.stats import StatsCache, TextCorpus
    from tests.conftest import corpus_texts
    from tests.test_modes import FOUR
    from tests.test_plots import _scan_frame

    root = tmp_path_factory.mktemp("demo")
    model = make_model("gpt2", len(tok))
    stats = StatsCache(root / "stats").get(model, tok, arch_for(model), [1, 2],
                                           TextCorpus.from_texts(corpus_texts(300)), n_tokens=4000, seq_len=32,
                                           progress=False)
    demo = root / "runs" / "demo"
    common = dict(stats=stats, templates=["{}", "The city of music. {}"], eval_every=1, eval_texts=corpus_texts(2),
                  generation_prompts=["The city"], generation_tokens=4, progress=False)
    for name, editor, hp in (("rome", "rome", {"layer": 1, "v_num_grad_steps": 2}),
                             ("memit", "memit", {"layers": [1, 2], "z_num_grad_steps": 2})):
        s = EditSession(model, tok, get_editor(editor, hp), out=demo / name,
                        config={"mode": "sequential", "batch_size": 1}, **common)
        s.run(FOUR[:2], progress=False)
        s.restore()
    (demo / "figures").mkdir()
    (demo / "figures" / "old.png").write_bytes(b"png")
    write_scan(_scan_frame([0.5, 2.0, 9.0]), demo / "scan.csv")
    return demo


def test_find_runs_takes_runs_sweeps_and_folders_of_runs(demo_folder, tmp_path, capsys):
    from collapsediag.cli import find_runs
    from collapsediag.experiments.sweep import run_dirs

    runs = [str(demo_folder / "memit"), str(demo_folder / "rome")]
    assert run_dirs([str(demo_folder)]) == (runs, [])  # figures/ inside a folder of runs: passed over
    found, skipped = run_dirs([str(demo_folder / "rome"), str(demo_folder / "figures"), str(tmp_path / "nope")])
    assert found == [str(demo_folder / "rome")] and len(skipped) == 2
    assert "figures: not a collapsediag run" in skipped[0] and "no such folder" in skipped[1]
    assert find_runs([str(demo_folder), str(demo_folder / "figures")]) == runs
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(CollapseDiagError, match="no collapsediag run"):
        find_runs([str(demo_folder / "figures")])


def test_report_and_figures_take_the_demo_folder_as_the_readme_says(demo_folder, tmp_path, capsys):
    assert main(["report", str(demo_folder)]) == 0
    out, err = capsys.readouterr()
    assert "Summary" in out and "rome " in out and "memit " in out and err == ""
    assert max(map(len, out.splitlines())) <= 100  # wrapped within 100 columns
    assert "too few checkpoints" in out and "can stay high while perplexity is high" in out
    globbed = sorted(f"{p}/" for p in demo_folder.iterdir() if p.is_dir())  # runs/demo/*/ matches figures/
    assert main(["figures", *globbed, "--out", str(tmp_path / "fig"), "--scan", str(demo_folder / "scan.csv")]) == 0
    out, err = capsys.readouterr()
    assert err.strip().count("\n") == 0 and "figures/: not a collapsediag run" in err
    names = {p.name for p in (tmp_path / "fig").iterdir()}
    assert {"norm_growth.png", "perplexity.png", "risk_scan.png"} <= names and len(out.splitlines()) == len(names)
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no collapsediag run in" in capsys.readouterr().err
    assert main(["figures", str(demo_folder / "figures"), "--out", str(tmp_path / "f2")]) == 2


def test_editor_help_gives_every_editors_default_layers():
    from collapsediag.cli import editors_help
    from collapsediag.editors import EDITORS

    text = editors_help()
    for name, cls in EDITORS.items():
        hp = cls.HParams()
        layers = getattr(hp, "layers", None) or [hp.layer]
        assert f"{name} (" in text and " ".join(map(str, layers)) in text.split(f"{name} (")[1].split(")")[0]
    assert "emmet (one or more layers, default layer 5 alone)" in text
    assert "memit (one or more layers, default layers 3 4 5 6 7)" in text


def test_quiet_weight_loading_hides_transformers_bars_unless_vv():
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    from collapsediag.cli import quiet_weight_loading

    hub_before = are_progress_bars_disabled()
    try:
        quiet_weight_loading(0)
        assert not hf_logging.is_progress_bar_enabled()
        assert are_progress_bars_disabled() == hub_before  # the Hub's download bars as they were
        quiet_weight_loading(2)
        assert hf_logging.is_progress_bar_enabled()
        quiet_weight_loading(0, quiet=True)
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    finally:
        hf_logging.enable_progress_bar()
        (disable_progress_bars if hub_before else enable_progress_bars)()


def test_text_table_wraps_long_cells_and_continues_wide_tables_within_100_columns():
    import pandas as pd

    from collapsediag.analysis.report import text_table, wrap_text

    evidence = "edit 3 (own-risk-ice) perplexity x31.9, flagged by " + ", ".join(["update_norm"] * 30)
    df = pd.DataFrame({"finding": ["(i) short", "(iii) bigger batches"], "reproduced": [True, "cannot say"],
                       "evidence": [evidence, "batch 1: 0.875"]})
    text = text_table(df)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100 and len(lines) > 3  # the evidence wrapped onto further lines
    assert " ".join(text.split()).count("update_norm") == 30 and "yes" in lines[1]
    wide = pd.DataFrame({f"column_{i}": [float(i) * 1000.5] for i in range(12)}).assign(run="rome")
    wide = wide[["run"] + [c for c in wide.columns if c != "run"]]
    blocks = text_table(wide, width=60).split("\n\n")
    assert len(blocks) > 1 and all(b.startswith("run") for b in blocks)  # each block repeats the first column
    assert all(len(line) <= 60 for line in "\n".join(blocks).splitlines())
    assert text_table(pd.DataFrame()) == "(none)"
    para = wrap_text("word " * 50, width=40, indent="  ")
    assert max(map(len, para.splitlines())) <= 40 and para.splitlines()[1].startswith("  w")
