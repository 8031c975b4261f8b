"""Periodic evaluation rows, rebuild at any edit, truncated tables, and resume after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from collapsediag import EditSession, get_editor, load_run
from collapsediag.arch import get_module, weight_matrix
from collapsediag.runs.store import read_table
from tests.conftest import corpus_texts, make_model

FACTS = [
    {"case_id": f"f{i}", "subject": s, "prompt": p, "target_new": n, "target_true": t,
     "paraphrase_prompts": ["I think {} is"], "neighborhood_prompts": ["The mother tongue of Paris is"]}
    for i, (s, p, n, t) in enumerate([
        ("Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
        ("Angola", "{} is located in", "Italy", "Africa"),
        ("Apple", "{} plays the", "guitar", "piano"),
        ("Tokyo", "{} is a citizen of", "Spain", "Japan"),
        ("Kiki Dee", "The official religion of {} is", "Islam", "Christianity"),
        ("Paris", "I think {} was born in", "London", "Brazil"),
        ("the Nile", "Because of {}, we went to", "Japan", "Africa"),
    ])]
HP = {"layer": 1, "v_num_grad_steps": 3}


def _session(model, tok, env_for, tmp_path, **kw):
    env = env_for(model, [1], tmp_path)
    return EditSession(model, tok, get_editor("r-rome", HP), out=tmp_path / "run", stats=env.stats,
                       templates=env.templates, progress=False, eval_texts=corpus_texts(6, seed=9),
                       generation_prompts=["The city", "I think"], generation_tokens=8, **kw)


@pytest.mark.parametrize("n,k", [(7, 3), (6, 3), (5, 1)])
def test_retention_rows(tok, env_for, tmp_path, n, k):
    model = make_model("llama", len(tok))
    s = _session(model, tok, env_for, tmp_path, eval_every=k)
    s.run(FACTS[:n], progress=False)
    run = load_run(tmp_path / "run")
    assert not run.made_alone  # a sequential run: model_at(i) holds edits 0..i
    checkpoints = sorted(set(list(range(k - 1, n, k)) + [n - 1]))
    assert run.evals["edit_index"].tolist() == [-1] + checkpoints  # −1: the unedited baseline
    base = run.evals.iloc[0]
    assert base["n_edits"] == 0 and base["perplexity"] > 1 and np.isnan(base["retention"])
    ok = run.edits.loc[run.edits["status"] == "ok", "edit_index"].tolist()
    assert len(run.retention) == sum(sum(1 for i in ok if i <= c) for c in checkpoints)
    for c in checkpoints:
        rows = run.retention[run.retention["checkpoint"] == c]
        assert rows["edit_index"].tolist() == [i for i in ok if i <= c]
        ev = run.evals[run.evals["edit_index"] == c].iloc[0]
        made = run.edits.set_index("edit_index").loc[rows["edit_index"], "efficacy"].astype(bool).to_numpy()
        still = rows["success"].astype(bool).to_numpy()
        assert ev["retention"] == pytest.approx(still[made].mean() if made.any() else np.nan, nan_ok=True)
        assert ev["efficacy"] == pytest.approx(still.mean())
        assert ev["perplexity"] > 1 and ev["generation_entropy"] >= 0
    last = run.retention[run.retention["checkpoint"] == n - 1]
    assert (last["success"] == (last["p_new"] > last["p_true"])).all()


def test_model_at_equals_live_model(tok, env_for, tmp_path):
    model = make_model("gpt2", len(tok))
    s = _session(model, tok, env_for, tmp_path)
    name = s.arch.rewrite_name(1)
    live = []
    for rec in FACTS[:4]:
        s.edit(rec)
        live.append({k: v.clone() for k, v in model.state_dict().items()})
    run = load_run(tmp_path / "run")
    for i in range(4):
        rebuilt = run.model_at(i, model=make_model("gpt2", len(tok)))
        for key, value in rebuilt.state_dict().items():
            assert torch.allclose(value, live[i][key], rtol=1e-6, atol=0), (i, key)
        assert torch.equal(weight_matrix(get_module(rebuilt, name)), weight_matrix(get_module(rebuilt, name)))


def test_model_at_rejects_other_model(tok, env_for, tmp_path):
    from collapsediag.errors import CollapseDiagError

    model = make_model("llama", len(tok))
    _session(model, tok, env_for, tmp_path).run(FACTS[:1], progress=False)
    with pytest.raises(CollapseDiagError, match="fingerprint"):
        load_run(tmp_path / "run").model_at(0, model=make_model("gpt2", len(tok)))


def test_truncated_table_loads_complete_rows(tok, env_for, tmp_path):
    model = make_model("llama", len(tok))
    _session(model, tok, env_for, tmp_path).run(FACTS[:3], progress=False)
    path = tmp_path / "run" / "edits.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # a crash in the middle of the last row
    with pytest.warns(UserWarning, match="incomplete line"):
        edits = read_table(tmp_path / "run", "edits")
    assert edits["edit_index"].tolist() == [0, 1]
    with pytest.warns(UserWarning):
        run = load_run(tmp_path / "run")
    assert sorted(set(run.layers["edit_index"])) == [0, 1]  # the orphan layers row is dropped


def _cli(tmp_path, out, resume=False):
    args = [sys.executable, "-m", "collapsediag", "run", "--model", str(tmp_path / "model"), "--editor", "rome",
            "--data", f"facts:{tmp_path / 'facts.jsonl'}", "--layers", "1", "--hparam", "v_num_grad_steps=4",
            "--eval-every", "2", "--retention-sample", "1", "--snapshot-every", "3", "--context", "2", "--out", str(out), "--stats-corpus", str(tmp_path / "c.txt"),
            "--stats-tokens", "6000", "--cache-dir", str(tmp_path / "cache")]
    return args + (["--resume"] if resume else [])


def _comparable(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in ("seconds",) if c in df.columns]).reset_index(drop=True)


def test_sigkill_then_resume_equals_uninterrupted(tok, tmp_path):
    model = make_model("llama", len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FACTS))
    (tmp_path / "c.txt").write_text("\n\n".join(corpus_texts(300)))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.run(_cli(tmp_path, tmp_path / "full"), check=True, capture_output=True, env=env, timeout=600)

    proc = subprocess.Popen(_cli(tmp_path, tmp_path / "cut"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    edits = tmp_path / "cut" / "edits.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if edits.exists() and edits.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_cut = edits.read_text().count("\n")
    assert 3 <= n_cut < len(FACTS), "the kill must land mid-run"
    subprocess.run(_cli(tmp_path, tmp_path / "cut", resume=True), check=True, capture_output=True, env=env,
                   timeout=600)

    full, cut = load_run(tmp_path / "full"), load_run(tmp_path / "cut")
    for table in ("edits", "layers", "evals", "retention"):
        a, b = _comparable(getattr(full, table)), _comparable(getattr(cut, table))
        pd.testing.assert_frame_equal(a, b, check_dtype=False, rtol=1e-6)
    for i in range(len(FACTS)):
        fa, fb = full.factors(i), cut.factors(i)
        assert fa.keys() == fb.keys()
        for k in fa:
            np.testing.assert_allclose(fa[k], fb[k], rtol=1e-6)
    assert full.snapshots() == cut.snapshots() == [2, 5][:len(FACTS) // 3]
    assert (full.retention["recent"] == False).groupby(full.retention["checkpoint"]).sum().max() == 1  # noqa: E712
    wa = full.model_at(len(FACTS) - 1, model=make_model("llama", len(tok))).state_dict()
    wb = cut.model_at(len(FACTS) - 1, model=make_model("llama", len(tok))).state_dict()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-6, atol=0), k


def _strict(text: str) -> object:
    def refuse(name):
        raise ValueError(f"bare {name} in a run file")

    return json.loads(text, parse_constant=refuse)


def _assert_strict_json(path) -> None:
    _strict((path / "config.json").read_text())
    for table in path.glob("*.jsonl"):
        for line in table.read_text().splitlines():
            _strict(line)


def test_not_finite_values_are_written_as_null(tok, env_for, tmp_path):
    from collapsediag.runs.store import RunWriter

    w = RunWriter.create(tmp_path / "w", {"editor": "rome", "nested": {"a": [1.0, float("nan")], "b": np.inf}})
    w.append("evals", [{"edit_index": -1, "n_edits": 0, "retention": float("nan"), "perplexity": np.float32("inf"),
                        "efficacy": torch.tensor(float("-inf")), "seconds": 0.5}])
    w.append("layers", [{"edit_index": 0, "layer": 1, "condition": float("inf"), "weight_l1": 0.25}])
    w.append("edits", [{"edit_index": 0, "batch_index": 0, "batch_size": 1, "status": "ok",
                        "paraphrase_score": np.float64("nan"), "efficacy": True}])
    _assert_strict_json(tmp_path / "w")
    assert json.loads((tmp_path / "w" / "config.json").read_text())["nested"] == {"a": [1.0, None], "b": None}
    run = load_run(tmp_path / "w")
    for table, col in (("evals", "retention"), ("evals", "perplexity"), ("evals", "efficacy"),
                       ("layers", "condition"), ("edits", "paraphrase_score")):
        df = getattr(run, table)
        assert df[col].dtype == np.float64 and np.isnan(df[col].iloc[0]), (table, col)
    assert run.layers["weight_l1"].iloc[0] == 0.25 and run.evals["n_edits"].iloc[0] == 0

    # a real run: the baseline checkpoint has no earlier edits (retention NaN), no held-out texts (perplexity NaN)
    model = make_model("llama", len(tok))
    env = env_for(model, [1], tmp_path)
    s = EditSession(model, tok, get_editor("r-rome", HP), out=tmp_path / "run", stats=env.stats,
                    templates=env.templates, progress=False, eval_every=1, eval_texts=[],
                    generation_prompts=["The city"], generation_tokens=4)
    s.run(FACTS[:2], progress=False)
    _assert_strict_json(tmp_path / "run")
    evals = load_run(tmp_path / "run").evals
    assert evals["perplexity"].dtype == np.float64 and evals["perplexity"].isna().all()
    assert np.isnan(evals["retention"].iloc[0]) and evals["n_retention"].tolist() == [0, 1, 2]


def test_old_runs_with_bare_nan_still_load(tmp_path):
    from collapsediag.runs.store import RunWriter

    RunWriter.create(tmp_path, {"editor": "rome", "initial_weights": {"1": {"weight_l1": float("nan")}}})
    (tmp_path / "config.json").write_text('{"editor": "rome", "x": NaN}')
    (tmp_path / "evals.jsonl").write_text('{"edit_index": -1, "n_edits": 0, "retention": NaN, "perplexity": 3.5}\n'
                                          '{"edit_index": 0, "n_edits": 1, "retention": 1.0, "perplexity": Infinity}\n')
    run = load_run(tmp_path)
    assert np.isnan(run.config["x"])
    assert run.evals["retention"].dtype == np.float64 and np.isnan(run.evals["retention"].iloc[0])
    assert run.evals["perplexity"].tolist() == [3.5, np.inf] and run.evals["n_retention"].isna().all()


def test_atomic_write_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    from collapsediag.runs.store import atomic_write

    target = tmp_path / "study.json"
    atomic_write(target, "old text, longer than the new")
    atomic_write(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["study.json"]
