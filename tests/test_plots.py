"""Every figure on small saved runs (overlaid, with and without ``ax``), and the figures / report commands."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes

from collapsediag import EditSession, get_editor, load_run
from collapsediag import plots
from collapsediag.cli import main
from tests.conftest import corpus_texts
from tests.test_modes import FOUR


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tok):
    """A sequential ROME run and a sequential-batch MEMIT run on a tiny Llama, with checkpoints."""
    from collapsediag.arch import arch_for
    from collapsediag.stats import StatsCache, TextCorpus
    from tests.conftest import make_model

    root = tmp_path_factory.mktemp("runs")
    model = make_model("llama", len(tok))
    stats = StatsCache(root / "stats").get(model, tok, arch_for(model), [1, 2],
                                           TextCorpus.from_texts(corpus_texts(300)), n_tokens=6000, seq_len=32,
                                           progress=False)
    common = dict(stats=stats, templates=["{}", "The city of music. {}"], eval_every=2, eval_texts=corpus_texts(3),
                  generation_prompts=["The city"], generation_tokens=4, progress=False)
    s = EditSession(model, tok, get_editor("rome", {"layer": 1, "v_num_grad_steps": 3}), out=root / "rome",
                    config={"mode": "sequential", "batch_size": 1}, **common)
    s.run(RECORDS, progress=False)
    s.restore()
    s = EditSession(model, tok, get_editor("memit", {"layers": [1, 2], "z_num_grad_steps": 3}), out=root / "memit",
                    config={"mode": "sequential-batch", "batch_size": 2}, **common)
    s.run(RECORDS, batch_size=2, progress=False)
    s.restore()
    _tiny.update(model=model, stats=stats)
    return [load_run(root / "rome"), load_run(root / "memit")]


_tiny: dict = {}


@pytest.fixture(scope="module")
def scanned(two_runs, tok):
    """A pre-edit risk scan of the records at layer 1 of the unedited tiny model."""
    from collapsediag.signals.scan import scan

    return scan(_tiny["model"], tok, RECORDS, 1, stats=_tiny["stats"], templates=["{}", "The city of music. {}"],
                progress=False)


RECORDS = [dict(r, paraphrase_prompts=["Because you said so. " + r["prompt"]],
                neighborhood_prompts=["Madrid is a citizen of", "The mother tongue of Lyon is"]) for r in FOUR]

PLOTS = [plots.plot_norm_growth, plots.plot_forgetting, plots.plot_denominator_vs_norm, plots.plot_key_stats,
         plots.plot_batch_neighborhood, plots.plot_perplexity, plots.plot_norm_comparison,
         plots.plot_norm_growth_by_family]
MULTI_PANEL = {plots.plot_forgetting, plots.plot_denominator_vs_norm, plots.plot_perplexity, plots.plot_norm_comparison,
               plots.plot_norm_growth_by_family}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _panels(drawn) -> list:
    return [drawn] if isinstance(drawn, Axes) else list(drawn)


def _data_lines(ax) -> list:
    """Lines that hold data (seaborn also parks its empty legend proxies in ``ax.lines``; reference lines
    such as y = 0 carry the gid "reference")."""
    return [line for line in ax.lines if len(line.get_xdata()) and line.get_gid() != "reference"]


def _offsets(ax, gid: str) -> np.ndarray:
    """Points of the scatter collections whose gid starts with ``gid``."""
    found = [c.get_offsets() for c in ax.collections if (c.get_gid() or "").startswith(gid)]
    return np.concatenate(found) if found else np.empty((0, 2))


def _scan_frame(dens, cosines=None, first=None) -> pd.DataFrame:
    """A scan table (``collapsediag.signals.scan`` columns) with these ROME denominators and one malformed record."""
    from collapsediag.signals.scan import _frame

    cosines = cosines or [0.1 + 0.8 * i / len(dens) for i in range(len(dens))]
    rows = [dict(record_index=i, case_id=f"own-case-{i}", status="ok", subject="s", prompt="{} p", target_new="t",
                 subject_first_token=(first[i] if first else i % 2 == 0), subject_last_position=0,
                 subject_last_piece="s", denominator=float(d), denominator_consistent=2.0,
                 denominator_ratio=float(d) / 2.0, key_cosine=float(c)) for i, (d, c) in enumerate(zip(dens, cosines))]
    rows.append(dict(record_index=len(dens), case_id="broken", status="CollapseDiagError: subject not in prompt"))
    df = _frame(rows)
    df.attrs = {"layer": 1, "editor": "rome"}
    return df


@pytest.mark.parametrize("fn", PLOTS, ids=lambda f: f.__name__)
def test_plot_functions_overlay_runs_with_and_without_ax(two_runs, fn):
    panels = _panels(fn(two_runs))
    assert all(a.get_ylabel() for a in panels) and panels[-1].get_xlabel()
    legends = [a.get_legend() for a in panels if a.get_legend() is not None]
    assert len(legends) >= 1
    assert max(len(leg.get_texts()) for leg in legends) >= 2 or fn is plots.plot_key_stats
    fig, given = plt.subplots()
    drawn = _panels(fn(two_runs, ax=given))
    assert drawn[0] is given and given.has_data()
    assert all(a.figure is fig for a in drawn)
    if fn in MULTI_PANEL:  # one Axes is split into the panels; a list of Axes is used as it is
        assert len(drawn) >= 2
        fig, grid = plt.subplots(1, len(drawn))
        assert _panels(fn(two_runs, ax=grid)) == list(grid)
    else:
        assert drawn == [given]
    assert fn(two_runs[0]) is not None  # one run alone


def test_edit_axes_show_integers(two_runs):
    from matplotlib.ticker import MaxNLocator

    axes = [plots.plot_norm_growth(two_runs), *plots.plot_forgetting(two_runs), *plots.plot_perplexity(two_runs)]
    for a in axes:
        loc = a.xaxis.get_major_locator()
        assert isinstance(loc, MaxNLocator) and loc._integer, a.get_ylabel()
        ticks = [t for t in a.get_xticks() if a.get_xlim()[0] <= t <= a.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)


def test_every_edit_axis_counts_edits_applied_from_0(two_runs):
    assert plots.edits_applied([-1, 0, 4]).tolist() == [0, 1, 5]
    rome = two_runs[0]
    axes = [plots.plot_norm_growth(two_runs), *plots.plot_forgetting(two_runs), *plots.plot_perplexity(two_runs),
            *plots.plot_spectral(two_runs), *plots.plot_norm_growth_by_family(two_runs)]
    for a in axes:
        assert a.get_xlim()[0] == 0 and a.get_xlabel() in ("edits applied", ""), a.get_ylabel()
    assert axes[-1].get_xlabel() == "edits applied"
    ppl = _data_lines(plots.plot_perplexity(two_runs)[0])[0]  # the unedited model's checkpoint at 0
    assert list(ppl.get_xdata()) == plots.edits_applied(rome.evals["edit_index"]).tolist() and ppl.get_xdata()[0] == 0
    ret = _data_lines(plots.plot_forgetting(two_runs)[0])[0]
    checkpoints = rome.evals["edit_index"][rome.evals["edit_index"] >= 0]
    assert list(ret.get_xdata()) == plots.edits_applied(checkpoints).tolist()


def test_norm_growth_by_family_gives_the_memit_family_its_own_scale(two_runs):
    rome, memit = two_runs
    assert [plots.editor_family(r) for r in two_runs] == ["ROME family", "MEMIT family"]
    top, bottom = plots.plot_norm_growth_by_family(two_runs)
    assert top.get_title(loc="left") == "ROME family: rome" and bottom.get_title(loc="left") == "MEMIT family: memit"
    assert len(_data_lines(top)) == 1 and len(_data_lines(bottom)) == 2  # memit's two layers
    lo, hi = bottom.get_ylim()
    ys = np.concatenate([line.get_ydata() for line in _data_lines(bottom)])
    assert lo <= ys.min() and ys.max() <= hi and (hi - lo) < 10 * np.ptp(ys) + 1e-12  # scaled to memit alone
    alone = _data_lines(plots.plot_norm_growth(two_runs))  # colours as in the one-panel figure
    assert _data_lines(top)[0].get_color() == alone[0].get_color()
    assert _data_lines(bottom)[0].get_color() == alone[1].get_color()
    assert len(plots.plot_norm_growth_by_family([memit])) == 1


def test_norm_growth_overlays_every_layer_of_every_run(two_runs):
    ax = plots.plot_norm_growth(two_runs)
    lines = _data_lines(ax)
    assert len(lines) == 3  # rome layer 1, memit layers 1 and 2
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["run", "rome, sequential", "memit, sequential-batch 2", "layer", "1", "2"]  # colour = run, style = layer
    assert lines[1].get_color() == lines[2].get_color() != lines[0].get_color()
    assert lines[1].get_linestyle() != lines[2].get_linestyle()
    assert list(lines[0].get_xdata()) == [1, 2, 3, 4]
    assert lines[0].get_ydata()[0] == pytest.approx(
        two_runs[0].layers["weight_l1"].iloc[0] / two_runs[0].config["initial_weights"]["1"]["weight_l1"])


def test_norm_comparison_draws_one_line_per_run_in_percent(two_runs):
    l1, s1 = plots.plot_norm_comparison(two_runs)
    assert len(_data_lines(l1)) == len(_data_lines(s1)) == 2  # layers folded: one line per run
    memit = two_runs[1]
    init = {int(k): v["weight_l1"] for k, v in memit.config["initial_weights"].items()}
    first = memit.layers[memit.layers["edit_index"] == memit.layers["edit_index"].min()]
    want = 100 * (np.mean([r.weight_l1 / init[int(r.layer)] for r in first.itertuples()]) - 1)
    assert _data_lines(l1)[1].get_ydata()[0] == pytest.approx(want)
    assert _data_lines(s1)[1].get_ydata()[0] == pytest.approx(100 * (first["weight_sigma1_ratio"].max() - 1))


def test_relative_growth_is_each_layer_over_its_unedited_value(two_runs):
    from collapsediag.analysis import relative_growth
    from collapsediag.analysis.growth import weight_l1_growth

    memit = two_runs[1]
    g = relative_growth(memit)
    assert len(g) == len(memit.layers.dropna(subset=["weight_l1"])) and set(g["layer"]) == {1, 2}
    row = g.iloc[-1]
    assert row["growth"] == pytest.approx(row["weight_l1"] / memit.config["initial_weights"][str(int(row["layer"]))]["weight_l1"] - 1)
    assert weight_l1_growth(memit).tolist() == g.groupby("edit_index")["growth"].max().tolist()


def test_run_colours_agree_across_figures(two_runs):
    ng = _data_lines(plots.plot_norm_growth(two_runs))
    ppl = _data_lines(plots.plot_perplexity(two_runs)[0])
    assert [ng[0].get_color(), ng[1].get_color()] == [ppl[0].get_color(), ppl[1].get_color()]


def test_rome_and_batched_denominators_never_share_an_axis(two_runs):
    rome, memit = two_runs
    axes = plots.plot_denominator_vs_norm(two_runs)
    assert len(axes) == 2
    assert "k_uᵀu" in axes[0].get_xlabel() and "λ_min" not in axes[0].get_xlabel()
    assert "λ_min" in axes[1].get_xlabel() and "KᵀA⁻¹K" in axes[1].get_xlabel() and "k_uᵀu" not in axes[1].get_xlabel()
    xs = [set(np.round(np.concatenate([c.get_offsets()[:, 0] for c in a.collections]), 12)) for a in axes]
    assert xs[0] == set(np.round(rome.layers["denominator"], 12))
    assert xs[1] == set(np.round(memit.layers["denominator"], 12))
    assert all("‖ΔW‖_F" in a.get_ylabel() for a in axes)
    # a family without data gets no panel
    only = plots.plot_denominator_vs_norm(memit)
    assert len(only) == 1 and "λ_min" in only[0].get_xlabel()
    only = plots.plot_denominator_vs_norm([rome])
    assert len(only) == 1 and "k_uᵀu" in only[0].get_xlabel()


def test_perplexity_and_entropy_have_their_own_panels(two_runs):
    ppl, ent = plots.plot_perplexity(two_runs)
    assert ppl.figure.axes == [ppl, ent]  # no twin axes
    assert "perplexity" in ppl.get_ylabel() and "entropy" in ent.get_ylabel()
    rome = two_runs[0].evals
    assert list(_data_lines(ppl)[0].get_ydata()) == pytest.approx(list(rome["perplexity"]))
    assert list(_data_lines(ent)[0].get_ydata()) == pytest.approx(list(rome["generation_entropy"]))
    assert len(plots.plot_perplexity(two_runs, entropy=False)) == 1


def test_forgetting_draws_one_panel_per_metric(two_runs):
    axes = plots.plot_forgetting(two_runs)
    assert [a.get_ylabel() for a in axes] == ["retention (share)", "efficacy (share)", "paraphrase score (share)",
                                             "neighborhood score (share)"]
    memit = two_runs[1].evals.dropna(subset=["retention"])
    assert list(_data_lines(axes[3])[1].get_ydata()) == pytest.approx(list(memit["neighborhood_score"]))


def test_perplexity_marks_flags(two_runs):
    rome = two_runs[0]
    case = dict(zip(rome.edits["edit_index"], rome.edits["case_id"].astype(str)))
    ppl_at = dict(zip(rome.evals["edit_index"], rome.evals["perplexity"]))
    assert 2 not in ppl_at  # edit 2 has no checkpoint: it is marked at the next one (after edit 3)
    flags = pd.DataFrame({"edit_index": [1, 2], "signal": ["denominator", "update_norm"]})
    ppl, ent = plots.plot_perplexity(rome, flags=flags)
    marked = _offsets(ppl, "flagged")
    assert sorted(map(tuple, marked)) == [(2, pytest.approx(ppl_at[1])), (4, pytest.approx(ppl_at[3]))]
    assert len(_offsets(ent, "flagged")) == 2  # the same edits ringed on the entropy panel
    texts = [t.get_text() for t in ppl.texts]
    assert f"edit 1: {case[1]}" in texts and f"edit 2: {case[2]}" in texts
    assert "flagged edit" in [t.get_text() for t in ppl.get_legend().get_texts()]
    assert not len(_offsets(ppl, "disabling"))
    # confirmed disabling edits (rows with disabling true) get a red X and say so
    confirmed = pd.DataFrame({"edit_index": [3, 1], "disabling": [True, False]})
    ppl = plots.plot_perplexity(two_runs, flags=[flags, None], disabling={rome.path.name: confirmed})[0]
    assert [tuple(p) for p in _offsets(ppl, "disabling")] == [(4, pytest.approx(ppl_at[3]))]
    assert any(f"edit 3: {case[3]} (disabling)" in t.get_text() for t in ppl.texts)
    assert len(_offsets(ppl, "flagged")) == 2


def test_risk_scan_draws_every_ok_record_and_marks_confirmed():
    df = _scan_frame([0.4, 2.0, 3.0, 50.0, 5.0])
    ax = plots.plot_risk_scan(df)
    points = ax.collections[0].get_offsets()
    ok = df[df["status"] == "ok"]
    assert len(points) == len(ok) == 5
    assert sorted(map(tuple, points)) == sorted(zip(ok["key_cosine"], ok["denominator"]))
    assert ax.get_yscale() == "log" and "log scale" in ax.get_ylabel() and "k_uᵀu" in ax.get_ylabel()
    assert "cos(k_u, k̄)" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["no", "yes"]  # subject-first by marker
    assert not len(_offsets(ax, "confirmed"))
    # a frame with a boolean disabling column: only the true rows are marked, labelled by case id
    ax = plots.plot_risk_scan(df, confirmed=pd.DataFrame({"case_id": ["own-case-0", "own-case-3"],
                                                          "disabling": [True, False]}))
    assert [tuple(p) for p in _offsets(ax, "confirmed")] == [(pytest.approx(0.1), 0.4)]
    assert [t.get_text() for t in ax.texts] == ["own-case-0"]
    assert "confirmed collapse" in [t.get_text() for t in ax.get_legend().get_texts()]
    # case ids and record indices; the malformed record is not drawn
    ax = plots.plot_risk_scan(df, confirmed={"own-case-1", 3, "broken"})
    assert len(_offsets(ax, "confirmed")) == 2 and sorted(t.get_text() for t in ax.texts) == ["own-case-1",
                                                                                              "own-case-3"]


def test_risk_scan_scales():
    narrow = plots.plot_risk_scan(_scan_frame([2.0, 3.0, 4.0]))
    assert narrow.get_yscale() == "linear" and "scale" not in narrow.get_ylabel()
    signed = plots.plot_risk_scan(_scan_frame([-3.0, 0.01, 2.0, 40.0]))
    assert signed.get_yscale() == "symlog" and "symlog" in signed.get_ylabel()
    assert len(signed.collections[0].get_offsets()) == 4
    # an r-ROME scan: its denominator column is k̄ᵀu; the figure still shows k_uᵀu
    df = _scan_frame([1.0, 2.0])
    df["denominator"] = df["denominator_consistent"]
    df.attrs["editor"] = "r-rome"
    ax = plots.plot_risk_scan(df)
    assert sorted(ax.collections[0].get_offsets()[:, 1]) == pytest.approx([1.0, 2.0])


def test_risk_scan_of_a_real_scan(scanned):
    ax = plots.plot_risk_scan(scanned, confirmed=set(scanned["case_id"][:1]))
    assert len(ax.collections[0].get_offsets()) == (scanned["status"] == "ok").sum() == len(RECORDS)
    assert len(_offsets(ax, "confirmed")) == 1 and ax.texts[0].get_text() == scanned["case_id"].iloc[0]


def test_batch_table(two_runs):
    t = plots.batch_table(two_runs)
    assert t["batch_size"].tolist() == [1, 2] and t["neighborhood_after_batch"].notna().all()


def test_figures_and_report_commands(two_runs, tmp_path, capsys):
    dirs = [str(r.path) for r in two_runs]
    assert main(["figures", *dirs, "--out", str(tmp_path / "fig")]) == 0
    names = {p.name for p in (tmp_path / "fig").iterdir()}
    for stem in ("norm_growth", "forgetting", "denominator_vs_norm", "key_stats", "batch_neighborhood", "perplexity"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    assert not any(n.startswith("risk_scan") for n in names)  # no scan given
    assert all((tmp_path / "fig" / n).stat().st_size > 1000 for n in names)
    capsys.readouterr()
    assert main(["report", *dirs, "--format", "markdown"]) == 0
    text = capsys.readouterr().out
    assert "## Summary" in text and "## Flagged edits" in text and "## Forgetting phases" in text
    assert "| run | editor | layer | edits |" in text and "| rome | rome | 1 | 4 |" in text
    assert main(["report", *dirs]) == 0
    assert "Summary" in capsys.readouterr().out


def test_write_figures_draws_a_given_scan(two_runs, tmp_path):
    written = plots.write_figures(two_runs[:1], tmp_path, scan=_scan_frame([0.5, 2.0, 9.0]), confirmed={"own-case-0"},
                                  disabling={two_runs[0].path.name: [3]})
    names = [p.name for p in written]
    assert {"risk_scan.png", "risk_scan.pdf", "perplexity.png"} <= set(names)
    assert all(p.stat().st_size > 1000 for p in written)
    assert [p.name for p in plots.write_figures([], tmp_path / "scan_only", scan=_scan_frame([1.0]))] == [
        "risk_scan.png", "risk_scan.pdf"]


def test_figures_are_byte_identical_when_redrawn(two_runs, tmp_path):
    scan = _scan_frame([0.5, 2.0, 9.0])
    a = plots.write_figures(two_runs, tmp_path / "a", scan=scan, confirmed={"own-case-0"})
    b = plots.write_figures(two_runs, tmp_path / "b", scan=scan, confirmed={"own-case-0"})
    assert [p.name for p in a] == [p.name for p in b] and "risk_scan.png" in [p.name for p in a]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name


def test_figures_command_prints_only_its_files(two_runs, tmp_path):
    import subprocess
    import sys

    dirs = [str(r.path) for r in two_runs]
    done = subprocess.run([sys.executable, "-m", "collapsediag", "figures", *dirs, "--out", str(tmp_path / "f")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = (done.stdout + done.stderr).splitlines()
    assert len(lines) == len(list((tmp_path / "f").iterdir())), lines[:20]


def test_risk_scan_of_several_layers_draws_the_first(tmp_path):
    n = 6
    one = pd.DataFrame({"status": ["ok"] * n, "denominator": np.linspace(0.02, 5, n),
                        "key_cosine": np.linspace(0.05, 0.95, n), "subject_first_token": [True, False] * 3,
                        "case_id": [f"c{i}" for i in range(n)], "record_index": range(n)})
    df = pd.concat([one.assign(layer=5), one.assign(layer=7)], ignore_index=True)
    df.attrs = {"layer": [5, 7], "editor": "rome"}
    ax = plots.plot_risk_scan(df)
    points = sum(len(c.get_offsets()) for c in ax.collections)
    assert points == n and "layer 5" in ax.get_title()
