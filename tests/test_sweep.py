"""Sweeps: the grid multiplies out, cells run as `collapsediag run`, a re-run skips or resumes them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from collapsediag.errors import CollapseDiagError
from collapsediag.runs.store import load_run
from collapsediag.experiments.sweep import cells, read_spec, sweep, sweep_table
from tests.conftest import corpus_texts, make_model

FACTS = [{"subject": s, "prompt": "{} is located in", "target_new": "Italy", "target_true": "Africa"}
         for s in ("Angola", "Tokyo", "Paris", "the Nile")]


def _spec(tmp_path, grid: str, n_edits: int = 2) -> str:
    model = tmp_path / "model"
    if not model.exists():
        from tests.conftest import build_tokenizer

        tok = build_tokenizer()
        make_model("llama", len(tok)).save_pretrained(model)
        tok.save_pretrained(model)
        (tmp_path / "facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in FACTS))
        (tmp_path / "c.txt").write_text("\n\n".join(corpus_texts(300)))
    spec = tmp_path / "spec.toml"
    spec.write_text(f"""[defaults]
model = "{model}"
data = "facts:{tmp_path / 'facts.jsonl'}"
n_edits = {n_edits}
eval_every = 2
layers = [1]
context = 1
stats_corpus = "{tmp_path / 'c.txt'}"
stats_tokens = 3000
cache_dir = "{tmp_path / 'cache'}"
hparams = {{v_num_grad_steps = 2}}

[grid]
{grid}
""")
    return str(spec)


def test_grid_multiplies_out_and_names_cells(tmp_path):
    spec = read_spec(_spec(tmp_path, 'editor = ["rome", "r-rome"]\nseed = [0, 1]\nlayers = [[1]]'))
    cs = cells(spec)
    assert [c.name for c in cs] == ["editor-rome_seed-0", "editor-rome_seed-1", "editor-r-rome_seed-0",
                                    "editor-r-rome_seed-1"]
    cmd = cs[0].command(tmp_path / "out")
    assert cmd[cmd.index("--layers") + 1] == "1" and "--hparam" in cmd and "v_num_grad_steps=2" in cmd
    bad = tmp_path / "bad.toml"
    bad.write_text('[grid]\ncolour = ["red"]\n')
    with pytest.raises(CollapseDiagError, match="unknown grid keys"):
        read_spec(bad)


def test_local_sweep_runs_every_cell_then_skips_them(tmp_path):
    spec = _spec(tmp_path, 'editor = ["rome", "r-rome"]\nseed = [0, 1]')
    first = sweep(spec, tmp_path / "out", workers=2)
    assert [r["returncode"] for r in first] == [0, 0, 0, 0] and not any(r["skipped"] for r in first)
    again = sweep(spec, tmp_path / "out")
    assert all(r["skipped"] for r in again)
    table = sweep_table(tmp_path / "out")
    assert list(table[["editor", "seed"]].itertuples(index=False, name=None)) == [
        ("r-rome", 0), ("r-rome", 1), ("rome", 0), ("rome", 1)]
    assert (table["edits"] == 2).all()
    from collapsediag.cli import main

    assert main(["report", str(tmp_path / "out")]) == 0


def _kill_and_rerun(tmp_path, spec, out, engine_args):
    """Start the sweep, SIGKILL it (and its cells) mid-run, then run it again to the end."""
    cmd = [sys.executable, "-m", "collapsediag", "sweep", spec, "--out", str(out)] + engine_args
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        edits = list(out.glob("*/edits.jsonl"))
        if edits and sum(p.read_text().count("\n") for p in edits) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0


def _same_runs(a, b):
    for name in ("editor-rome", "editor-r-rome"):
        ra, rb = load_run(a / name), load_run(b / name)
        for table in ("edits", "layers", "evals", "retention"):
            x, y = getattr(ra, table), getattr(rb, table)
            drop = [c for c in ("seconds",) if c in x.columns]
            pd.testing.assert_frame_equal(x.drop(columns=drop), y.drop(columns=drop), check_dtype=False, rtol=1e-5)


def test_a_killed_local_sweep_finishes_equal_to_an_uninterrupted_one(tmp_path):
    spec = _spec(tmp_path, 'editor = ["rome", "r-rome"]', n_edits=4)
    sweep(spec, tmp_path / "clean")
    _kill_and_rerun(tmp_path, spec, tmp_path / "cut", [])
    _same_runs(tmp_path / "clean", tmp_path / "cut")


def test_ray_sweep_survives_a_killed_worker(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    # a Ray task runs its cell with OMP_NUM_THREADS = cpus_per_run; CPU reductions depend on the thread count,
    # so the uninterrupted reference runs with the same one
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = _spec(tmp_path, 'editor = ["rome", "r-rome"]', n_edits=4)
    with open(spec, "a") as f:
        f.write("\n[resources]\ncpus_per_run = 1\nmax_retries = 3\n")
    sweep(spec, tmp_path / "clean")
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "collapsediag", "sweep", spec, "--out", str(out), "--engine", "ray"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, killed = time.time() + 400, False
    while time.time() < deadline and proc.poll() is None and not killed:
        edits = list(out.glob("*/edits.jsonl"))
        if edits and max(p.read_text().count("\n") for p in edits) >= 1:
            pids = subprocess.run(["pgrep", "-f", "ray::run_cell"], capture_output=True, text=True).stdout.split()
            if pids:
                os.kill(int(pids[0]), signal.SIGKILL)  # the Ray worker running a cell, mid-run
                killed = True
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=600)
    assert killed, "the kill must land while a cell runs"
    assert proc.returncode == 0, output
    assert "2 cells: 2 run" in output
    _same_runs(tmp_path / "clean", out)
