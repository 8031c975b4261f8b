"""Edit sessions, saved runs, bad records, report and CLI on tiny models."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from collapsediag import EditRequest, EditSession, RecordError, get_editor, load_run
from collapsediag.runs import schema
from collapsediag.analysis.report import failed_edits, format_report, summary
from tests.conftest import corpus_texts

GOOD = [
    {"case_id": "a", "subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is",
     "target_new": "English", "target_true": "French", "paraphrase_prompts": ["I think {} speaks"],
     "neighborhood_prompts": ["The mother tongue of Paris is"]},
    {"case_id": "b", "subject": "Angola", "prompt": "{} is located in", "target_new": "Italy",
     "target_true": "Africa"},
]
BAD = {
    "subject-not-in-prompt": {"case_id": "bad1", "subject": "Tokyo", "prompt_filled": "Paris is in",
                              "target_new": "Spain"},
    "empty-target": {"case_id": "bad2", "subject": "Tokyo", "prompt": "{} is in", "target_new": "  "},
    "missing-field": {"case_id": "bad3", "prompt": "{} is in", "target_new": "Spain"},
    "no-placeholder": {"case_id": "bad4", "subject": "Tokyo", "prompt": "Tokyo is in", "target_new": "Spain"},
}
HP = {"layer": 1, "v_num_grad_steps": 4}


def _session(model, tok, env_for, tmp_path, out="run", editor="rome"):
    env = env_for(model, [1], tmp_path)
    return EditSession(model, tok, get_editor(editor, HP), out=tmp_path / out, stats=env.stats,
                       templates=env.templates, progress=False)


def test_saved_run_reloads_same_values(tiny, env_for, tmp_path):
    model, tok = tiny
    s = _session(model, tok, env_for, tmp_path)
    rows = s.run(GOOD, progress=False)
    run = load_run(tmp_path / "run")
    assert list(run.edits.columns[: len(schema.EDITS)]) == schema.columns("edits")
    assert set(schema.columns("layers")) <= set(run.layers.columns)
    assert len(run.edits) == 2 and len(run.layers) == 2
    for i, row in enumerate(rows):
        for key, value in row.items():
            got = run.edits.loc[i, key]
            if isinstance(value, float):
                assert math.isclose(got, value, rel_tol=1e-12) or (math.isnan(value) and math.isnan(got))
            else:
                assert got == value, key
    for mem, (_, disk) in zip(s.layer_rows, run.layers.iterrows()):
        for key, value in mem.items():
            assert disk[key] == pytest.approx(value, rel=1e-12, nan_ok=True) if isinstance(value, float) else disk[key] == value
    # every documented layer signal of the ROME family is filled in
    for c in schema.LAYERS:
        if c.editors in ("all", "rome family"):
            assert run.layers[c.name].notna().all(), c.name
    assert run["weight_l1", 1].index.tolist() == [0, 1]
    assert run.config["editor"] == "rome" and run.config["context_templates"] == s.env.templates
    f = run.factors(0)
    assert f["left_1"].shape[1] == 1 and f["right_1"].shape[1] == 1


def test_rows_are_readable_by_plain_pandas(tiny, env_for, tmp_path):
    model, tok = tiny
    _session(model, tok, env_for, tmp_path).run(GOOD[:1], progress=False)
    df = pd.read_json(tmp_path / "run" / "layers.jsonl", lines=True, precise_float=True)
    assert df.loc[0, "denominator"] == load_run(tmp_path / "run").layers.loc[0, "denominator"]


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_record_is_recorded_and_run_goes_on(tiny, env_for, tmp_path, kind):
    model, tok = tiny
    s = _session(model, tok, env_for, tmp_path)
    s.run([GOOD[0], BAD[kind], GOOD[1]], progress=False)
    run = load_run(tmp_path / "run")
    assert run.edits["status"].tolist()[0] == "ok" and run.edits["status"].tolist()[2] == "ok"
    status = run.edits.loc[1, "status"]
    assert "RecordError" in status and BAD[kind]["case_id"] in status
    assert run.edits.loc[1, "case_id"] == BAD[kind]["case_id"]
    assert sorted(run.layers["edit_index"]) == [0, 2]
    assert failed_edits(run)["case_id"].tolist() == [BAD[kind]["case_id"]]


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_record_error_names_the_record(kind):
    with pytest.raises(RecordError) as err:
        EditRequest.from_dict(BAD[kind])
    assert BAD[kind]["case_id"] in str(err.value)


def test_failed_edit_leaves_weights_untouched(tiny, env_for, tmp_path, monkeypatch):
    import torch

    from collapsediag.editors import target

    model, tok = tiny
    s = _session(model, tok, env_for, tmp_path)
    s.edit(GOOD[0])
    before = {n: p.clone() for n, p in model.state_dict().items()}
    real = target.optimise_targets

    def poisoned(*a, **k):
        res = real(*a, **k)
        res[0].delta[0] = float("nan")
        return res

    monkeypatch.setattr(target, "optimise_targets", poisoned)
    row = s.edit(GOOD[1])
    assert row["status"] != "ok" and "non-finite" in row["status"]
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n
    assert len(load_run(tmp_path / "run").edits) == 2


def test_restore_returns_initial_weights(tiny, env_for, tmp_path):
    import torch

    model, tok = tiny
    before = {n: p.clone() for n, p in model.state_dict().items()}
    s = _session(model, tok, env_for, tmp_path)
    s.run(GOOD, progress=False)
    s.restore()
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n


def test_run_dir_is_not_overwritten(tiny, env_for, tmp_path):
    from collapsediag.errors import CollapseDiagError

    model, tok = tiny
    _session(model, tok, env_for, tmp_path).run(GOOD[:1], progress=False)
    with pytest.raises(CollapseDiagError, match="already holds a run"):
        _session(model, tok, env_for, tmp_path)


def test_summary_and_report(tiny, env_for, tmp_path):
    model, tok = tiny
    _session(model, tok, env_for, tmp_path).run([GOOD[0], BAD["empty-target"], GOOD[1]], progress=False)
    run = load_run(tmp_path / "run")
    table = summary(run)
    assert table.loc[0, "edits"] == 3 and table.loc[0, "ok"] == 2
    den = run.layers["denominator"]
    assert table.loc[0, "denominator_min"] == den.min() and table.loc[0, "denominator_max"] == den.max()
    expected_growth = run.layers["weight_l1"].iloc[-1] / run.config["initial_weights"]["1"]["weight_l1"]
    assert table.loc[0, "weight_l1_growth_pct"] == pytest.approx(100 * (expected_growth - 1))
    text = format_report([run])
    assert "bad2" in text and "denominator_min" in text


def test_cli_run_and_report(tok, tmp_path, capsys):
    from collapsediag.cli import main
    from tests.conftest import make_model

    model = make_model("llama", len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(json.dumps(r) for r in GOOD + [BAD["no-placeholder"]]) + "\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(corpus_texts(300)))
    out = tmp_path / "out"
    rc = main(["run", "--model", str(tmp_path / "model"), "--editor", "r-rome", "--data", f"facts:{facts}",
               "--n-edits", "3", "--layers", "1", "--hparam", "v_num_grad_steps=3", "--seed", "1",
               "--out", str(out), "--stats-corpus", str(corpus), "--stats-tokens", "6000",
               "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    run = load_run(out)
    assert run.config["editor"] == "r-rome" and run.config["hparams"]["layer"] == 1
    assert run.config["hparams"]["v_num_grad_steps"] == 3 and run.config["seed"] == 1
    assert run.edits["status"].tolist()[:2] == ["ok", "ok"] and "bad4" in run.edits.loc[2, "status"]
    assert list((tmp_path / "cache" / "stats").glob("*.npz"))
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert "r-rome" in capsys.readouterr().out
    assert main(["run", "--editor", "nope", "--data", f"facts:{facts}", "--out", str(tmp_path / "x")]) == 2


def test_layer_condition_is_the_editors_matrix_and_c_only_for_rome(tiny, env_for, tmp_path, monkeypatch):
    from collapsediag.stats import LayerStats

    model, tok = tiny
    env = env_for(model, [1], tmp_path)
    calls = []
    condition = LayerStats.condition
    monkeypatch.setattr(LayerStats, "condition", lambda self: calls.append(self.layer) or condition(self))
    memit = EditSession(model, tok, get_editor("memit", {"layers": [1], "z_num_grad_steps": 2}), out=None,
                        stats=env.stats, templates=env.templates, progress=False)
    memit.run(GOOD[:1], progress=False)
    assert calls == [] and memit.layer_rows[0]["condition"] > 1  # κ(λC + KKᵀ), not κ(C)
    memit.restore()
    rome = _session(model, tok, env_for, tmp_path, out="rome")
    rome.run(GOOD[:1], progress=False)
    assert calls == [1] and rome.layer_rows[0]["condition"] == pytest.approx(rome.env.stats[1].condition())
