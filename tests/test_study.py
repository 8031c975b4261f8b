"""The demo study on a tiny model: every planned run is made and every finding gets an answer."""
from __future__ import annotations

import pandas as pd

from collapsediag.experiments.demo import SIZES, StudySize, run_study, study_findings, study_plan
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
    assert "than the same edits in smaller sequential batches" in findings["finding"].iloc[2]  # as the README
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
    assert all(len(line) <= 100 for line in out.splitlines() if str(tmp_path) not in line)  # printed tables wrap
    assert "| finding | reproduced | evidence |" not in out  # a text table; findings.md keeps the markdown
    from collapsediag.signals.scan import read_scan

    risk = read_scan(tmp_path / "runs" / "scan.csv")
    assert risk["risk_rank"].is_monotonic_increasing and risk["in_demo"].sum() == 4
    rome_config = json.loads((tmp_path / "runs" / "rome" / "config.json").read_text())
    assert rome_config["context_templates"] == risk.attrs["context_templates"]  # generated once, shared
    assert (tmp_path / "runs" / "figures" / "risk_scan.png").exists()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()) == [
        "d4s", "figures", "memit", "memit-batch4", "r-rome", "rome"]
    fig = tmp_path / "runs" / "figures"  # under --out by default: the clone's figures/ is left alone
    assert (fig / "norm_growth.png").exists() and (fig / "batch_neighborhood.pdf").exists()
    assert (tmp_path / "runs" / "findings.md").read_text().startswith("| finding | reproduced | evidence |")
    findings = pd.read_csv(tmp_path / "runs" / "findings.csv")
    assert len(findings) == 4
    assert main(["demo", "--hparams", "[1, 2]", "--out", str(tmp_path / "x")]) == 2


def test_study_layers_and_one_statistics_pass_for_all(tok, tmp_path, monkeypatch):
    import torch

    from collapsediag import stats as stats_mod
    from collapsediag.arch import arch_for
    from collapsediag.stats import StatsCache, TextCorpus
    from collapsediag.experiments.demo import study_layers, warm_statistics

    assert study_layers(SIZES["small"]) == [3, 4, 5, 6, 7]  # ROME's 5 lies inside MEMIT's 3–7
    assert study_layers(SIZES["small"], {"rome": {"layer": 9}}) == [3, 4, 5, 6, 7, 9]
    model = make_model("llama", len(tok))
    warm_statistics(model, tok, [1, 2], stats_tokens=1000, cache=StatsCache(tmp_path / "a"), progress=False)
    alone = StatsCache(tmp_path / "b").get(model, tok, arch_for(model), [1], TextCorpus.packaged(), 1000,
                                          progress=False)
    monkeypatch.setattr(stats_mod, "compute_second_moments", lambda *a, **k: 1 / 0)  # a second pass would fail
    got = StatsCache(tmp_path / "a").get(model, tok, arch_for(model), [1], TextCorpus.packaged(), 1000,
                                        progress=False)
    assert torch.allclose(got[1].mom2, alone[1].mom2, rtol=1e-6) and got[1].count == alone[1].count
