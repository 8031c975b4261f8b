"""Disabling-edit flags and forgetting phases on synthetic runs with known answers."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from collapsediag import load_run
from collapsediag.analysis import (change_point, departure, flag_disabling_edits, flag_scores, forgetting_phases,
                                   robust_z)
from collapsediag.errors import CollapseDiagError
from collapsediag.experiments.alone import confirm_disabling_edits
from collapsediag.runs.store import RunWriter

NORM_OUT, DEN_OUT, PPL_JUMP, ENT_DROP = {7, 19, 33}, {12, 27}, 25, 31


def synthetic_run(path, n=40, retention=None, seed=0):
    """A saved run with planted outliers (two layers, a checkpoint after every edit)."""
    rng = np.random.default_rng(seed)
    w = RunWriter.create(path, {"editor": "rome", "arch": {}, "initial_weights": {}})
    edits, layers, evals = [], [], []
    ppl, ent = 8.0, 5.5
    for i in range(n):
        edits.append({"edit_index": i, "batch_index": i, "batch_size": 1, "case_id": f"c{i}", "status": "ok",
                      "efficacy": True})
        for layer in (4, 5):
            norm = float(np.exp(rng.normal(3.0, 0.1))) * (12 if i in NORM_OUT else 1)
            den = float(rng.normal(3.0, 0.3)) * (0.1 if i in DEN_OUT and layer == 5 else 1)
            layers.append({"edit_index": i, "batch_index": i, "layer": layer, "delta_fro": norm,
                           "denominator": den})
        ppl *= 2.2 if i == PPL_JUMP else float(np.exp(rng.normal(0.003, 0.002)))
        ent -= 1.5 if i == ENT_DROP else float(rng.normal(0.0, 0.05))
        r = retention[i] if retention is not None else np.nan
        evals.append({"edit_index": i, "n_edits": i + 1, "perplexity": ppl, "generation_entropy": ent,
                      "retention": r})
    w.append("edits", edits)
    w.append("layers", layers)
    w.append("evals", evals)
    return load_run(path)


def test_robust_z_sees_through_outliers():
    z = robust_z([1, 1.1, 0.9, 1.05, 0.95, 50])
    assert z[-1] > 100 and np.all(np.abs(z[:-1]) < 2)
    assert robust_z([2, 2, 2, 3])[-1] == np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a signal the run lacks gives NaN z-scores without a numpy warning
        assert np.isnan(robust_z([np.nan, np.nan])).all()


def test_flags_find_every_planted_outlier_and_nothing_else(tmp_path):
    run = synthetic_run(tmp_path / "r")
    flags = flag_disabling_edits(run, denominator_ratio=0.25)
    by = {s: set(g["edit_index"]) for s, g in flags.groupby("signal")}
    assert by["update_norm"] == NORM_OUT
    assert by["denominator"] == DEN_OUT
    assert by["perplexity_jump"] == {PPL_JUMP}
    assert by["entropy_drop"] == {ENT_DROP}
    assert set(flags["signal"]) == {"update_norm", "denominator", "perplexity_jump", "entropy_drop"}
    assert (flags.loc[flags["signal"] == "update_norm", "layer"].value_counts() == 3).all()  # both layers
    assert flags.loc[flags["edit_index"] == 12, "case_id"].iloc[0] == "c12"
    assert (flags.loc[flags["signal"] == "perplexity_jump", "first_edit"] == PPL_JUMP).all()
    stricter = flag_disabling_edits(run, norm_z=1e9, denominator_ratio=0.0, perplexity_ratio=1e9, entropy_drop=1e9,
                                    key_ratio=-1e9, update_ratio=1e9)
    assert stricter.empty


def test_flag_scores_precision_and_recall():
    flags = pd.DataFrame({"edit_index": [1, 2, 3, 5], "signal": ["denominator", "denominator", "update_norm",
                                                                  "update_norm"]})
    confirmed = pd.DataFrame({"edit_index": [1, 2, 3, 4], "disabling": [True, False, True, True]})
    s = flag_scores(flags, confirmed).set_index("signal")
    assert s.loc["denominator", "precision"] == 0.5 and s.loc["denominator", "recall"] == pytest.approx(1 / 3)
    assert s.loc["update_norm", "flagged"] == 1 and s.loc["update_norm", "precision"] == 1.0  # edit 5 not checked
    assert s.loc["any", "recall"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("onset", [18, 30, 41])
def test_change_point_recovers_a_known_onset(tmp_path, onset):
    rng = np.random.default_rng(onset)
    i = np.arange(60)
    ret = np.where(i < onset, 1 - 0.003 * i, 1 - 0.003 * onset - 0.02 * (i - onset)) + rng.normal(0, 0.01, 60)
    k, gain = change_point(i, ret)
    assert abs(k - onset) <= 2 and gain > 0.5
    phases = forgetting_phases(synthetic_run(tmp_path / "r", n=60, retention=ret))
    assert abs(phases["onset"] - onset) <= 2 and phases["catastrophic"]
    assert phases["gradual_slope"] == pytest.approx(-0.003, abs=0.002)
    assert phases["catastrophic_slope"] == pytest.approx(-0.02, abs=0.005)


def test_gradual_forgetting_alone_is_not_catastrophic(tmp_path):
    ret = 1 - 0.004 * np.arange(40)
    phases = forgetting_phases(synthetic_run(tmp_path / "r", retention=ret))
    assert not phases["catastrophic"] and phases["gradual_slope"] == pytest.approx(-0.004, abs=1e-3)


def test_confirmation_applies_one_edit_alone(tiny, env_for, tmp_path):
    from collapsediag import EditSession, get_editor
    from tests.conftest import corpus_texts, make_model

    model, tok = tiny
    env = env_for(model, [1], tmp_path)
    s = EditSession(model, tok, get_editor("rome", {"layer": 1, "v_num_grad_steps": 3}), out=tmp_path / "run",
                    stats=env.stats, templates=env.templates, progress=False)
    s.run([{"subject": "Paris", "prompt": "{} is located in", "target_new": "Japan", "target_true": "Spain"},
           {"subject": "Tokyo", "prompt": "{} plays the", "target_new": "piano", "target_true": "guitar"}],
          progress=False)
    base = make_model(model.config.model_type, len(tok))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    conf = confirm_disabling_edits(load_run(tmp_path / "run"), [0, 1], base, tok, corpus_texts(5),
                                   perplexity_ratio=1.0)
    assert conf["edit_index"].tolist() == [0, 1] and (conf["perplexity_alone"] != conf["perplexity_base"]).all()
    assert conf["disabling"].tolist() == (conf["ratio"] > 1.0).tolist()
    assert all(np.array_equal(v, before[k]) for k, v in base.state_dict().items())
    from collapsediag.errors import CollapseDiagError
    with pytest.raises(CollapseDiagError, match="fingerprint"):
        confirm_disabling_edits(load_run(tmp_path / "run"), [0], model, tok, corpus_texts(2))


def rome_like_run(path, planted=None, n=30, checkpoints=True, seed=1, missed=(4,)):
    """A sequential ROME-like run: one layer with k_uᵀu, k̄ᵀu and update_ratio per edit; edit ``planted`` (if any)
    has a tiny k_uᵀu and an update several times the matrix's norm, and perplexity ×6 right after it; the edits
    after it go on as usual. The edits in ``missed`` did not take on the bare prompt."""
    rng = np.random.default_rng(seed)
    w = RunWriter.create(path, {"editor": "rome", "arch": {}, "initial_weights": {}})
    edits, layers, evals = [], [], []
    ppl = 8.0
    if checkpoints:
        evals.append({"edit_index": -1, "n_edits": 0, "perplexity": ppl})
    for i in range(n):
        bad = i == planted
        edits.append({"edit_index": i, "batch_index": i, "batch_size": 1, "case_id": f"c{i}", "status": "ok",
                      "efficacy": i not in missed, "subject": f"s{i}", "subject_first_token": bad,
                      "p_new_after": 0.1 if i in missed else 0.6, "p_true_after": 0.3 if i in missed else 0.1})
        k_bar_u = float(rng.normal(3.0, 0.3))
        k_u_u = 0.01 if bad else k_bar_u * float(rng.uniform(0.6, 1.1))
        layers.append({"edit_index": i, "batch_index": i, "layer": 5, "denominator": k_u_u,
                       "denominator_consistent": k_bar_u, "key_cosine": 0.3 if bad else 0.8,
                       "delta_fro": 900.0 if bad else float(np.exp(rng.normal(3.0, 0.2))),
                       "update_ratio": 5.0 if bad else float(rng.uniform(0.05, 0.3))})
        ppl *= 6.0 if bad else float(np.exp(rng.normal(0.003, 0.002)))
        if checkpoints:
            evals.append({"edit_index": i, "n_edits": i + 1, "perplexity": ppl})
    w.append("edits", edits)
    w.append("layers", layers)
    w.append("evals", evals)
    return load_run(path)


@pytest.mark.parametrize("checkpoints", [True, False])
def test_flags_fire_on_one_planted_disabling_edit_and_stay_silent_without(tmp_path, checkpoints):
    run = rome_like_run(tmp_path / "bad", planted=11, checkpoints=checkpoints)
    flags = flag_disabling_edits(run)
    assert set(flags["edit_index"]) == {11}  # later edits follow it and are not flagged
    expected = {"key_mismatch", "update_size", "update_norm", "denominator"}
    assert set(flags["signal"]) == expected | ({"perplexity_jump"} if checkpoints else set())
    clean = flag_disabling_edits(rome_like_run(tmp_path / "clean", planted=None, checkpoints=checkpoints))
    assert clean.empty


def test_disabling_edits_name_the_edit_its_signals_and_geometry(tmp_path):
    from collapsediag.analysis import disabling_edits

    run = rome_like_run(tmp_path / "r", planted=11)
    d = disabling_edits(run)
    assert d["edit_index"].tolist() == [11] and d["case_id"].iloc[0] == "c11"
    assert d["perplexity_ratio"].iloc[0] == pytest.approx(6.0, rel=0.01)
    assert "key_mismatch" in d["signals"].iloc[0] and "update_size" in d["signals"].iloc[0]
    assert d["denominator"].iloc[0] == pytest.approx(0.01) and bool(d["subject_first_token"].iloc[0])
    assert disabling_edits(rome_like_run(tmp_path / "c", planted=None)).empty
    assert disabling_edits(rome_like_run(tmp_path / "n", planted=11, checkpoints=False)).empty


def test_edits_not_taken_and_the_report_explain_them(tmp_path):
    from collapsediag.analysis import edits_not_taken
    from collapsediag.analysis.report import explain, format_report

    run = rome_like_run(tmp_path / "r", planted=11)
    miss = edits_not_taken(run)
    assert miss["edit_index"].tolist() == [4] and miss["p_new_after"].iloc[0] == pytest.approx(0.1)
    lines = explain(run)
    assert any("edit 11 (c11" in x and "x6.0" in x and "key_mismatch" in x and "first token" in x for x in lines)
    assert any("edit 4 (c4) did not take on the bare prompt" in x for x in lines)
    text = format_report([run])
    assert "Disabling edits and edits that did not take" in text and "edit 11 (c11" in text
    # a disabling edit that did not take either is told once, as disabling
    both = explain(rome_like_run(tmp_path / "both", planted=11, missed=(4, 11)))
    assert sum("(c11" in x for x in both) == 1
    assert any("edit 11 (c11" in x and "disabled the model" in x and "did not take" in x for x in both)


def test_departure_finds_where_a_series_leaves_its_trend_for_good():
    x = np.arange(10.0)
    y = np.where(x < 6, 1 - 0.01 * x, 0.5)
    assert departure(x, y, margin=0.1) == 6
    assert departure(x, 1 - 0.01 * x, margin=0.1) is None
    blip = 1 - 0.01 * x
    blip[5] = 0.5  # one low checkpoint that recovers is no departure
    assert departure(x, blip, margin=0.1) is None
    last = 1 - 0.01 * x
    last[-1] = 0.5  # nor is one low last point
    assert departure(x, last, margin=0.1) is None
    with pytest.raises(CollapseDiagError, match="min_size"):
        departure(x, y, margin=0.1, min_size=1)


def test_a_collapse_that_levels_off_is_catastrophic_at_its_step(tmp_path):
    """Retention holds, falls in two steps, then sits on a plateau: the two-segment fit puts its break on the
    plateau (a flat second segment), the step rule puts the onset at the first fallen checkpoint."""
    rng = np.random.default_rng(3)
    ret = np.r_[1 - 0.001 * np.arange(24), 0.82, 0.6, 0.63 + rng.normal(0, 0.01, 14)]
    phases = forgetting_phases(synthetic_run(tmp_path / "r", retention=ret))
    assert phases["catastrophic"] and phases["shape"] == "step" and phases["onset"] == 24
    assert phases["gradual_slope"] == pytest.approx(-0.001, abs=5e-4) and phases["catastrophic_slope"] < -0.05
    flat = np.r_[1 - 0.001 * np.arange(24), 0.95 + rng.normal(0, 0.01, 16)]  # a small step is no collapse
    assert not forgetting_phases(synthetic_run(tmp_path / "f", retention=flat))["catastrophic"]


def test_flags_show_the_number_compared_with_each_threshold(tmp_path):
    from collapsediag.analysis import FLAG_COMPARED
    from collapsediag.analysis.report import format_report

    flags = flag_disabling_edits(rome_like_run(tmp_path / "r", planted=11))
    norm = flags[flags["signal"] == "update_norm"]
    assert (norm["value"] == 900.0).all() and (norm["compared"] > norm["threshold"]).all()  # z, not ‖ΔW‖_F
    assert (norm["compared"] == norm["score"]).all() and (norm["compared"] < 100).all()
    rest = flags[flags["signal"] != "update_norm"]
    assert (rest["compared"] == rest["value"]).all() and set(flags["signal"]) <= set(FLAG_COMPARED)
    text = format_report([load_run(tmp_path / "r")], fmt="markdown")
    assert "| value | compared | threshold |" in text and "robust z of log ‖ΔW‖_F" in text
