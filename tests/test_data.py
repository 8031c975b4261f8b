"""Loaders for every supported format, and errors that name the malformed record."""
from __future__ import annotations

import json
import pathlib

import pytest

from collapsediag.data import (load_counterfact, load_csv_facts, load_data, load_facts, load_zsre, own_facts)
from collapsediag.errors import RecordError
from collapsediag.requests import EditRequest

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def _need(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def test_counterfact_rome_schema_sample():
    recs = load_counterfact(_need(SHARED / "counterfact.json"), n=20)
    reqs = [EditRequest.from_dict(r) for r in recs]
    assert [r.case_id for r in reqs][:1] == [json.loads((SHARED / "counterfact.json").read_text())[0]["case_id"]]
    assert all(len(r.neighborhood_prompts) == 10 for r in reqs)


def test_counterfact_mend_schema_sample():
    recs = load_counterfact(_need(SHARED / "counterfact_mend" / "counterfact-edit.json"), n=20)
    reqs = [EditRequest.from_dict(r) for r in recs]
    assert all("{}" in r.prompt and r.text.count(r.subject) >= 1 for r in reqs)
    assert all(len(r.paraphrase_prompts) == 1 and len(r.neighborhood_prompts) == 1 for r in reqs)
    assert all(r.target_true for r in reqs)


def test_zsre_sample():
    recs = load_zsre(_need(SHARED / "zsre_eval.json"), n=30)
    parsed, errors = [], []
    for r in recs:
        try:
            parsed.append(EditRequest.from_dict(r))
        except RecordError as exc:
            errors.append(exc)
    assert len(parsed) >= 20
    assert all(r.paraphrase_prompts for r in parsed)
    assert all(str(e.record_id) in str(e) for e in errors)
    assert "locality" in recs[0]


def test_csv_facts(tmp_path):
    p = tmp_path / "f.csv"
    p.write_text('subject,prompt,target_new,target_true,paraphrase_prompts,neighborhood_prompts\n'
                 'Paris,{} is in,Italy,France,"I know {} is in|{} lies in","[""Lyon is in""]"\n'
                 'Rome,{} is in,Spain,Italy,,\n')
    recs = load_csv_facts(p)
    a, b = (EditRequest.from_dict(r) for r in recs)
    assert a.paraphrase_prompts == ("I know {} is in", "{} lies in") and a.neighborhood_prompts == ("Lyon is in",)
    assert b.case_id == "f.csv:3" and b.paraphrase_prompts == ()
    assert load_data(f"facts:{p}") == recs


def test_own_fact_set_shape():
    reqs = [EditRequest.from_dict(r) for r in own_facts()]
    assert len(reqs) >= 17
    first = sum(r.prompt.startswith("{}") for r in reqs)
    assert 0.35 <= first / len(reqs) <= 0.65
    assert all(len(r.paraphrase_prompts) == 2 and len(r.neighborhood_prompts) == 5 for r in reqs)


MALFORMED = {
    "missing subject": {"case_id": "m1", "prompt": "{} is in", "target_new": "Italy"},
    "missing prompt": {"case_id": "m2", "subject": "Paris", "target_new": "Italy"},
    "missing target": {"case_id": "m3", "subject": "Paris", "prompt": "{} is in"},
    "empty target": {"case_id": "m4", "subject": "Paris", "prompt": "{} is in", "target_new": " "},
    "empty subject": {"case_id": "m5", "subject": "  ", "prompt": "{} is in", "target_new": "Italy"},
    "no placeholder": {"case_id": "m6", "subject": "Paris", "prompt": "Paris is in", "target_new": "Italy"},
    "two placeholders": {"case_id": "m7", "subject": "Paris", "prompt": "{} is {} in", "target_new": "Italy"},
    "subject not in prompt": {"case_id": "m8", "subject": "Rome", "prompt_filled": "Paris is in",
                              "target_new": "Italy"},
    "same targets": {"case_id": "m9", "subject": "Paris", "prompt": "{} is in", "target_new": "Italy",
                     "target_true": "Italy"},
    "non-string target": {"case_id": "m10", "subject": "Paris", "prompt": "{} is in", "target_new": 42},
    "bad template": {"case_id": "m11", "subject": "Paris", "prompt": "{} is in {0}", "target_new": "Italy"},
    "empty paraphrase": {"case_id": "m12", "subject": "Paris", "prompt": "{} is in", "target_new": "Italy",
                         "paraphrase_prompts": [""]},
    "loader error": {"case_id": "m13", "_error": "missing field 'requested_rewrite'"},
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_record_names_record(kind):
    with pytest.raises(RecordError) as err:
        EditRequest.from_dict(MALFORMED[kind])
    assert err.value.record_id == MALFORMED[kind]["case_id"]
    assert repr(MALFORMED[kind]["case_id"]) in str(err.value)


def test_malformed_files_give_named_records(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"subject": "Paris", "prompt": "{} is in", "target_new": "Italy"}\n{oops\n[1, 2]\n')
    recs = load_facts(p)
    with pytest.raises(RecordError, match="bad.jsonl:2"):
        EditRequest.from_dict(recs[1])
    with pytest.raises(RecordError, match="bad.jsonl:3"):
        EditRequest.from_dict(recs[2])
    c = tmp_path / "bad.csv"
    c.write_text("subject,prompt,target_new\nParis,{} is in,Italy,extra\n")
    with pytest.raises(RecordError, match="more fields"):
        EditRequest.from_dict(load_csv_facts(c)[0])
    z = tmp_path / "z.json"
    z.write_text(json.dumps([{"subject": "X", "src": "What is Y?", "alt": "a", "answers": ["b"]}, 7]))
    with pytest.raises(RecordError, match="not in prompt"):
        EditRequest.from_dict(load_zsre(z)[0])
    with pytest.raises(RecordError, match="not an object"):
        EditRequest.from_dict(load_zsre(z)[1])
