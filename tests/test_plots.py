"""Every figure on small saved runs (overlaid, with and without ``ax``), and the figures / report commands."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

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
    return [load_run(root / "rome"), load_run(root / "memit")]


RECORDS = [dict(r, paraphrase_prompts=["Because you said so. " + r["prompt"]],
                neighborhood_prompts=["Madrid is a citizen of", "The mother tongue of Lyon is"]) for r in FOUR]

PLOTS = [plots.plot_norm_growth, plots.plot_forgetting, plots.plot_denominator_vs_norm, plots.plot_key_stats,
         plots.plot_batch_neighborhood, plots.plot_perplexity]


@pytest.mark.parametrize("fn", PLOTS, ids=lambda f: f.__name__)
def test_plot_functions_overlay_runs_with_and_without_ax(two_runs, fn):
    ax = fn(two_runs)
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None
    assert len(ax.get_legend().get_texts()) >= 2 or fn is plots.plot_key_stats
    fig, given = plt.subplots()
    assert fn(two_runs, ax=given) is given
    assert given.has_data()
    assert fn(two_runs[0]) is not None  # one run alone
    assert not plt.fignum_exists(0) or True


def test_norm_growth_overlays_every_layer_of_every_run(two_runs):
    ax = plots.plot_norm_growth(two_runs)
    assert [line.get_label() for line in ax.lines] == ["rome, sequential, layer 1", "memit, sequential-batch 2, layer 1",
                                                      "memit, sequential-batch 2, layer 2"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["rome, sequential", "memit, sequential-batch 2", "layer 1", "layer 2"]  # colour = run, style = layer
    assert ax.lines[1].get_color() == ax.lines[2].get_color() != ax.lines[0].get_color()
    assert ax.lines[1].get_linestyle() != ax.lines[2].get_linestyle()
    assert ax.lines[0].get_ydata()[0] == pytest.approx(
        two_runs[0].layers["weight_l1"].iloc[0] / two_runs[0].config["initial_weights"]["1"]["weight_l1"])


def test_perplexity_marks_flags(two_runs):
    import pandas as pd

    flags = pd.DataFrame({"edit_index": [1], "signal": ["denominator"]})
    ax = plots.plot_perplexity(two_runs[0], flags=flags)
    assert any(list(line.get_xdata()) == [2, 2] for line in ax.lines)


def test_batch_table(two_runs):
    t = plots.batch_table(two_runs)
    assert t["batch_size"].tolist() == [1, 2] and t["neighborhood_after_batch"].notna().all()


def test_figures_and_report_commands(two_runs, tmp_path, capsys):
    dirs = [str(r.path) for r in two_runs]
    assert main(["figures", *dirs, "--out", str(tmp_path / "fig")]) == 0
    names = {p.name for p in (tmp_path / "fig").iterdir()}
    for stem in ("norm_growth", "forgetting", "denominator_vs_norm", "key_stats", "batch_neighborhood", "perplexity"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    assert all((tmp_path / "fig" / n).stat().st_size > 1000 for n in names)
    capsys.readouterr()
    assert main(["report", *dirs, "--format", "markdown"]) == 0
    text = capsys.readouterr().out
    assert "## Summary" in text and "## Flagged edits" in text and "## Forgetting phases" in text
    assert "| run | editor | layer | edits |" in text and "| rome | rome | 1 | 4 |" in text
    assert main(["report", *dirs]) == 0
    assert "Summary" in capsys.readouterr().out


def test_figures_are_byte_identical_when_redrawn(two_runs, tmp_path):
    a = plots.write_figures(two_runs, tmp_path / "a")
    b = plots.write_figures(two_runs, tmp_path / "b")
    assert [p.name for p in a] == [p.name for p in b]
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
