"""Finding (iii)'s two arms on a tiny model: independent batches from W₀, accumulating batches, shared targets."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from collapsediag.errors import CollapseDiagError
from collapsediag.experiments.batchsize import Setup, arm_table, batch_arms, finding_iii, layer_sweep, ordering
from collapsediag.stats import StatsCache, TextCorpus
from tests.conftest import OBJECTS, corpus_texts, make_model
from tests.test_plots import RECORDS

N = 8
EIGHT = RECORDS + [dict(r, case_id=100 + i, target_new=OBJECTS[i + 6]) for i, r in enumerate(RECORDS)]


def _setup(tmp_path, layers=(1,)):
    return Setup("memit", list(layers), {"z_num_grad_steps": 2, "mom2_update_weight": 1.0},
                 cache=StatsCache(tmp_path / "c"), corpus=TextCorpus.from_texts(corpus_texts(300)), stats_tokens=4000)


def test_orderings_are_fixed_permutations_of_the_same_records():
    assert ordering(5, 0).tolist() == [0, 1, 2, 3, 4]
    assert sorted(ordering(50, 1)) == list(range(50)) and ordering(50, 1).tolist() == ordering(50, 1).tolist()
    assert ordering(50, 1).tolist() != ordering(50, 2).tolist()


def test_both_arms_share_w0_targets_and_score_as_the_seed(tok, tmp_path):
    model = make_model("llama", len(tok))
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    runs = batch_arms(model, tok, EIGHT, tmp_path / "iii", _setup(tmp_path), n=N, batch_sizes=(2, 8),
                      orderings=(0, 1), arms=("A",))
    assert all(torch.equal(w0[k], v) for k, v in model.state_dict().items())  # arm A undoes every batch
    # every batch of arm A, in both orderings and at both sizes, started from W₀: N targets optimised, no more
    assert len(list((tmp_path / "iii" / "targets").glob("*.pt"))) == N
    a2 = runs["order1/armA-b2"]
    assert a2.made_alone and len(a2.edits) == N and a2.edits["batch_index"].max() == N // 2 - 1
    assert a2.edits["case_id"].tolist() == [str(EIGHT[i]["case_id"]) for i in ordering(N, 1)]
    runs = batch_arms(model, tok, EIGHT, tmp_path / "iii", _setup(tmp_path), n=N, batch_sizes=(2, 8),
                      orderings=(0, 1), arms=("A", "B"))
    assert all(torch.equal(w0[k], v) for k, v in model.state_dict().items())  # arm B puts W₀ back too
    assert runs["order0/armB-b8"] is runs["order0/armA-b8"]  # one batch of N is the same run in both arms
    b2 = runs["order0/armB-b2"]
    assert not b2.made_alone and b2.edits["batch_index"].max() == N // 2 - 1
    end = b2.evals[b2.evals["edit_index"] == N - 1]
    assert len(end) == 1 and int(end["n_retention"].iloc[0]) == N  # all N re-tested at the end
    t = arm_table(runs)
    assert set(t["arm"]) == {"A", "B"} and set(t["batch_size"]) == {2, 8} and (t["edits"] == N).all()
    assert t.loc[t["arm"] == "A", "neighborhood_score_end"].isna().all()
    assert t.loc[(t["arm"] == "B") & (t["batch_size"] == 2), "neighborhood_score_end"].notna().all()
    verdict = finding_iii(t, N)
    assert set(verdict["arm_a"]) == {2, 8} and verdict["arm_a"][2]["count"] == 2  # two orderings
    assert verdict["reproduced"] in (True, False) and verdict["reproduced_after_batch"] in (True, False)
    assert set(verdict["arm_b_after_batch"]) == {2, 8} and verdict["partial"] is False
    assert finding_iii(t, N, (2, 4, 8))["partial"] is True  # B = 4 has no run yet
    assert finding_iii(t[t["arm"] == "A"], N)["reproduced"] is None  # no arm B: no verdict
    # a second call finds every run done and edits nothing
    before = {k: len(r.edits) for k, r in runs.items()}
    again = batch_arms(model, tok, EIGHT, tmp_path / "iii", _setup(tmp_path), n=N, batch_sizes=(2, 8),
                       orderings=(0, 1))
    assert {k: len(r.edits) for k, r in again.items()} == before


def test_batch_sizes_must_divide_n_and_records_must_suffice(tok, tmp_path):
    model = make_model("llama", len(tok))
    with pytest.raises(CollapseDiagError, match="do not divide"):
        batch_arms(model, tok, EIGHT, tmp_path / "x", _setup(tmp_path), n=N, batch_sizes=(3,))
    with pytest.raises(CollapseDiagError, match="needs 1000 records"):
        batch_arms(model, tok, EIGHT, tmp_path / "x", _setup(tmp_path), n=1000)


def test_layer_sweep_picks_the_best_scoring_layer(tok, tmp_path):
    model = make_model("llama", len(tok))
    table, best = layer_sweep(model, tok, EIGHT, tmp_path / "sweep", _setup(tmp_path), [0, 1, 2], n=4)
    assert table["layer"].tolist() == [0, 1, 2] and best in (0, 1, 2)
    assert table.loc[table["layer"] == best, "score"].iloc[0] == table["score"].max()


def test_a_layer_sweep_where_nothing_scored_says_so(tok, tmp_path, monkeypatch):
    import collapsediag.experiments.batchsize as bs

    nan = pd.DataFrame([{f"{k}_after_batch": float("nan") for k in bs.SCORES}])
    monkeypatch.setattr(bs, "arm_table", lambda runs: nan)
    with pytest.raises(CollapseDiagError, match="no layer of \\[0, 1\\] scored"):
        layer_sweep(make_model("llama", len(tok)), tok, EIGHT, tmp_path / "sweep", _setup(tmp_path), [0, 1], n=2)
