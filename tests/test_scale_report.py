"""scripts/scale_report.py on two tiny saved runs: the compact tables, the cross-fitted warnings, the figures."""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pandas as pd

from collapsediag import EditSession, get_editor
from collapsediag.stats import StatsCache, TextCorpus
from tests.conftest import corpus_texts, make_model
from tests.test_batchsize import EIGHT

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_scale_report_of_two_tiny_runs(tok, tmp_path):
    model = make_model("llama", len(tok))
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    for name, editor in (("memit-b2", "memit"), ("emmet-b2", "emmet")):
        model.load_state_dict(w0)
        s = EditSession(model, tok, get_editor(editor, {"layers": [1], "z_num_grad_steps": 2}),
                        out=tmp_path / "scale" / name, cache=StatsCache(tmp_path / "c"),
                        corpus=TextCorpus.from_texts(corpus_texts(300)), stats_tokens=4000, eval_every=4,
                        eval_texts=["The city of music is old."], generation_prompts=[], progress=False,
                        config={"batch_size": 2, "n_edits": 8})
        s.run(EIGHT, batch_size=2, progress=False)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "scale_report.py"), "--runs",
                          str(tmp_path / "scale"), "--out", str(tmp_path / "res"), "--figures", str(tmp_path / "fig")],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    summary = pd.read_csv(tmp_path / "res" / "summary.csv")
    assert sorted(summary["run"]) == ["emmet-b2", "memit-b2"] and (summary["edits"] == 8).all()
    assert (summary["onset"] == "too few checkpoints").all()  # 3 checkpoints: no verdict
    growth = pd.read_csv(tmp_path / "res" / "growth.csv")
    assert len(growth) == 8 and growth["weight_fro_growth_pct"].notna().all()
    warnings = pd.read_csv(tmp_path / "res" / "warnings.csv")
    assert set(warnings["fitted_on"]) == {"fit: memit, alphaedit, d4s", "fit: emmet, encore, r-rome"}
    assert (warnings["verdict"] == "too few checkpoints").all()
    assert (tmp_path / "fig" / "norm_growth.png").exists() and (tmp_path / "fig" / "forgetting.png").exists()
    assert (tmp_path / "fig" / "scale.png").exists()

    # A later sitting without one run's folder keeps that run's rows; --readme writes the table between markers.
    shutil.rmtree(tmp_path / "scale" / "emmet-b2")
    readme = tmp_path / "README.md"
    readme.write_text("# t\n<!-- SCALE-TABLE -->\nold\n<!-- /SCALE-TABLE -->\nafter\n", encoding="utf-8")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "scale_report.py"), "--runs",
                          str(tmp_path / "scale"), "--out", str(tmp_path / "res"), "--figures", str(tmp_path / "fig"),
                          "--readme", str(readme)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    again = pd.read_csv(tmp_path / "res" / "summary.csv")
    assert sorted(again["run"]) == ["emmet-b2", "memit-b2"] and again["sitting"].notna().all()
    assert set(pd.read_csv(tmp_path / "res" / "growth.csv")["run"]) == {"emmet-b2", "memit-b2"}
    text = readme.read_text(encoding="utf-8")
    assert "old" not in text and text.endswith("<!-- /SCALE-TABLE -->\nafter\n")
    assert "| emmet-b2 | 8 (8) | too few checkpoints |" in text and "| memit-b2 | 8 (8) |" in text
