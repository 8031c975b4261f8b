"""Trend warnings fitted on some runs and scored on others, with the ‖W‖ and energy anchors, on synthetic runs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from collapsediag.analysis.trend import (FAMILIES, TOO_FEW, cross_fit, first_warning, fit_thresholds, onset_and_healthy,
                                         run_onset, score_warnings, signal_table)
from tests.test_early_warning import norm_run


def test_signal_table_holds_every_family_signal(tmp_path):
    run = norm_run(tmp_path / "r", growth=0.01, n=60)
    t = signal_table(run)
    assert set(s for f in FAMILIES.values() for s in f) <= set(t.columns)
    assert t.index.tolist() == list(range(60))
    # no initial weights in the config: ‖W‖ growth is relative to the first row (σ₁ grows as e^{0.01 t})
    assert t["weight_norm_growth"].iloc[-1] == pytest.approx(np.exp(0.01 * 59), rel=0.02)
    assert t["energy_drift"].isna().all()
    energy = pd.DataFrame({"edit_index": [10, 10, 20], "layer": [3, 4, 3], "weight_energy_ratio": [1.1, 0.7, 1.0]})
    t = signal_table(run, energy)
    assert t.loc[10, "energy_drift"] == pytest.approx(0.3) and t.loc[20, "energy_drift"] == pytest.approx(0.0)


def test_onset_and_too_few_checkpoints(tmp_path):
    assert isinstance(run_onset(norm_run(tmp_path / "c", growth=0.02, onset=89)), int)
    assert run_onset(norm_run(tmp_path / "f", growth=0.0)) is None
    assert run_onset(norm_run(tmp_path / "s", growth=0.0, n=40)) == TOO_FEW


def test_thresholds_fitted_on_some_runs_warn_on_others_in_time(tmp_path):
    fit = [norm_run(tmp_path / "fit-collapse", growth=0.02, onset=89, seed=0),
           norm_run(tmp_path / "fit-calm", growth=0.002, seed=1)]
    held = [norm_run(tmp_path / "held-collapse", growth=0.02, onset=89, seed=2),
            norm_run(tmp_path / "held-calm", growth=0.002, seed=3)]
    th = fit_thresholds(fit)
    calm = signal_table(fit[1])
    for name in ("weight_sigma1_ratio", "weight_norm_growth"):
        assert th[name] >= calm[name].max()  # no false alarm on the fit runs
    scores = score_warnings(held, th).set_index(["run", "family"])
    hit = scores.loc[(str(held[0].path), "collapsediag")]
    assert hit["verdict"] == "in time" and hit["lead"] > 0 and hit["onset"] == run_onset(held[0])
    assert scores.loc[(str(held[1].path), "collapsediag"), "verdict"] in ("quiet", "false alarm")
    assert scores.loc[(str(held[0].path), "energy"), "verdict"] == "missed"  # no energy recorded: it cannot warn


def test_a_calm_fit_set_sets_the_ceiling_and_a_spike_on_held_out_runs_is_a_false_alarm(tmp_path):
    th = fit_thresholds([norm_run(tmp_path / "calm", growth=0.0)])
    spike = norm_run(tmp_path / "spike", growth=0.0, spike=50, seed=4)
    row = score_warnings([spike], th).set_index("family").loc["collapsediag"]
    assert row["verdict"] == "false alarm" and row["first_warning"] == 50 and row["signal"] == "update_ratio"


def test_first_warning_is_the_earliest_signal():
    t = pd.DataFrame({"a": [0.0, 0.0, 5.0, 5.0], "b": [0.0, 3.0, 3.0, 3.0]}, index=[0, 1, 2, 3])
    assert first_warning(t, {"a": 1.0, "b": 1.0}, ("a", "b")) == (1, "b")
    assert first_warning(t, {"a": 1.0, "b": float("nan")}, ("a", "b")) == (2, "a")
    assert first_warning(t, {"a": 9.0}, ("a", "b")) == (None, None)


def test_cross_fit_never_scores_a_run_with_its_own_thresholds(tmp_path):
    groups = {"A": [norm_run(tmp_path / "a1", growth=0.02, onset=89), norm_run(tmp_path / "a2", growth=0.0)],
              "B": [norm_run(tmp_path / "b1", growth=0.02, onset=89, seed=5),
                    norm_run(tmp_path / "b2", growth=0.0, seed=6)]}
    scores, fitted = cross_fit(groups)
    assert set(fitted) == {"A", "B"}
    own = {str(r.path): g for g, rs in groups.items() for r in rs}
    assert all(own[run] != fit for run, fit in zip(scores["run"], scores["fitted_on"]))
    assert len(scores) == 4 * len(FAMILIES)
    with pytest.raises(ValueError, match="two groups"):
        cross_fit({"A": groups["A"]})


def test_a_warning_at_the_onset_itself_is_late_and_the_fit_stops_at_the_last_healthy_checkpoint(tmp_path):
    run = norm_run(tmp_path / "c", growth=0.0, onset=89, spike=90)  # the only signal jumps on the onset's edits
    onset, healthy = onset_and_healthy(run)
    assert isinstance(onset, int) and healthy < onset and healthy % 10 == 9  # a checkpoint before the onset
    row = score_warnings([run], {"update_ratio": 1.0}, onsets={str(run.path): (90, 89)}).set_index("family")
    hit = row.loc["collapsediag"]
    assert hit["first_warning"] == 90 and hit["lead"] == 0 and hit["lead_healthy"] == -1 and hit["verdict"] == "late"
    early = norm_run(tmp_path / "e", growth=0.0, onset=89, spike=60, seed=1)
    hit = score_warnings([early], {"update_ratio": 1.0}, onsets={str(early.path): (90, 89)}).set_index("family")
    assert hit.loc["collapsediag", "verdict"] == "in time" and hit.loc["collapsediag", "lead_healthy"] == 29
    # fitting reads a collapsing run only up to its last healthy edit: the spike at 90 sets no threshold
    th = fit_thresholds([run], onsets={str(run.path): (90, 89)})
    assert th["update_ratio"] < 1.0


def test_a_threshold_below_a_non_positive_peak_still_warns():
    t = pd.DataFrame({"a": [-2.0, -0.5, -1.0]}, index=[0, 1, 2])
    th = float(np.nextafter(-0.5, -np.inf))
    assert first_warning(t, {"a": th}, ("a",)) == (1, "a")


def test_cross_fit_refuses_groups_that_share_a_run(tmp_path):
    shared = norm_run(tmp_path / "s", growth=0.0)
    with pytest.raises(ValueError, match="share a run"):
        cross_fit({"A": [shared], "B": [shared, norm_run(tmp_path / "t", growth=0.0, seed=1)]})
