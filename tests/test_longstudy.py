"""The long study on a tiny model: runs advance together, resume without duplicates, record their timing."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from collapsediag.experiments.longstudy import LongStudyPlan, run_long_study
from collapsediag.stats import StatsCache, TextCorpus
from tests.conftest import corpus_texts, make_model
from tests.test_plots import RECORDS

BATCHED = {"layers": [1, 2], "z_num_grad_steps": 2, "mom2_update_weight": 1.0}
HP = {"rome": {"layer": 1, "v_num_grad_steps": 2}, "memit": BATCHED, "encore": BATCHED, "emmet": {"layers": [2]}}


def _study(tok, tmp_path, plan, **kw):
    return run_long_study(make_model("llama", len(tok)), tok, RECORDS, tmp_path / "study", plan, stats_tokens=4000,
                          corpus=TextCorpus.from_texts(corpus_texts(300)), cache=StatsCache(tmp_path / "c"),
                          progress=False, **kw)


def test_a_batch_run_is_logged_after_each_checkpoint_interval(tok, tmp_path, monkeypatch):
    from collapsediag.experiments.longstudy import LongStudy

    logged = []
    real = LongStudy._record
    def record(self, name, path=None, before=0):
        real(self, name, path, before)
        logged.append((name, self.sitting["edits"][name][1] if name else None))

    monkeypatch.setattr(LongStudy, "_record", record)
    plan = LongStudyPlan(n_edits=4, editors=(), eval_every=2, batch_editors=("memit",), batch_sizes=(1, 2),
                         batch_edits=4, eval_passages=2, generation_prompts=1, hparams=HP)
    result = _study(tok, tmp_path, plan, parts=("batch",))
    assert logged[:-1] == [("batch/memit-b1", 2), ("batch/memit-b1", 4), ("batch/memit-b2", 2), ("batch/memit-b2", 4)]
    assert logged[-1] == (None, None)  # the sitting's seconds at its end
    assert [int(r.edits["batch_index"].max()) + 1 for r in result["batch"].values()] == [4, 2]
    assert [r.evals["edit_index"].tolist() for r in result["batch"].values()] == [[-1, 1, 3], [-1, 1, 3]]


def test_long_study_runs_every_editor_and_the_batch_study(tok, tmp_path):
    plan = LongStudyPlan(n_edits=4, editors=("rome", "memit", "encore"), eval_every=2, retention_sample=1,
                         batch_editors=("memit",), batch_sizes=(1, 2, 4), batch_edits=4, eval_passages=2,
                         generation_prompts=1, hparams=HP)
    result = _study(tok, tmp_path, plan)
    assert list(result["seq"]) == ["rome", "memit", "encore"]
    for run in result["seq"].values():
        assert run.edits["case_id"].tolist() == [str(r["case_id"]) for r in RECORDS[:4]]  # same records, same order
        assert run.evals["edit_index"].tolist() == [-1, 1, 3]
        assert run.config["retention_sample"] == 1
        # a checkpoint tests the edits since the previous one and at most one older edit
        last = run.retention[run.retention["checkpoint"] == 3]
        assert set(last.loc[last["recent"].astype(bool), "edit_index"]) == {2, 3} and (~last["recent"].astype(bool)).sum() == 1
    batch = result["batch"]
    assert list(batch) == ["memit-b1", "memit-b2", "memit-b4"]
    assert [int(r.edits["batch_index"].max()) + 1 for r in batch.values()] == [4, 2, 1]
    # batch size 1 of MEMIT is the sequential MEMIT run's edits, forked, with a full end-of-run checkpoint
    assert batch["memit-b1"].config["forked_from"].endswith("seq/memit")
    assert batch["memit-b1"].config["before_fork"]["retention_sample"] == 1
    assert [r.config["eval_every"] for r in batch.values()] == [2, 2, 4]  # after each batch; size 1 as the study
    for table in ("edits", "layers"):
        pd.testing.assert_frame_equal(getattr(batch["memit-b1"], table), getattr(result["seq"]["memit"], table))
    for r in batch.values():  # every batch size's end score covers the same edits: no retention sample
        assert r.config["retention_sample"] == 0
        assert sorted(r.retention.loc[r.retention["checkpoint"] == 3, "edit_index"]) == [0, 1, 2, 3]
    status = json.loads((tmp_path / "study" / "study.json").read_text())
    assert set(status["runs"]) == {"seq/rome", "seq/memit", "seq/encore", "batch/memit-b1", "batch/memit-b2",
                                   "batch/memit-b4"}
    assert all(v["edits"] == 4 and v["edits_per_hour"] > 0 for v in status["runs"].values())
    assert status["case_ids"] == [str(r["case_id"]) for r in RECORDS[:4]]


def test_long_study_resumes_each_run(tok, tmp_path):
    short = LongStudyPlan(n_edits=2, editors=("rome", "memit"), eval_every=2, batch_editors=(), eval_passages=2,
                          generation_prompts=1, hparams=HP)
    _study(tok, tmp_path, short, batches=False)
    longer = LongStudyPlan(**{**short.__dict__, "n_edits": 4})
    result = _study(tok, tmp_path, longer, batches=False)
    for run in result["seq"].values():
        assert run.edits["edit_index"].tolist() == [0, 1, 2, 3]
        assert run.evals["edit_index"].tolist() == [-1, 1, 3]
        assert not run.retention.duplicated(["checkpoint", "edit_index"]).any()


def test_study_report_on_a_finished_tiny_study(tok, tmp_path, capsys):
    from collapsediag.cli import main

    plan = LongStudyPlan(n_edits=4, editors=("memit", "d4s", "encore"), eval_every=2, batch_editors=("memit",),
                         batch_sizes=(1, 4), batch_edits=4, eval_passages=2, generation_prompts=1,
                         hparams={**HP, "d4s": BATCHED})
    _study(tok, tmp_path, plan)
    assert main(["study", "--out", str(tmp_path / "study"), "--report", "--figures", str(tmp_path / "f")]) == 0
    text = capsys.readouterr().out
    assert text.strip() == (tmp_path / "study" / "findings.md").read_text().strip()
    for finding in ("(i) gradual forgetting", "(ii) weight_l1 growth tracks", "(ii) D4S and ENCORE",
                    "early warning: every catastrophic collapse", "(iii) bigger batches lower MEMIT"):
        assert finding in text
    assert "false alarms (warned, never catastrophic):" in text
    from collapsediag.experiments.studyreport import study_report

    tables = study_report(tmp_path / "study")
    assert list(tables) == ["findings", "editors", "disabling", "batches", "timing"]
    assert tables["editors"]["editor"].tolist() == ["d4s", "encore", "memit"]
    assert "## Disabling edits in the sequential runs" in text
    assert "batch 1:" in text and "batch 4:" in text and "edits_per_hour" in text
    assert "## Timing by sitting" in text and "| seq/memit | 0 |" in text
    for name in ("spectral", "warnings", "norm_growth", "forgetting", "norm_growth_memit_family"):
        assert (tmp_path / "f" / "seq" / f"{name}.png").exists(), name
    assert (tmp_path / "f" / "batch-memit" / "batch_neighborhood.png").exists()


def test_a_resumed_study_advances_the_run_furthest_behind_first(tok, tmp_path):
    first = LongStudyPlan(n_edits=2, editors=("rome",), eval_every=2, batch_editors=(), eval_passages=2,
                          generation_prompts=1, hparams=HP)
    _study(tok, tmp_path, first, batches=False)  # ROME alone gets ahead
    both = LongStudyPlan(**{**first.__dict__, "n_edits": 4, "editors": ("rome", "memit")})
    _study(tok, tmp_path, both, batches=False)
    rome = (tmp_path / "study" / "seq" / "rome" / "edits.jsonl").stat().st_mtime
    memit_first = (tmp_path / "study" / "seq" / "memit" / "factors" / "batch_000001.npz").stat().st_mtime
    assert memit_first < rome  # MEMIT caught up to edit 2 before ROME went on to edit 4


def test_the_batch_part_alone_leaves_the_fork_for_later_and_the_parts_share_study_json(tok, tmp_path):
    plan = LongStudyPlan(n_edits=2, editors=("memit",), eval_every=2, batch_editors=("memit",), batch_sizes=(1, 2),
                         batch_edits=2, eval_passages=2, generation_prompts=1, hparams=HP)
    result = _study(tok, tmp_path, plan, parts=("batch",))
    assert list(result["batch"]) == ["memit-b2"] and result["seq"] == {}  # memit-b1 waits for seq/memit
    assert not (tmp_path / "study" / "batch" / "memit-b1").exists()
    result = _study(tok, tmp_path, plan, parts=("seq",))
    assert list(result["seq"]) == ["memit"] and result["batch"] == {}
    status = json.loads((tmp_path / "study" / "study.json").read_text())
    assert set(status["runs"]) == {"batch/memit-b2", "seq/memit"}  # neither part dropped the other's entry
    assert [s["parts"] for s in status["sittings"]] == [["batch"], ["seq"]]
    assert [s["edits"] for s in status["sittings"]] == [{"batch/memit-b2": [0, 2]}, {"seq/memit": [0, 2]}]
    assert all(s["threads"] >= 1 and s["seconds"] > 0 for s in status["sittings"])
    result = _study(tok, tmp_path, plan, parts=("batch",))  # now the fork can be made
    assert result["batch"]["memit-b1"].config["forked_from"].endswith("seq/memit")


def test_timing_by_sitting_tells_threads_and_company_apart(tok, tmp_path):
    from collapsediag.experiments.longstudy import update_status
    from collapsediag.experiments.studyreport import timing_table

    plan = LongStudyPlan(n_edits=2, editors=("memit",), eval_every=1, batch_editors=(), eval_passages=2,
                         generation_prompts=1, hparams=HP)
    run = _study(tok, tmp_path, plan)["seq"]["memit"]
    out = tmp_path / "study"
    table = timing_table(out, {"seq/memit": run})
    assert table[["run", "sitting", "alone", "from_edit", "to_edit"]].values.tolist() == [["seq/memit", 0, True, 0, 2]]
    first = read_sittings(out)[0]
    # a second process overlapping the first in time, and a sitting from before the log that says it ran alone
    update_status(out, lambda s: s["sittings"].extend([
        {"parts": ["batch"], "threads": 1, "started": first["started"], "seconds": 5.0, "edits": {"batch/x": [0, 4]}},
        {"parts": ["seq"], "threads": 2, "started": None, "alone": True, "seconds": None, "edits": {"seq/memit": [1, 2]}},
        {"parts": ["seq"], "threads": 2, "started": None, "seconds": None, "edits": {"seq/memit": [0, 1]}},
        {"parts": ["batch"], "threads": 1, "started": first["started"], "seconds": 0.0, "edits": {}}]))  # refused
    table = timing_table(out, {"seq/memit": run})
    assert table[["sitting", "alone", "from_edit", "to_edit"]].values.tolist() == \
        [[0, False, 0, 2], [2, True, 1, 2], [3, None, 0, 1]]
    assert table["threads"].tolist() == [torch.get_num_threads(), 2, 2]
    assert table["seconds_per_edit_median"].iloc[1] == round(float(run.edits["seconds"].iloc[1]), 2)


def read_sittings(out):
    return json.loads((out / "study.json").read_text())["sittings"]


def test_a_part_of_the_study_runs_in_one_process_at_a_time(tok, tmp_path):
    from filelock import FileLock

    from collapsediag.errors import CollapseDiagError

    plan = LongStudyPlan(n_edits=2, editors=("rome",), eval_every=2, batch_editors=(), eval_passages=2,
                         generation_prompts=1, hparams=HP)
    (tmp_path / "study").mkdir()
    held = FileLock(str(tmp_path / "study" / "study.seq.lock"))
    with held:
        with pytest.raises(CollapseDiagError, match="another process is running the seq part"):
            _study(tok, tmp_path, plan)
    assert not (tmp_path / "study" / "seq").exists()
    assert "sittings" not in json.loads((tmp_path / "study" / "study.json").read_text())  # a refused start logs none
    with pytest.raises(CollapseDiagError, match="unknown study part"):
        _study(tok, tmp_path, plan, parts=("sequential",))
    with pytest.raises(CollapseDiagError, match="nothing to run"):
        _study(tok, tmp_path, plan, parts=("batch",))  # the plan has no batch editors
    assert _study(tok, tmp_path, plan)["seq"]["rome"].edits["edit_index"].tolist() == [0, 1]  # released after


def test_processes_share_the_batch_study_run_by_run(tok, tmp_path):
    from filelock import FileLock

    plan = LongStudyPlan(n_edits=2, editors=(), eval_every=2, batch_editors=("memit",), batch_sizes=(1, 2),
                         batch_edits=2, eval_passages=2, generation_prompts=1, hparams=HP)
    (tmp_path / "study" / "batch").mkdir(parents=True)
    with FileLock(str(tmp_path / "study" / "batch" / "memit-b1.lock")):  # another process is on memit-b1
        result = _study(tok, tmp_path, plan, parts=("batch",))
    assert list(result["batch"]) == ["memit-b2"] and not (tmp_path / "study" / "batch" / "memit-b1").exists()
    result = _study(tok, tmp_path, plan, parts=("batch",))  # released: this process makes it
    assert list(result["batch"]) == ["memit-b1", "memit-b2"]
    assert result["batch"]["memit-b1"].edits["edit_index"].tolist() == [0, 1]


def _count_up(out, key, times):
    from collapsediag.experiments.longstudy import update_status

    for _ in range(times):
        update_status(out, lambda s: s.__setitem__(key, s.get(key, 0) + 1))
        update_status(out, lambda s: s.__setitem__("total", s.get("total", 0) + 1))


def test_update_status_loses_no_write_of_two_processes(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_count_up, args=(tmp_path, key, 60)) for key in ("seq", "batch")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert json.loads((tmp_path / "study.json").read_text()) == {"seq": 60, "batch": 60, "total": 120}
    assert not list(tmp_path.glob("*.tmp"))


def test_run_timing_of_a_range_of_edits(tok, tmp_path):
    from collapsediag.experiments.longstudy import run_timing
    from collapsediag.runs.store import load_run

    plan = LongStudyPlan(n_edits=4, editors=("memit",), eval_every=2, batch_editors=(), eval_passages=2,
                         generation_prompts=1, hparams=HP)
    run = _study(tok, tmp_path, plan)["seq"]["memit"]
    secs, evals = run.edits.set_index("edit_index")["seconds"], run.evals.set_index("edit_index")["seconds"]
    late = run_timing(run, first=2)
    assert late["edits"] == 2 and late["seconds"] == round(secs[2] + secs[3] + evals[3], 1)
    early = run_timing(run, 0, 2)
    assert early["edits"] == 2 and early["seconds"] == round(secs[0] + secs[1] + evals[-1] + evals[1], 1)
    assert early["seconds_per_edit_median"] == round(float(secs[[0, 1]].median()), 2)
    assert run_timing(load_run(run.path))["edits"] == 4


def test_interval_end_is_the_next_checkpoint_within_the_run():
    from collapsediag.experiments.longstudy import interval_end

    assert [interval_end(d, 25, 300) for d in (0, 24, 25, 290)] == [25, 25, 50, 300]
    assert interval_end(256, 16, 256) == 256  # a finished run: nothing left
