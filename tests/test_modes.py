"""Editing modes: sequential, batch and sequential-batch; batch rows, factors, rebuild, resume and errors."""
from __future__ import annotations

import json

import pytest
import torch

from collapsediag import EditSession, load_run
from collapsediag.cli import check_mode, context_lengths, main
from collapsediag.editors import get_editor
from collapsediag.errors import ModeError
from collapsediag.stats import StatsCache, TextCorpus
from tests.conftest import corpus_texts, make_model
from tests.test_sequential_editors import RECORDS

FOUR = RECORDS + [{"case_id": 9, "subject": "Paris", "prompt": "{} is the capital of", "target_new": "Italy",
                   "target_true": "France"}]
HP = {"layers": [1, 2], "z_num_grad_steps": 3, "mom2_update_weight": 1.0}


def _memit_session(model, tok, env, out=None, **kw):
    return EditSession(model, tok, get_editor("memit", HP), out=out, stats=env.stats, templates=env.templates,
                       progress=False, **kw)


def test_rome_refuses_batches(tiny, env_for, tmp_path):
    model, tok = tiny
    env = env_for(model, [1], tmp_path)
    s = EditSession(model, tok, get_editor("rome", {"layer": 1}), stats=env.stats, templates=env.templates,
                    progress=False)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ModeError, match="one fact at a time"):
        s.run(RECORDS, batch_size=2)
    with pytest.raises(ModeError, match="one fact at a time"):
        s.edit_batch(RECORDS[:2])
    assert s.n_edits == 0 and all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    with pytest.raises(ModeError):
        check_mode("r-rome", "batch", None)
    with pytest.raises(ModeError, match="--batch-size"):
        check_mode("memit", "sequential-batch", None)
    with pytest.raises(ModeError, match="sequential-batch"):
        check_mode("memit", "sequential", 4)
    check_mode("memit", "batch", None)
    check_mode("rome", "sequential", None)


def test_cli_rejects_rome_batch_before_loading(tmp_path, capsys):
    code = main(["run", "--editor", "rome", "--mode", "batch", "--data", "own", "--n-edits", "4",
                 "--out", str(tmp_path / "r")])
    assert code == 2 and "one fact at a time" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_context_lengths_follow_the_editor():
    assert context_lengths("rome", 4) == ((5, 2), (10, 2))
    assert context_lengths("memit", 5) == ((10, 5),)
    assert context_lengths("rome", 3) == ((5, 2), (10, 1))


def test_sequential_batch_rows_factors_and_rebuild(tiny, env_for, tmp_path):
    model, tok = tiny
    env = env_for(model, [1, 2], tmp_path)
    base = {n: p.clone() for n, p in model.state_dict().items()}
    s = _memit_session(model, tok, env, out=tmp_path / "run", eval_every=3, eval_texts=corpus_texts(4),
                       generation_prompts=["The city"], generation_tokens=4)
    rows = s.edit_batch(FOUR[:2])
    after_first = {n: p.clone() for n, p in model.state_dict().items()}
    rows += s.edit_batch(FOUR[2:])
    assert [r["batch_index"] for r in rows] == [0, 0, 1, 1] and {r["batch_size"] for r in rows} == {2}
    run = load_run(tmp_path / "run")
    assert run.layers[["edit_index", "batch_index", "layer"]].values.tolist() == [[1, 0, 1], [1, 0, 2],
                                                                                 [3, 1, 1], [3, 1, 2]]
    assert sorted(p.name for p in (tmp_path / "run" / "factors").iterdir()) == ["batch_000000.npz",
                                                                              "batch_000001.npz"]
    assert run.factors(0)["left_1"].shape[1] == 2
    assert run.evals["edit_index"].tolist() == [-1, 3]  # baseline, then crossing edit 3 inside batch 1
    assert (run.retention["checkpoint"] == 3).all() and len(run.retention) == 4
    final = {n: p.clone() for n, p in model.state_dict().items()}
    s.restore()
    assert all(torch.equal(p, base[n]) for n, p in model.state_dict().items())
    for upto in (0, 1):  # inside the first batch: the model after that whole batch, not after the run
        m = run.model_at(upto, model=make_model(model.config.model_type, len(tok)))
        for n, p in m.state_dict().items():
            assert torch.allclose(p, after_first[n], rtol=1e-6, atol=0), n
    assert any(not torch.equal(after_first[n], final[n]) for n in base)
    m = run.model_at(3, model=make_model(model.config.model_type, len(tok)))
    for n, p in m.state_dict().items():
        assert torch.allclose(p, final[n], rtol=1e-6, atol=0), n


def test_one_batch_equals_the_batched_compute(tiny, env_for, tmp_path):
    model, tok = tiny
    env = env_for(model, [1, 2], tmp_path)
    s = _memit_session(model, tok, env)
    rows = s.run(FOUR, batch_size=len(FOUR))
    assert {r["batch_index"] for r in rows} == {0} and all(r["status"] == "ok" for r in rows)
    assert len(s.layer_rows) == 2 and all(r["edit_index"] == 3 for r in s.layer_rows)
    edited = {n: p.clone() for n, p in model.state_dict().items()}
    s.restore()
    from collapsediag.editors import apply_deltas
    from collapsediag.recorder import Recorder
    from collapsediag.requests import EditRequest

    deltas = get_editor("memit", HP).compute(model, tok, [EditRequest.from_dict(r) for r in FOUR], s.env,
                                             Recorder())
    apply_deltas(model, deltas)
    for n, p in model.state_dict().items():
        assert torch.allclose(p, edited[n], rtol=1e-5, atol=1e-7), n


def test_bad_record_in_a_batch_is_reported_and_the_rest_edited(tiny, env_for, tmp_path):
    model, tok = tiny
    env = env_for(model, [1, 2], tmp_path)
    bad = {"case_id": "broken", "subject": "Nowhere", "prompt": "{} is in", "prompt_filled": None,
           "target_new": "", "target_true": "x"}
    s = _memit_session(model, tok, env, out=tmp_path / "run")
    rows = s.edit_batch([RECORDS[0], bad, RECORDS[1]])
    assert [r["status"] == "ok" for r in rows] == [True, False, True]
    assert rows[1]["case_id"] == "broken" and "broken" in rows[1]["status"]
    assert len(s.layer_rows) == 2 and load_run(tmp_path / "run").factors(0)["left_1"].shape[1] == 2


def test_unfinished_batch_is_dropped_and_resume_matches(tok, env_for, tmp_path):
    full_model = make_model("gpt2", len(tok))
    env = env_for(full_model, [1, 2], tmp_path / "stats")
    _memit_session(full_model, tok, env, out=tmp_path / "full", config={"batch_size": 2}).run(FOUR, batch_size=2)

    cut_model = make_model("gpt2", len(tok))
    _memit_session(cut_model, tok, env, out=tmp_path / "cut", config={"batch_size": 2}).run(FOUR, batch_size=2)
    edits = tmp_path / "cut" / "edits.jsonl"
    lines = edits.read_text().splitlines(keepends=True)
    edits.write_text("".join(lines[:3]) + lines[3][:20])  # a crash while writing the second batch's rows
    with pytest.warns(UserWarning):
        run = load_run(tmp_path / "cut")
    assert run.edits["edit_index"].tolist() == [0, 1] and run.layers["batch_index"].tolist() == [0, 0]

    fresh = make_model("gpt2", len(tok))
    with pytest.warns(UserWarning):
        s = EditSession.resume(tmp_path / "cut", fresh, tok, FOUR, cache=StatsCache(tmp_path / "stats"),
                               corpus=TextCorpus.from_texts(corpus_texts(300)), progress=False)
    assert s.n_edits == 2 and s.n_batches == 1
    s.run(FOUR[2:], batch_size=2)
    a, b = load_run(tmp_path / "full"), load_run(tmp_path / "cut")
    assert a.edits["batch_index"].tolist() == b.edits["batch_index"].tolist()
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["batch_size"] == 2
    for n, p in fresh.state_dict().items():
        assert torch.allclose(p, full_model.state_dict()[n], rtol=1e-5, atol=1e-7), n


@pytest.mark.parametrize("mode,extra,batches", [("sequential-batch", ["--batch-size", "2"], [0, 0, 1, 1]),
                                                ("batch", [], [0, 0, 0, 0])])
def test_cli_modes(tok, tmp_path, mode, extra, batches):
    model = make_model("llama", len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FOUR))
    (tmp_path / "c.txt").write_text("\n\n".join(corpus_texts(300)))
    code = main(["run", "--model", str(tmp_path / "model"), "--editor", "d4s", "--mode", mode, *extra,
                 "--data", f"facts:{tmp_path / 'facts.jsonl'}", "--layers", "1", "2", "--hparam", "z_num_grad_steps=2",
                 "--hparam", "mom2_update_weight=1", "--context", "2", "--out", str(tmp_path / "run"),
                 "--stats-corpus", str(tmp_path / "c.txt"), "--stats-tokens", "6000",
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    run = load_run(tmp_path / "run")
    assert run.config["mode"] == mode and run.config["batch_size"] == (2 if mode != "batch" else 4)
    assert len(run.config["context_templates"]) == 3  # "{}" and two prefixes of ≤10 tokens
    assert run.edits["batch_index"].tolist() == batches and (run.edits["status"] == "ok").all()
    assert run.layers["cache_trace"].notna().all()
