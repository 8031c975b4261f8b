"""The pre-edit guard: its rule, the rows a run records before each edit, skipping, resume and the CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from collapsediag import EditSession, get_editor, load_run
from collapsediag.errors import CollapseDiagError
from collapsediag.runs.guard import Guard
from collapsediag.signals.scan import scan
from tests.test_session import GOOD, HP

MORE = GOOD + [{"case_id": "c", "subject": "Toyota", "prompt": "{} was founded in", "target_new": "Germany",
                "target_true": "Japan"},
               {"case_id": "d", "subject": "Lionel Messi", "prompt": "The sport of {} is", "target_new": "tennis",
                "target_true": "football"}]


def test_rule_fires_below_the_ratio_only():
    g = Guard("warn", 0.05)
    assert g.reason({"denominator_ratio": 0.01, "key_cosine": 0.1, "subject_first_token": True}).startswith(
        "k_uᵀû / k̄ᵀû = 0.01 < 0.05: ROME's update would be 100×")
    assert g.reason({"denominator_ratio": -0.02, "key_cosine": 0.1}) is not None  # the size counts, not the sign
    assert g.reason({"denominator_ratio": 0.2}) is None
    assert g.reason({"denominator_ratio": float("nan")}) is None
    assert Guard(**g.config()) == g
    with pytest.raises(CollapseDiagError, match="guard mode"):
        Guard("block")
    with pytest.raises(CollapseDiagError, match="min_ratio"):
        Guard("warn", 0.0)


def _session(model, tok, env, tmp_path, guard, out="run"):
    return EditSession(model, tok, get_editor("rome", HP), out=tmp_path / out, stats=env.stats,
                       templates=env.templates, progress=False, guard=guard)


def _threshold_between(model, tok, env):
    """A min_ratio that makes some of MORE risky and some not (random tiny models have no natural outliers)."""
    ratios = scan(model, tok, MORE, 1, stats=env.stats, templates=env.templates, progress=False) \
        .sort_values("record_index")["denominator_ratio"].abs().to_numpy()
    order = np.sort(ratios)
    return ratios, float(np.sqrt(order[1] * order[2]))  # two below, two above


def test_warn_records_every_request_before_its_edit_and_matches_the_edit(tiny, env_for, tmp_path):
    model, tok = tiny
    env = env_for(model, [1], tmp_path)
    ratios, cut = _threshold_between(model, tok, env)
    s = _session(model, tok, env, tmp_path, Guard("warn", cut))
    s.run(MORE, progress=False)
    run = load_run(tmp_path / "run")
    assert run.config["guard"] == {"mode": "warn", "min_ratio": cut}
    assert run.guard["edit_index"].tolist() == [0, 1, 2, 3]
    assert run.guard["risky"].tolist() == list(ratios < cut)
    assert set(run.guard["action"]) == {"warned", "none"}
    assert (run.edits["status"] == "ok").all()  # warn makes every edit
    # the guard read the same keys the edit then used: ROME's recorded denominator k_uᵀu
    assert run.guard["denominator"].to_numpy() == pytest.approx(run.layers["denominator"].to_numpy(), rel=1e-4)
    assert run.guard["key_cosine"].to_numpy() == pytest.approx(run.layers["key_cosine"].to_numpy(), rel=1e-4)
    assert run.guard.loc[run.guard["risky"], "reason"].str.contains("ROME's update would be").all()
    assert run.guard.loc[~run.guard["risky"], "reason"].isna().all()


def test_skip_leaves_risky_requests_out(tiny, env_for, tmp_path):
    model, tok = tiny
    env = env_for(model, [1], tmp_path)
    ratios, cut = _threshold_between(model, tok, env)
    s = _session(model, tok, env, tmp_path, Guard("skip", cut))
    s.run(MORE, progress=False)
    run = load_run(tmp_path / "run")
    risky = ratios < cut
    skipped = run.edits["status"].str.startswith("skipped by the guard: k_uᵀû / k̄ᵀû")
    assert skipped.tolist() == list(risky)
    assert (run.edits.loc[~skipped, "status"] == "ok").all()
    assert run.guard.loc[run.guard["risky"], "action"].eq("skipped").all()
    assert sorted(s.requests) == [i for i in range(4) if not risky[i]]  # never re-tested at checkpoints
    assert len(run.layers) == int((~risky).sum())  # no update, no layers row, for a skipped edit
    for i in np.flatnonzero(risky):
        assert run.factors_file(int(i)) is None


def test_the_guard_row_is_saved_even_when_the_update_fails(tiny, env_for, tmp_path, monkeypatch):
    model, tok = tiny
    env = env_for(model, [1], tmp_path)
    s = _session(model, tok, env, tmp_path, Guard("warn"))

    def boom(*a, **k):
        raise CollapseDiagError("singular matrix")

    monkeypatch.setattr(s.editor, "compute", boom)
    s.edit(GOOD[0])
    rows = [json.loads(x) for x in (tmp_path / "run" / "guard.jsonl").read_text().splitlines()]
    assert [r["edit_index"] for r in rows] == [0] and math.isfinite(rows[0]["denominator"])
    assert "singular matrix" in load_run(tmp_path / "run").edits["status"].iloc[0]


def test_a_guard_that_cannot_read_fails_the_batch_on_its_rows_and_the_run_goes_on(tiny, env_for, tmp_path,
                                                                                   monkeypatch):
    model, tok = tiny
    env = env_for(model, [1], tmp_path)
    guard = Guard("warn")
    s = _session(model, tok, env, tmp_path, guard)
    w = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(*a, **k):
        raise RuntimeError("no statistics for layer 1")

    monkeypatch.setattr(Guard, "screen", boom)
    s.edit(GOOD[0])
    monkeypatch.undo()
    s.edit(GOOD[1])  # the next edit is guarded and made as usual
    edits = load_run(tmp_path / "run").edits
    assert "the guard could not read the key geometry: no statistics for layer 1" in edits["status"].iloc[0]
    assert edits["status"].iloc[1] == "ok" and len(s.guard_rows) == 1 and s.guard_rows[0]["edit_index"] == 1
    assert not all(torch.equal(w[k], v) for k, v in model.state_dict().items())  # only the second edit changed W


def test_resume_keeps_the_guard_and_its_rows(tiny, env_for, tmp_path):
    model, tok = tiny
    env = env_for(model, [1], tmp_path)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    s = _session(model, tok, env, tmp_path, Guard("warn", 0.5))
    s.run(MORE[:2], progress=False)
    model.load_state_dict(base)
    from collapsediag.stats import StatsCache, TextCorpus
    from tests.conftest import corpus_texts

    again = EditSession.resume(tmp_path / "run", model, tok, MORE, cache=StatsCache(tmp_path),
                               corpus=TextCorpus.from_texts(corpus_texts(300)), progress=False)
    assert again.guard == Guard("warn", 0.5) and len(again.guard_rows) == 2
    again.run(MORE[2:], progress=False)
    assert load_run(tmp_path / "run").guard["edit_index"].tolist() == [0, 1, 2, 3]


def test_cli_guard(tok, tmp_path, capsys):
    from collapsediag.cli import main
    from tests.conftest import corpus_texts, make_model

    model = make_model("llama", len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "c.txt").write_text("\n\n".join(corpus_texts(300)))
    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(json.dumps(r) for r in MORE))
    common = ["--model", str(tmp_path / "model"), "--stats-corpus", str(tmp_path / "c.txt"), "--stats-tokens",
              "6000", "--cache-dir", str(tmp_path / "cache"), "-q"]
    out = tmp_path / "g"
    assert main(["run", "--editor", "rome", "--data", f"facts:{facts}", "--layers", "1", "--context", "1",
                 "--hparam", "v_num_grad_steps=2", "--guard", "skip", "--guard-ratio", "0.9", "--out", str(out),
                 *common]) == 0
    run = load_run(out)
    assert run.config["guard"] == {"mode": "skip", "min_ratio": 0.9} and len(run.guard) == 4
    assert (run.edits["status"].str.startswith("skipped")).tolist() == run.guard["risky"].tolist()
    assert main(["run", "--resume", "--out", str(out), "--guard", "warn", *common]) == 2
    assert "keeps the guard it started with" in capsys.readouterr().err
