"""The three notebooks execute end to end on a tiny model (investigate → post-hoc → paper figures)."""
from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name: str, cwd: pathlib.Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def test_notebooks_execute(tok, tmp_path, monkeypatch):
    from tests.conftest import make_model

    model = make_model("llama", len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    for key, value in {"MODEL": str(tmp_path / "model"), "LAYER": "1", "EDITS": "3", "STATS_TOKENS": "4000",
                       "OUT": str(tmp_path / "runs"), "RUNS": str(tmp_path / "runs"),
                       "FIGURES": str(tmp_path / "fig")}.items():
        monkeypatch.setenv(f"COLLAPSEDIAG_NB_{key}", value)
    monkeypatch.setenv("COLLAPSEDIAG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = _execute("01_investigate.ipynb", tmp_path)
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "rome" in printed and "r-rome" in printed
    assert {p.name for p in (tmp_path / "runs").iterdir()} == {"rome", "r-rome"}
    _execute("02_posthoc.ipynb", tmp_path)
    _execute("03_paper_figures.ipynb", tmp_path)
    names = {p.name for p in (tmp_path / "fig").iterdir()}
    assert {"norm_growth.png", "norm_growth.pdf", "forgetting.pdf", "denominator_vs_norm.png"} <= names
