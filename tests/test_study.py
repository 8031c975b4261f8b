"""The demo study on a tiny model: every planned run is made and every finding gets an answer."""
from __future__ import annotations

import pandas as pd

from collapsediag.study import SIZES, StudySize, run_study, study_findings, study_plan
from tests.conftest import corpus_texts, make_model
from tests.test_plots import RECORDS


def test_study_plan_sizes():
    assert [n for n, _, _ in study_plan(SIZES["small"])] == ["rome", "r-rome", "memit", "memit-batch8", "d4s"]
    assert SIZES["small"].rome_eval_every == 1  # a checkpoint right after every ROME edit names a disabling one
    assert study_plan(StudySize(4, (1,), 2, 2, 1))[-1] == ("d4s", "d4s", 1)


def test_study_runs_and_findings(tok, tmp_path):
    from collapsediag.stats import StatsCache, TextCorpus

    model = make_model("llama", len(tok))
    size = StudySize(n_edits=4, batch_sizes=(4,), eval_every=2, eval_passages=2, generation_prompts=1)
    batched = {"layers": [1, 2], "z_num_grad_steps": 2, "mom2_update_weight": 1.0}
    hp = {"rome": {"layer": 1, "v_num_grad_steps": 2}, "r-rome": {"layer": 1, "v_num_grad_steps": 2},
          "memit": batched, "d4s": batched}
    runs = run_study(model, tok, RECORDS, tmp_path / "study", size, hparams=hp, stats_tokens=4000,
                     corpus=TextCorpus.from_texts(corpus_texts(300)), cache=StatsCache(tmp_path / "c"),
                     progress=False)
    assert list(runs) == ["rome", "r-rome", "memit", "memit-batch4", "d4s"]
    assert runs["memit-batch4"].config["mode"] == "batch" and runs["memit-batch4"].edits["batch_index"].eq(0).all()
    for name, r in runs.items():
        expected = {"memit-batch4": [-1, 3], "rome": [-1, 0, 1, 2, 3], "r-rome": [-1, 0, 1, 2, 3]}
        assert len(r.edits) == 4 and r.evals["edit_index"].tolist() == expected.get(name, [-1, 1, 3]), name
    findings = study_findings(runs)
    assert len(findings) == 4 and findings["finding"].str.startswith(("(i)", "(ii)", "(iii)", "(iv)")).all()
    assert findings["evidence"].str.len().gt(20).all()
    nb = findings.loc[findings["finding"].str.startswith("(iii)"), "evidence"].iloc[0]
    assert "batch 1:" in nb and "batch 4:" in nb
    assert isinstance(findings, pd.DataFrame)


def test_demo_command_writes_runs_figures_and_findings(tok, tmp_path, capsys):
    import json

    from collapsediag.cli import main

    model = make_model("llama", len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    batched = {"layers": [1, 2], "z_num_grad_steps": 2, "mom2_update_weight": 1.0}
    hp = {"rome": {"layer": 1, "v_num_grad_steps": 2}, "r-rome": {"layer": 1, "v_num_grad_steps": 2},
          "memit": batched, "d4s": batched}
    code = main(["demo", "--model", str(tmp_path / "model"), "--hparams", json.dumps(hp), "--n-edits", "4",
                 "--stats-tokens", "3000", "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    out = capsys.readouterr().out
    assert "Findings (small study, 4 edits per run" in out and "(iii)" in out
    assert "Risk scan of the" in out and "risk_rank" in out
    from collapsediag.scan import read_scan

    risk = read_scan(tmp_path / "runs" / "scan.csv")
    assert risk["risk_rank"].is_monotonic_increasing and risk["in_demo"].sum() == 4
    rome_config = json.loads((tmp_path / "runs" / "rome" / "config.json").read_text())
    assert rome_config["context_templates"] == risk.attrs["context_templates"]  # generated once, shared
    assert (tmp_path / "runs" / "figures" / "risk_scan.png").exists()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()) == [
        "d4s", "figures", "memit", "memit-batch4", "r-rome", "rome"]
    fig = tmp_path / "runs" / "figures"  # under --out by default: the clone's figures/ is left alone
    assert (fig / "norm_growth.png").exists() and (fig / "batch_neighborhood.pdf").exists()
    findings = pd.read_csv(tmp_path / "runs" / "findings.csv")
    assert len(findings) == 4
    assert main(["demo", "--hparams", "[1, 2]", "--out", str(tmp_path / "x")]) == 2
