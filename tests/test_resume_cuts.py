"""Resume after a cut at any row boundary or inside any row of any table equals the uninterrupted run."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

from collapsediag import EditSession, get_editor, load_run
from collapsediag.arch import arch_for
from collapsediag.signals.fluency import heldout_texts
from collapsediag.stats import StatsCache, TextCorpus
from tests.conftest import corpus_texts, make_model
from tests.test_durable import FACTS

N, EVERY = 5, 2
HP = {"layer": 1, "v_num_grad_steps": 3}
TEMPLATES = ["{}", "The city of music. {}", "Because you said so. {}"]
# rows of the uninterrupted run: checkpoints −1, 1, 3 and the end-of-run one at 4
ROWS = {"edits": N, "layers": N, "evals": 4, "retention": 2 + 4 + 5}
KEYS = {"edits": ["edit_index"], "layers": ["edit_index", "layer"], "evals": ["edit_index"],
        "retention": ["checkpoint", "edit_index"]}
CASES = [(t, k) for t, n in ROWS.items() for k in range(2 * n)]  # k even: before row k // 2; odd: inside it


def _corpus() -> TextCorpus:
    return TextCorpus.from_texts(corpus_texts(300))


@pytest.fixture(scope="module")
def full(tmp_path_factory, tok):
    """The uninterrupted run (5 sequential ROME edits, a checkpoint every 2) and its directory's parent."""
    root = tmp_path_factory.mktemp("cuts")
    (root / "eval.txt").write_text("\n\n".join(corpus_texts(6, seed=9)))
    model = make_model("gpt2", len(tok))
    stats = StatsCache(root / "stats").get(model, tok, arch_for(model), [1], _corpus(), n_tokens=6000, seq_len=32,
                                           progress=False)
    s = EditSession(model, tok, get_editor("rome", HP), out=root / "full", stats=stats, templates=TEMPLATES,
                    eval_every=EVERY, eval_texts=heldout_texts(root / "eval.txt"),
                    generation_prompts=["The city", "I think"], generation_tokens=8,
                    config={"eval_text": str(root / "eval.txt")}, progress=False)
    s.run(FACTS[:N], progress=False)
    return root


def _cut(path, k: int) -> None:
    """Truncate a table before row ``k // 2`` (k even) or in the middle of that row (k odd)."""
    data = path.read_bytes()
    starts = [0] + [i + 1 for i, b in enumerate(data) if b == ord("\n")]
    row = k // 2
    end = starts[row] if k % 2 == 0 else (starts[row] + starts[row + 1]) // 2
    path.write_bytes(data[:end])


def _comparable(df: pd.DataFrame, table: str) -> pd.DataFrame:
    return df.drop(columns=["seconds"], errors="ignore").sort_values(KEYS[table]).reset_index(drop=True)


def _resume_equals_uninterrupted(full, tok, cut) -> None:
    """Resume the run in ``cut``, edit the rest, and compare every table and factor with the full run."""
    want = load_run(full / "full")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the cut line and an unfinished batch are reported
        s = EditSession.resume(cut, make_model("gpt2", len(tok)), tok, FACTS[:N],
                               cache=StatsCache(full / "stats"), corpus=_corpus(), progress=False)
    s.run(FACTS[s.n_edits:N], progress=False)
    got = load_run(cut)
    for name in ("edits", "layers", "evals", "retention"):
        a, b = getattr(want, name), getattr(got, name)
        assert len(a) == len(b) == ROWS[name], name
        assert not b.duplicated(KEYS[name]).any(), name
        pd.testing.assert_frame_equal(_comparable(a, name), _comparable(b, name), check_dtype=False, rtol=1e-6)
    for b in range(N):
        fa, fb = want.factors(b), got.factors(b)
        assert fa.keys() == fb.keys()
        for key in fa:
            np.testing.assert_allclose(fa[key], fb[key], rtol=1e-6)


@pytest.mark.parametrize("table,k", CASES, ids=[f"{t}-{k}" for t, k in CASES])
def test_cut_then_resume_equals_uninterrupted(full, tok, table, k):
    cut = full / f"{table}-{k}"
    shutil.copytree(full / "full", cut)
    _cut(cut / f"{table}.jsonl", k)
    _resume_equals_uninterrupted(full, tok, cut)


def test_checkpoint_written_twice_is_redone_once(full, tok):
    """A run left by the old resume (checkpoint 3's evals and retention rows twice) is repaired."""
    cut = full / "twice"
    shutil.copytree(full / "full", cut)
    for table, key in (("evals", "edit_index"), ("retention", "checkpoint")):
        lines = (cut / f"{table}.jsonl").read_text().splitlines(keepends=True)
        with open(cut / f"{table}.jsonl", "a") as f:
            f.writelines(line for line in lines if json.loads(line)[key] == 3)
    _resume_equals_uninterrupted(full, tok, cut)


def test_fork_then_resume_equals_uninterrupted(full, tok):
    """A fork of the first 2 edits holds the full run's rows up to there; resumed, it ends as the full run."""
    from collapsediag.runs.resume import fork_run

    fork = fork_run(full / "full", full / "fork", 2, {"note": "first two"})
    assert fork.config["forked_from"] == str(full / "full") and fork.config["note"] == "first two"
    assert fork.config["before_fork"] == {"note": None} and not (full / "fork.fork-tmp").exists()
    assert fork.edits["edit_index"].tolist() == [0, 1] and fork.evals["edit_index"].tolist() == [-1, 1]
    assert sorted(set(fork.retention["checkpoint"])) == [1] and sorted(set(fork.layers["edit_index"])) == [0, 1]
    assert [fork.has_factors(b) for b in range(3)] == [True, True, False]
    _resume_equals_uninterrupted(full, tok, full / "fork")
    without = fork_run(full / "full", full / "fork-last", 4, last_checkpoint=False)
    assert without.evals["edit_index"].tolist() == [-1, 1] and set(without.retention["checkpoint"]) == {1}


def test_fork_refuses_more_edits_than_the_run_holds(full):
    from collapsediag.errors import CollapseDiagError
    from collapsediag.runs.resume import fork_run

    with pytest.raises(CollapseDiagError, match="fewer than the 9"):
        fork_run(full / "full", full / "fork9", 9)
    assert not (full / "fork9").exists()
    fork_run(full / "full", full / "again", 1)
    with pytest.raises(CollapseDiagError, match="already holds a run"):
        fork_run(full / "full", full / "again", 2)
    assert load_run(full / "again").edits["edit_index"].tolist() == [0]
