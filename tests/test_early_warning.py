"""Early warning on synthetic runs with known answers: exponential norm growth warns, a flat run does not."""
from __future__ import annotations

import numpy as np
import pytest

from collapsediag import load_run
from collapsediag.analysis import WARNING_THRESHOLDS, early_warning, warning_lead, warning_signals
from collapsediag.runs.store import RunWriter


def norm_run(path, growth: float, n: int = 120, onset: int | None = None, seed: int = 0, spike: int | None = None):
    """Sequential run, layers 3 and 4: σ₁(W) = σ₀ e^{growth·t} (× noise), v* ratio growing with it; retention
    falls steeply after ``onset`` (checkpoints every 10 edits)."""
    rng = np.random.default_rng(seed)
    w = RunWriter.create(path, {"editor": "memit", "arch": {}, "initial_weights": {}})
    edits, layers, evals = [], [], []
    for i in range(n):
        edits.append({"edit_index": i, "batch_index": i, "batch_size": 1, "case_id": f"c{i}", "status": "ok",
                      "efficacy": True})
        for layer in (3, 4):
            s1 = 10.0 * np.exp(growth * i) * float(np.exp(rng.normal(0, 0.002)))
            layers.append({"edit_index": i, "batch_index": i, "layer": layer, "weight_sigma1": s1,
                           "weight_sigma1_ratio": s1 / 10.0, "weight_fro": 3 * s1,
                           "v_star_ratio": 1.3 * np.exp(growth * i) * float(np.exp(rng.normal(0, 0.01))),
                           "update_ratio": 10.0 if i == spike else 0.01})
        if i % 10 == 9:
            ret = 1.0 - 0.001 * i if onset is None or i < onset else max(0.0, 1.0 - 0.001 * onset - 0.02 * (i - onset))
            evals.append({"edit_index": i, "n_edits": i + 1, "retention": ret, "perplexity": 8.0})
    for table, rows in (("edits", edits), ("layers", layers), ("evals", evals)):
        w.append(table, rows)
    return load_run(path)


def test_early_warning_fires_on_exponential_norm_growth(tmp_path):
    run = norm_run(tmp_path / "exp", growth=0.02, onset=89)
    warn = early_warning(run)
    assert list(warn.columns) == ["edit_index", "signal", "layer", "value", "threshold"]
    rate = warn[warn["signal"] == "sigma1_growth_rate"]
    assert set(rate["layer"]) == {3, 4} and rate["edit_index"].max() <= 15  # as soon as the trailing window fills
    ratio = warn[warn["signal"] == "weight_sigma1_ratio"]
    assert ratio["edit_index"].min() == int(np.ceil(np.log(1.5) / 0.02))  # σ₁ up by half at t = ln 1.5 / 0.02
    assert (warn["value"] >= warn["threshold"]).all()
    lead = warning_lead(run, warn)
    assert lead["catastrophic_onset"] is not None and lead["lead"] > 0 and not lead["false_alarm"]


def test_early_warning_is_silent_on_a_flat_run(tmp_path):
    run = norm_run(tmp_path / "flat", growth=0.0)
    assert early_warning(run).empty
    assert warning_lead(run)["first_warning"] is None


def test_a_single_large_update_warns_once(tmp_path):
    run = norm_run(tmp_path / "spike", growth=0.0, spike=50)
    warn = early_warning(run)
    assert warn[["edit_index", "signal"]].drop_duplicates().values.tolist() == [[50, "update_ratio"]]


def test_warning_signals_and_thresholds_can_be_changed(tmp_path):
    run = norm_run(tmp_path / "slow", growth=0.002)
    sig = warning_signals(run, window=20)
    assert sig["sigma1_growth_rate"][3].dropna().between(0.0015, 0.0025).all()
    assert early_warning(run).empty  # 0.2 % per edit is below the default rate
    assert not early_warning(run, {"sigma1_growth_rate": 0.001}).empty
    assert set(WARNING_THRESHOLDS) == {"weight_sigma1_ratio", "sigma1_growth_rate", "v_star_growth", "update_ratio"}


def test_report_shows_warnings_beside_the_forgetting_phases(tmp_path):
    from collapsediag.analysis.report import format_report

    text = format_report([norm_run(tmp_path / "exp", growth=0.02, onset=89)], fmt="markdown")
    phases = text.split("## Forgetting phases")[1].split("## Early warnings")[0]
    assert "first_warning" in phases and "lead" in phases and "false_alarm" in phases
    assert "sigma1_growth_rate" in text.split("## Early warnings")[1]


def test_collapse_warning_tells_the_warning_on_the_collapse_from_an_early_one(tmp_path):
    run = norm_run(tmp_path / "two", growth=0.0, onset=89, spike=85)  # a huge update just before the drop
    warn = early_warning(run, {"weight_sigma1_ratio": 0.5})  # fires at edit 0, long before anything happens
    assert warn[["edit_index", "signal"]].drop_duplicates().values.tolist() == \
        [[0, "weight_sigma1_ratio"], [85, "update_ratio"]]
    lead = warning_lead(run, warn)
    assert (lead["catastrophic_onset"], lead["last_gradual"]) == (89, 79)  # steep from 89, gradual up to 79
    assert lead["lead"] == 89 and lead["first_signal"] == "weight_sigma1_ratio"
    assert (lead["collapse_warning"], lead["collapse_signal"], lead["collapse_lead"]) == (85, "update_ratio", 4)
    assert not lead["false_alarm"]
    late = warning_lead(norm_run(tmp_path / "late", growth=0.0, onset=89, spike=93))
    assert late["collapse_warning"] == 93 and late["collapse_lead"] == -4  # after the onset checkpoint
    flat = warning_lead(norm_run(tmp_path / "flat", growth=0.0, spike=80))
    assert flat["false_alarm"] and flat["collapse_warning"] is None and flat["catastrophic_onset"] is None


def test_the_study_finding_on_warnings_names_leads_and_false_alarms(tmp_path):
    from collapsediag.experiments.studyreport import _warning_finding

    seq = {"rome": norm_run(tmp_path / "rome", growth=0.0, onset=89, spike=85),
           "memit": norm_run(tmp_path / "memit", growth=0.0, spike=30),
           "encore": norm_run(tmp_path / "encore", growth=0.0)}
    row = _warning_finding(seq)
    assert row["reproduced"] is True
    assert ("rome: steep from checkpoint 89 (gradual up to 79); first warning after 79 at edit 85 "
            "(update_ratio, 4 edits before the onset checkpoint)") in row["evidence"]
    assert "false alarms (warned, never catastrophic): memit of 2 runs without an onset" in row["evidence"]
    seq["rome"] = norm_run(tmp_path / "silent", growth=0.0, onset=89)
    assert _warning_finding(seq)["reproduced"] is False


def test_disabling_table_names_the_largest_update_before_a_perplexity_jump(tmp_path):
    import pandas as pd

    from collapsediag.analysis import COLLAPSE_RATIO
    from collapsediag.runs.store import RunWriter
    from collapsediag.experiments.studyreport import DISABLING_COLUMNS, disabling_table

    run = norm_run(tmp_path / "jump", growth=0.0, spike=83)
    ev = run.evals.copy()
    ev.loc[ev["edit_index"] >= 89, "perplexity"] = 8.0 * COLLAPSE_RATIO * 1.5  # the model breaks in 80..89
    RunWriter(run.path).rewrite("evals", ev)
    table = disabling_table({"rome": load_run(run.path), "memit": norm_run(tmp_path / "calm", growth=0.0)})
    assert list(table.columns) == DISABLING_COLUMNS
    assert table[["editor", "edit_index", "first_edit"]].values.tolist() == [["rome", 83, 80]]
    assert table["perplexity_ratio"].iloc[0] == pytest.approx(COLLAPSE_RATIO * 1.5)
    assert disabling_table({}).empty and isinstance(disabling_table({}), pd.DataFrame)


def test_plot_warnings_marks_the_first_warning_the_collapse_warning_and_the_onset(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from collapsediag.plots import plot_warnings

    run = norm_run(tmp_path / "both", growth=0.02, onset=89, spike=85)
    (ax,) = plot_warnings(run)
    lines = {line.get_label(): line.get_xdata()[0] for line in ax.get_lines() if line.get_label()[0] != "_"}
    lead = warning_lead(run)
    assert lines == {f"first warning ({lead['first_signal']})": lead["first_warning"] + 1,
                     "warning in the collapse (update_ratio)": 86, "catastrophic onset": 90}


def test_collapse_phases_say_too_few_checkpoints_on_short_runs(tmp_path):
    from collapsediag.analysis import MIN_CHECKPOINTS, TOO_FEW, collapse_phases, forgetting_phases

    short = collapse_phases(norm_run(tmp_path / "short", growth=0.0, n=30, spike=12))  # 3 checkpoints
    assert short["checkpoints"] == 3 < MIN_CHECKPOINTS
    assert {short[k] for k in ("onset", "catastrophic", "lead", "collapse_lead", "false_alarm")} == {TOO_FEW}
    assert short["first_warning"] == 12 and short["first_signal"] == "update_ratio"  # the warning is still told
    long = norm_run(tmp_path / "long", growth=0.0, onset=89, spike=85)  # 12 checkpoints: a verdict
    got = collapse_phases(long)
    assert (got["onset"], got["catastrophic"], got["collapse_lead"]) == (89, True, 4)
    assert got["onset"] == forgetting_phases(long)["onset"] and got["lead"] == warning_lead(long)["lead"]
    assert collapse_phases(long, min_checkpoints=13)["onset"] == TOO_FEW


def test_a_disabling_edit_is_a_collapse_at_that_edit(tmp_path):
    from collapsediag.analysis import collapse_phases
    from tests.test_analysis import rome_like_run

    got = collapse_phases(rome_like_run(tmp_path / "r", planted=11))  # perplexity x6 right after edit 11
    assert (got["onset"], got["catastrophic"], got["shape"]) == (11, True, "disabling edit")
    assert (got["collapse_warning"], got["collapse_signal"], got["collapse_lead"]) == (11, "update_ratio", 0)
    assert got["last_gradual"] == 10 and got["false_alarm"] is False


def test_report_phases_table_and_its_notes(tmp_path):
    from collapsediag.analysis import RETENTION_NOTE, TOO_FEW
    from collapsediag.analysis.report import PHASE_COLUMNS, format_report, phases_table
    from tests.test_analysis import rome_like_run

    runs = [rome_like_run(tmp_path / "rome", planted=11), norm_run(tmp_path / "short", growth=0.0, n=30)]
    table = phases_table(runs)
    assert list(table.columns) == [c for c in PHASE_COLUMNS if c in table.columns]  # in PHASE_COLUMNS order
    assert table["onset"].tolist() == [11, TOO_FEW] and table["shape"].iloc[0] == "disabling edit"
    for fmt in ("text", "markdown"):
        text = " ".join(format_report(runs, fmt=fmt).split())
        assert RETENTION_NOTE in text and "too few checkpoints" in text


def test_plot_warnings_marks_a_disabling_edit_and_nothing_on_a_short_run(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from collapsediag.plots import plot_warnings
    from tests.test_analysis import rome_like_run

    rome = rome_like_run(tmp_path / "r", planted=11)
    RunWriter(rome.path).rewrite("evals", rome.evals.assign(retention=1.0))  # retention stays high as it breaks
    (ax,) = plot_warnings(load_run(rome.path))
    labels = {line.get_label(): line.get_xdata()[0] for line in ax.get_lines() if line.get_label()[0] != "_"}
    assert labels["disabling edit"] == 12  # edit 11: 12 edits applied
    (short,) = plot_warnings(norm_run(tmp_path / "short", growth=0.0, n=30, spike=12))
    assert [line.get_label() for line in short.get_lines() if line.get_label()[0] != "_"] == [
        "first warning (update_ratio)"]


def test_the_growth_rate_exists_for_batched_runs_whose_rows_are_a_batch_apart(tmp_path):
    w = RunWriter.create(tmp_path / "b", {"editor": "memit", "arch": {}, "initial_weights": {}})
    rows = [{"edit_index": e, "batch_index": b, "layer": 3, "weight_sigma1": 10.0 * np.exp(0.001 * e),
             "weight_sigma1_ratio": np.exp(0.001 * e), "weight_fro": 30.0, "v_star_ratio": 1.0, "update_ratio": 0.1}
            for b, e in enumerate(range(99, 1000, 100))]
    w.append("edits", [{"edit_index": e, "batch_index": e // 100, "batch_size": 100, "case_id": f"c{e}",
                        "status": "ok", "efficacy": True} for e in range(1000)])
    w.append("layers", rows)
    rate = warning_signals(load_run(tmp_path / "b"), window=20)["sigma1_growth_rate"][3]
    assert np.isnan(rate.iloc[0]) and rate.iloc[1:].notna().all()
    assert rate.iloc[1:].to_numpy() == pytest.approx(0.001, rel=1e-6)  # per edit, over the 100 edits between rows


def test_a_perplexity_jump_in_a_run_of_batches_is_a_collapse_at_its_checkpoint(tmp_path):
    from collapsediag.analysis import collapse_phases
    from tests.test_analysis import rome_like_run

    run = rome_like_run(tmp_path / "r", planted=11)
    cfg = dict(run.config, batch_size=4)
    RunWriter(run.path).write_config(cfg)
    got = collapse_phases(load_run(run.path))
    checks = run.evals["edit_index"]
    assert got["shape"] == "perplexity jump" and got["catastrophic"] is True
    assert got["onset"] == int(checks[checks >= 11].min())  # the checkpoint, not an edit picked by its update
