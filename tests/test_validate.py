"""Each edit alone on the unedited model: the ground truth the flags are scored against."""
from __future__ import annotations

import copy

import pytest
import torch

from collapsediag import EditSession, load_run
from collapsediag.errors import CollapseDiagError
from collapsediag.signals.fluency import perplexity
from collapsediag.experiments.alone import edit_each_alone
from tests.conftest import corpus_texts
from tests.test_scan import RECORDS


def test_each_edit_alone_measures_and_restores(tiny, env_for, tmp_path):
    model, tok = tiny
    env = env_for(model, [1], tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    df = edit_each_alone(model, tok, RECORDS[:2], ["rome", "r-rome"], corpus_texts(3), layer=1,
                         templates=env.templates, stats=env.stats, hparams={"v_num_grad_steps": 2},
                         out=tmp_path / "runs")
    assert df["editor"].tolist() == ["rome", "r-rome", "rome", "r-rome"]
    assert (df["status"] == "ok").all() and (df["ratio"] > 0).all()
    assert df["perplexity_base"].nunique() == 1
    assert not df["ratio"].eq(1.0).all()  # the edits do change the model while they are applied
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert (tmp_path / "runs" / "rome" / "edits.jsonl").exists() and (tmp_path / "runs" / "r-rome").exists()
    # model_at(i) of such a run is the unedited model with edit i alone: its perplexity is the one measured
    run = load_run(tmp_path / "runs" / "rome")
    assert run.made_alone
    for i, want in enumerate(df.loc[df["editor"] == "rome", "perplexity_alone"]):
        edited = run.model_at(i, model=copy.deepcopy(model))
        assert perplexity(edited, tok, corpus_texts(3)) == pytest.approx(want, rel=1e-5)
    with pytest.raises(CollapseDiagError, match="each made alone"):
        EditSession.resume(tmp_path / "runs" / "rome", copy.deepcopy(model), tok, RECORDS[:2])
