"""The parquet copy of large run tables: same frame as parsing the JSON Lines, appended rows and rewrites seen."""
from __future__ import annotations

import pandas as pd
import pytest

from collapsediag.runs import store
from collapsediag.runs.store import RunWriter, read_table


def _rows(a, b):
    return [{"edit_index": i, "batch_index": i, "batch_size": 1, "case_id": str(i), "status": "ok", "seconds": 0.5,
             "efficacy": bool(i % 3), "p_new_after": None if i % 7 == 0 else i / 1000, "subject": f"s{i}"}
            for i in range(a, b)]


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(store, "COLUMNAR_MIN_BYTES", 2000)


def test_columnar_copy_reads_like_the_json_lines(tmp_path, small_threshold):
    w = RunWriter.create(tmp_path / "r", {"editor": "rome"})
    w.append("edits", _rows(0, 200))
    plain = read_table(tmp_path / "r", "edits", columnar=False)
    first = read_table(tmp_path / "r", "edits")  # writes the copy
    assert (tmp_path / "r" / "columnar" / "edits.parquet").exists()
    again = read_table(tmp_path / "r", "edits")  # reads it
    pd.testing.assert_frame_equal(first, plain)
    pd.testing.assert_frame_equal(again, plain)
    w.append("edits", _rows(200, 230))  # rows appended after the copy are parsed from the tail
    pd.testing.assert_frame_equal(read_table(tmp_path / "r", "edits"),
                                  read_table(tmp_path / "r", "edits", columnar=False))
    assert len(read_table(tmp_path / "r", "edits")) == 230


def test_a_rewritten_table_makes_the_copy_stale(tmp_path, small_threshold):
    w = RunWriter.create(tmp_path / "r", {"editor": "rome"})
    w.append("edits", _rows(0, 200))
    read_table(tmp_path / "r", "edits")
    w.rewrite("edits", pd.DataFrame(_rows(0, 150)).assign(case_id=lambda d: "x" + d["case_id"]))
    w.append("edits", _rows(150, 300))
    got = read_table(tmp_path / "r", "edits")
    pd.testing.assert_frame_equal(got, read_table(tmp_path / "r", "edits", columnar=False))
    assert got["case_id"].iloc[0] == "x0" and len(got) == 300


def test_a_line_cut_by_a_crash_stays_out_of_the_copy(tmp_path, small_threshold):
    w = RunWriter.create(tmp_path / "r", {"editor": "rome"})
    w.append("edits", _rows(0, 200))
    with open(tmp_path / "r" / "edits.jsonl", "a") as f:
        f.write('{"edit_index": 200, "case_')
    with pytest.warns(UserWarning, match="incomplete line"):
        got = read_table(tmp_path / "r", "edits")
    assert len(got) == 200
    with open(tmp_path / "r" / "edits.jsonl", "a") as f:  # the cut line finished later (not in a real run, but safe)
        f.write('id": "200", "status": "ok"}\n')
    assert len(read_table(tmp_path / "r", "edits")) == 201
