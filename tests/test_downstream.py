"""Downstream tasks: specs, a user's own task, bad input before the model loads, scoring, the run table."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch

from collapsediag import models
from collapsediag.cli import main
from collapsediag.signals.downstream import (TaskSpec, builtin_tasks, data_dir, draw, load_task, load_tasks, parse_tasks,
                                     render, task_from_spec)
from collapsediag.signals.downstream_score import (DownstreamSuite, _encode, accuracy, answer_logprobs, chance_level,
                                           downstream_summary, f1_score, is_informative, matthews, max_length,
                                           score_task, shared_prefix, token_counts, wilson_interval)
from collapsediag.errors import TaskError
from collapsediag.runs.store import load_run
from tests.conftest import corpus_texts, make_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue_eval"
needs_glue = pytest.mark.skipif(not GLUE.is_dir(), reason="../shared/data/glue_eval is not here")
FACTS = [{"case_id": i, "subject": s, "prompt": "{} is located in", "target_new": "Italy", "target_true": "France"}
         for i, s in enumerate(["Paris", "Tokyo", "Angola"])]


def _own_task(tmp_path, records=None, **spec):
    """A user's task: a JSON Lines file and its spec beside it; returns the spec's path."""
    records = records or [{"text": f"the city {w}", "gold": g} for w, g in
                          zip("abcdefghijkl", ["yes", "no"] * 6)]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    full = {"data": "mine.jsonl", "template": "Q: {text}\nA:", "label": "gold",
            "answers": {"no": " the", "yes": " famous people"}, "shots": 2, **spec}
    (tmp_path / "mine.json").write_text(json.dumps(full))
    return tmp_path / "mine.json"


def test_builtin_specs_parse_and_round_trip():
    assert builtin_tasks() == ["cola", "mmlu", "mrpc", "nli", "rte", "sst2"]
    for name in builtin_tasks():
        raw = json.loads((ROOT / "collapsediag" / "data" / "tasks" / f"{name}.json").read_text())
        spec = TaskSpec.from_dict(raw, name)
        assert TaskSpec.from_dict(spec.to_dict(), name) == spec
        assert spec.metrics == (("accuracy", "f1", "mcc") if name in ("mrpc", "cola") else ("accuracy",))
    mmlu = TaskSpec.from_dict(json.loads((ROOT / "collapsediag/data/tasks/mmlu.json").read_text()), "mmlu")
    assert list(mmlu.answers.values()) == [" A", " B", " C", " D"]
    text = render(mmlu.template, {"question": "Q?", "choices": ["w", "x", "y", "z"], "answer": 1})
    assert text == "Q?\nA. w\nB. x\nC. y\nD. z\nAnswer:"


@pytest.mark.parametrize("spec,message", [
    ({"template": "{x}"}, "no 'answers'"), ({"template": "{x}", "answers": {"a": " A"}}, "at least two"),
    ({"template": "{x}", "answers": {"0": " A", "1": " B"}, "metrics": ["f1"]}, "needs 'positive'"),
    ({"template": "{x}", "answers": {"0": " A", "1": " B"}, "shot": 2}, "unknown spec key"),
    ({"template": "{x}", "answers": {"0": " A", "1": " A"}}, "share one answer word"),
    ({"template": "{x}", "answers": {"0": " A", "1": " B"}, "metrics": ["bleu"]}, "unknown metric")])
def test_bad_specs_name_the_task(spec, message):
    with pytest.raises(TaskError, match=message) as info:
        TaskSpec.from_dict(spec, "mine")
    assert "'mine'" in str(info.value)


def test_a_users_own_task(tmp_path):
    task = load_task("mine", _own_task(tmp_path), n=5, seed=3)
    assert len(task.demos) == 2 and len(task.scored) == 5 and not set(task.demos) & set(task.scored)
    prompts = task.prompts()
    head = "".join(f"Q: {task.records[i]['text']}\nA:{task.spec.answers[task.records[i]['gold']]}\n\n"
                   for i in task.demos)
    assert prompts[0] == head + f"Q: {task.records[task.scored[0]]['text']}\nA:"
    assert task.gold().tolist() == [task.labels.index(task.records[i]["gold"]) for i in task.scored]
    [(name, path)] = parse_tasks(f"mine={tmp_path / 'mine.json'}")
    assert name == "mine" and path == tmp_path / "mine.json"
    assert load_tasks(f"mine={tmp_path / 'mine.json'}", n=5, seed=3)[0].scored == task.scored


def test_the_subset_is_seeded_fixed_and_never_holds_a_demonstration():
    demos, scored = draw(100, 4, 20, seed=0, task="sst2")
    assert (demos, scored) == draw(100, 4, 20, seed=0, task="sst2")
    assert (demos, scored) != draw(100, 4, 20, seed=1, task="sst2")
    assert draw(100, 4, 20, seed=0, task="sst2") != draw(100, 4, 20, seed=0, task="cola")
    assert len(set(demos + scored)) == 24
    assert draw(10, 4, 200, seed=0, task="x")[1].__len__() == 6  # n is capped by what is left
    with pytest.raises(TaskError, match="none to score"):
        draw(3, 3, 5, seed=0, task="x")


def test_data_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv("COLLAPSEDIAG_GLUE_EVAL", str(tmp_path / "env"))
    assert data_dir(tmp_path / "given") == tmp_path / "given"
    assert data_dir() == tmp_path / "env"
    monkeypatch.delenv("COLLAPSEDIAG_GLUE_EVAL")
    monkeypatch.chdir(tmp_path)
    assert data_dir() is None
    with pytest.raises(TaskError, match="--downstream-data"):
        load_task("sst2")


@needs_glue
def test_builtin_tasks_load_and_check_every_record():
    for task in load_tasks(",".join(builtin_tasks()), GLUE, n=200):
        assert len(task.scored) == 200 and len(task.demos) == task.spec.shots
        assert set(task.gold()) <= set(range(len(task.labels)))


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input check")
    monkeypatch.setattr(models, "load_model", refuse)


@pytest.mark.parametrize("case,message", [
    ("unknown", "downstream task 'sst3': no such built-in task"),
    ("no_label", "downstream task 'mine' record at line 2 of"),
    ("bad_label", "label 'maybe' is not among the answers")])
def test_bad_input_exits_2_before_the_model_loads(case, message, tmp_path, capsys, no_model_load):
    records = [{"text": "a", "gold": "yes"}, {"text": "b", "gold": "no"}, {"text": "c", "gold": "no"}]
    if case == "no_label":
        del records[1]["gold"]
    if case == "bad_label":
        records[2]["gold"] = "maybe"
    value = "sst3" if case == "unknown" else f"mine={_own_task(tmp_path, records)}"
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FACTS))
    code = main(["run", "--editor", "rome", "--data", f"facts:{tmp_path / 'facts.jsonl'}", "--eval-every", "1",
                 "--downstream", value, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    if case == "no_label":
        assert "no label field 'gold'" in err
    if case == "bad_label":
        assert "line 3" in err
    assert not (tmp_path / "out").exists()


def test_downstream_needs_checkpoints(tmp_path, capsys, no_model_load):
    assert main(["run", "--editor", "rome", "--data", "own", "--downstream", "sst2", "--out", str(tmp_path / "o")]) == 2
    assert "--eval-every" in capsys.readouterr().err


def test_answer_logprobs_match_a_direct_forward(tiny, tmp_path):
    model, tok = tiny
    task = load_task("mine", _own_task(tmp_path), n=6)
    lp = answer_logprobs(model, tok, task, batch_size=4)
    assert lp.shape == (6, 2)
    for j, text in enumerate(task.prompts()):
        for k, word in enumerate(task.spec.answers.values()):
            ctx = tok(text)["input_ids"]
            ans = tok(word, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ctx + ans])).logits[0].float()
            lsm = torch.log_softmax(logits, -1)
            want = sum(float(lsm[len(ctx) - 1 + i, a]) for i, a in enumerate(ans))
            assert lp[j, k] == pytest.approx(want, rel=1e-4, abs=1e-4)
    row = score_task(model, tok, task)
    pred = lp.argmax(1)
    assert row["accuracy"] == accuracy(pred, task.gold()) and row["n"] == 6 and np.isnan(row["f1"])
    assert row["chance"] == 0.5 or row["chance"] > 0.5


def test_long_prompts_are_cut_from_the_left(tok, tmp_path):
    model = make_model("gpt2", len(tok))  # 128 positions
    long = [{"text": " ".join(["the city"] * 60), "gold": g} for g in ["yes", "no"] * 3]
    task = load_task("mine", _own_task(tmp_path, long), n=3)
    lp = answer_logprobs(model, tok, task)
    assert np.isfinite(lp).all()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_the_shared_prefix_scores_equal_the_full_forward(kind, tok, tmp_path, recwarn, monkeypatch):
    model = make_model(kind, len(tok))
    task = load_task("mine", _own_task(tmp_path, shots=3), n=7)  # " famous people": a multi-token answer
    contexts, conts, cut = _encode(task, tok, max_length(model))
    prefix = shared_prefix(contexts, cut)
    assert len(prefix) >= 8 and not any(cut) and all(c[:len(prefix)] == prefix for c in contexts)
    assert len(tok(" famous people", add_special_tokens=False)["input_ids"]) > 1
    counts = token_counts(task, tok, max_length(model))
    assert counts["prefix"] == len(prefix) and counts["shared"] < counts["full"]
    from collapsediag.signals import evaluate

    real, ran = evaluate._prefix_logprobs, []
    monkeypatch.setattr(evaluate, "_prefix_logprobs", lambda *a, **k: ran.append(len(a[3])) or real(*a, **k))
    fast = answer_logprobs(model, tok, task, batch_size=3)
    assert ran == [14]  # every (example, answer) sequence went through the prefix path
    full = answer_logprobs(model, tok, task, batch_size=3, share_prefix=False)
    np.testing.assert_allclose(fast, full, atol=1e-4, rtol=0)
    assert (fast.argmax(1) == full.argmax(1)).all()
    assert not [w for w in recwarn if "shared-prefix" in str(w.message)]


def test_cut_prompts_take_the_full_forward(tok, tmp_path):
    model = make_model("gpt2", len(tok))  # 128 positions: the long records are cut, the short ones are not
    records = [{"text": " ".join(["the city"] * 50) if i % 3 == 0 else f"the city {'abcdefghijklmnop'[i]}",
                "gold": g} for i, g in enumerate(["yes", "no"] * 8)]
    task = load_task("mine", _own_task(tmp_path, records, shots=2), n=10)
    contexts, _, cut = _encode(task, tok, max_length(model))
    prefix = shared_prefix(contexts, cut)
    assert any(cut) and not all(cut) and prefix
    assert not any(c[:len(prefix)] == prefix for c, x in zip(contexts, cut) if x)  # the cut ones run whole
    fast = answer_logprobs(model, tok, task, batch_size=4)
    np.testing.assert_allclose(fast, answer_logprobs(model, tok, task, share_prefix=False), atol=1e-4, rtol=0)
    assert np.isfinite(fast).all()


def test_a_family_whose_cache_fails_takes_the_full_forward(tok, tmp_path, monkeypatch):
    from collapsediag.editors import suffix

    model = make_model("llama", len(tok))
    task = load_task("mine", _own_task(tmp_path, shots=3), n=5)
    full = answer_logprobs(model, tok, task, share_prefix=False)
    monkeypatch.setattr(suffix, "_kv_pairs", lambda cache: [])  # as if the model kept no keys and values
    with pytest.warns(UserWarning, match="no shared-prefix scoring"):
        np.testing.assert_allclose(answer_logprobs(model, tok, task), full, atol=1e-6, rtol=0)


def test_metrics_by_hand():
    gold, pred = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    assert accuracy(pred, gold) == pytest.approx(0.6)
    assert f1_score(pred, gold, 1) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # binary phi: (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2·1 − 1·1) / sqrt(3·3·2·2)
    assert matthews(pred, gold) == pytest.approx(1 / 6)
    assert matthews(np.zeros(4), np.array([0, 1, 0, 1])) == 0.0
    lo, hi = wilson_interval(0.5, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0.0, 10)[0] == 0.0 and np.isnan(wilson_interval(0.5, 0)[0])
    assert chance_level(np.array([0, 0, 1, 2]), 4) == 0.5 and chance_level(np.array([0, 1]), 2) == 0.5
    assert not is_informative(0.55, 100, 0.5) and is_informative(0.7, 100, 0.5)


def test_suite_config_round_trip_and_changed_data(tmp_path):
    suite = DownstreamSuite([load_task("mine", _own_task(tmp_path), n=4, seed=2)], n=4, seed=2)
    again = DownstreamSuite.from_config(json.loads(json.dumps(suite.config())))
    assert again.tasks[0].scored == suite.tasks[0].scored and again.tasks[0].spec == suite.tasks[0].spec
    with open(tmp_path / "mine.jsonl", "a") as f:
        f.write(json.dumps({"text": "z", "gold": "no"}) + "\n")
    with pytest.raises(TaskError, match="changed since the run started"):
        DownstreamSuite.from_config(suite.config() | {"tasks": [dict(suite.config()["tasks"][0], sha256="0")]})


def test_task_from_spec_checks_the_template(tmp_path):
    spec = TaskSpec.from_dict({"template": "{missing}", "answers": {"0": " a", "1": " b"}}, "t")
    (tmp_path / "d.jsonl").write_text('{"label": 0, "idx": 7}\n')
    with pytest.raises(TaskError, match=r"record at line 1 of .*\(idx 7\).*cannot be filled"):
        task_from_spec("t", spec, tmp_path / "d.jsonl")


@needs_glue
def test_a_3_edit_memit_run_writes_the_downstream_table(tok, tmp_path, capsys):
    from collapsediag.plots import plot_downstream, write_figures
    from collapsediag.analysis.report import format_report
    from collapsediag.runs.resume import consistent_state

    model = make_model("llama", len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FACTS))
    (tmp_path / "c.txt").write_text("\n\n".join(corpus_texts(300)))
    out = tmp_path / "run"
    code = main(["run", "--model", str(tmp_path / "model"), "--editor", "memit", "--mode", "sequential",
                 "--data", f"facts:{tmp_path / 'facts.jsonl'}", "--layers", "1", "2",
                 "--hparam", "z_num_grad_steps=2", "--context", "2", "--eval-every", "3",
                 "--downstream", "sst2,mmlu", "--downstream-n", "8", "--downstream-data", str(GLUE),
                 "--out", str(out), "--stats-corpus", str(tmp_path / "c.txt"), "--stats-tokens", "6000",
                 "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert code == 0
    assert "Downstream accuracy" in capsys.readouterr().out
    run = load_run(out)
    d = run.downstream
    assert d["edit_index"].tolist() == [-1, -1, 2, 2] and d["task"].tolist() == ["sst2", "mmlu"] * 2
    assert (d["n"] == 8).all() and d["accuracy"].between(0, 1).all() and (d["seconds"] > 0).all()
    assert d["f1"].isna().all() and d["mcc"].isna().all()
    assert d.loc[d["task"] == "mmlu", "chance"].iloc[0] >= 0.25
    assert [t["name"] for t in run.config["downstream"]["tasks"]] == ["sst2", "mmlu"]
    summary = downstream_summary(run)
    assert summary["task"].tolist() == ["sst2", "mmlu"] and summary["accuracy_unedited"].notna().all()
    assert all(s["dropped"] is None for _, s in summary.iterrows() if not s["informative"])
    assert "Downstream accuracy" in format_report([run])
    axes = plot_downstream([run, run])
    assert len(axes) == 2 and axes[0].get_title(loc="left").startswith("sst2")
    assert any(p.stem == "downstream" for p in write_figures([run], tmp_path / "fig"))
    # a checkpoint without its evals row is redone on resume: its downstream rows are dropped with it
    lines = (out / "evals.jsonl").read_text().splitlines()
    (out / "evals.jsonl").write_text(lines[0] + "\n")
    state = consistent_state(load_run(out))
    assert state.downstream["edit_index"].tolist() == [-1, -1]


def test_plot_downstream_marks_uninformative_tasks(tmp_path):
    from collapsediag.plots import plot_downstream
    from collapsediag.runs.store import RunWriter

    w = RunWriter.create(tmp_path / "r", {"editor": "memit"})
    w.append("downstream", [{"edit_index": e, "task": t, "n": 200, "accuracy": a, "f1": None, "mcc": None,
                             "chance": 0.5, "seconds": 1.0}
                            for e in (-1, 9) for t, a in (("sst2", 0.8 if e < 0 else 0.6), ("rte", 0.52))])
    run = load_run(tmp_path / "r")
    s = downstream_summary(run).set_index("task")
    assert bool(s.loc["sst2", "informative"]) and s.loc["sst2", "dropped"] is True
    assert not s.loc["rte", "informative"] and s.loc["rte", "dropped"] is None
    axes = plot_downstream(run)
    assert [a.get_title(loc="left") for a in axes] == ["sst2", "rte (uninformative)"]
    assert axes[0].lines[0].get_xdata().tolist() == [0, 10]
