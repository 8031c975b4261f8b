"""What keeps long runs flat in cost: seeded retention samples and weight snapshots for model_at."""
from __future__ import annotations

import shutil

import pytest
import torch

from collapsediag import load_run
from collapsediag.runs.checkpoints import retention_sample
from collapsediag.runs.store import Run
from tests.conftest import make_model
from tests.test_durable import FACTS, _session


def test_retention_sample_is_seeded_bounded_and_keeps_every_recent_edit():
    done = list(range(0, 1000, 2))  # 500 successful edits
    tested, recent = retention_sample(done, since=899, sample=50, seed=3, checkpoint=999)
    assert recent == {i for i in done if i > 899} and recent <= set(tested)
    assert len(tested) == len(recent) + 50 and tested == sorted(tested)
    assert retention_sample(done, 899, 50, 3, 999) == (tested, recent)  # reproducible (resume draws the same)
    assert retention_sample(done, 899, 50, 4, 999)[0] != tested  # another seed, another sample
    assert retention_sample(done, 899, 50, 3, 1099)[0] != tested  # another checkpoint, another sample
    assert retention_sample(done, 899, 0, 3, 999)[0] == done  # 0 = every earlier edit
    assert retention_sample(done, 899, 10_000, 3, 999)[0] == done
    with pytest.raises(ValueError):
        retention_sample(done, 899, -1, 3, 999)


def test_checkpoints_test_recent_edits_and_a_bounded_sample(tok, env_for, tmp_path):
    s = _session(make_model("llama", len(tok)), tok, env_for, tmp_path, eval_every=2, retention_sample=1)
    s.run(FACTS, progress=False)
    run = load_run(tmp_path / "run")
    checkpoints = run.evals["edit_index"].astype(int).tolist()
    assert checkpoints == [-1, 1, 3, 5, 6]
    for prev, c in zip(checkpoints, checkpoints[1:]):
        rows = run.retention[run.retention["checkpoint"] == c]
        assert rows.loc[rows["recent"].astype(bool), "edit_index"].tolist() == list(range(prev + 1, c + 1))
        assert (~rows["recent"].astype(bool)).sum() == min(1, prev + 1)
    assert (run.evals["n_done"].dropna().astype(int) == run.evals["n_edits"].dropna().astype(int)).iloc[1:].all()


def test_model_at_starts_from_the_nearest_snapshot(tok, env_for, tmp_path):
    s = _session(make_model("gpt2", len(tok)), tok, env_for, tmp_path, snapshot_every=2)
    live = []
    for rec in FACTS[:5]:
        s.edit(rec)
        live.append({k: v.clone() for k, v in s.model.state_dict().items()})
    run = load_run(tmp_path / "run")
    assert run.snapshots() == [1, 3]
    assert run.snapshot_file(3).exists() and not run.snapshot_file(2).exists()
    assert run.factors_file(4).name == "batch_000004.npz" and run.factors_file(5) is None
    plain = tmp_path / "plain"
    shutil.copytree(tmp_path / "run", plain)
    shutil.rmtree(plain / "snapshots")
    for i in range(5):
        fast = run.model_at(i, model=make_model("gpt2", len(tok))).state_dict()
        slow = Run(plain).model_at(i, model=make_model("gpt2", len(tok))).state_dict()
        for k in fast:
            assert torch.equal(fast[k], slow[k]), (i, k)  # the snapshot holds exactly the replayed weights
            assert torch.allclose(fast[k], live[i][k], rtol=1e-6, atol=0), (i, k)


def test_a_snapshot_is_not_used_past_the_edit_asked_for(tok, env_for, tmp_path, monkeypatch):
    s = _session(make_model("gpt2", len(tok)), tok, env_for, tmp_path, snapshot_every=2)
    s.run(FACTS[:4], progress=False)
    run = load_run(tmp_path / "run")
    used = []
    real = Run.snapshot
    monkeypatch.setattr(Run, "snapshot", lambda self, i: used.append(i) or real(self, i))
    run.model_at(0, model=make_model("gpt2", len(tok)))
    run.model_at(2, model=make_model("gpt2", len(tok)))
    assert used == [1]
