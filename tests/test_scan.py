"""Pre-edit risk scan on tiny GPT-2 (Conv1D) and Llama (Linear) models."""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from collapsediag import EditSession, get_editor
from collapsediag.signals.scan import COLUMNS, SIGNALS, read_scan, scan, write_scan

RECORDS = [
    {"case_id": 11, "subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is", "target_new": "English",
     "target_true": "French"},
    {"case_id": 12, "subject": "Angola", "prompt": "{} is located in", "target_new": "Europe",
     "target_true": "Africa"},
    {"case_id": 13, "subject": "Toko Yasuda", "prompt": "{} plays the", "target_new": "piano",
     "target_true": "guitar"},
    {"case_id": 14, "subject": "the Nile", "prompt": "I think {} was born in", "target_new": "Japan"},
]
BAD = [
    {"case_id": "bad-not-in-prompt", "subject": "Tokyo", "prompt_filled": "Paris is in", "target_new": "Spain"},
    {"case_id": "bad-empty-target", "subject": "Tokyo", "prompt": "{} is in", "target_new": "  "},
    {"case_id": "bad-missing-subject", "prompt": "{} is in", "target_new": "Spain"},
    "not a record",
]
LAYER = 1
TEMPLATES = ["{}", "The city of music. {}", "Because you said so. {}", "I said the river is old. {}"]
HP = {"layer": LAYER, "v_num_grad_steps": 2}


def _params(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _close(a, b, rtol=1e-5):
    return abs(a - b) <= rtol * max(abs(a), abs(b))


@pytest.mark.parametrize("editor", ["rome", "r-rome"])
def test_matches_real_edit_layers_table(tiny, env_for, tmp_path, editor):
    """Same statistics, same generated templates: the scan's numbers are those the edit records."""
    model, tok = tiny
    stats = env_for(model, [LAYER], tmp_path).stats
    session = EditSession(model, tok, get_editor(editor, HP), out=None, stats=stats, seed=0, progress=False)
    logged = []
    for record in RECORDS[:3]:
        row = session.edit(record)
        assert row["status"] == "ok", row["status"]
        logged.append(session.layer_rows[-1])
        session.restore()  # every edit from the unedited weights
    df = scan(model, tok, RECORDS[:3], LAYER, editor=editor, stats=stats, seed=0, progress=False)
    assert df.attrs["context_templates"] == session.env.templates
    assert df.attrs["stats"] == stats[LAYER].identity
    by_case = df.set_index("case_id")
    for record, lay, edit in zip(RECORDS, logged, session.edits):
        got = by_case.loc[str(record["case_id"])]
        # ROME's layers table holds k_uᵀu in `denominator`, r-ROME's k̄ᵀu: the scan follows its editor
        for name in ("denominator", "denominator_consistent", "key_norm_unprefixed", "key_norm_prefixed",
                     "key_cosine", "key_mahalanobis_unprefixed", "key_mahalanobis_prefixed"):
            assert _close(got[name], lay[name]), (name, got[name], lay[name])
        assert bool(got["subject_first_token"]) == edit["subject_first_token"]
        assert got["subject_last_piece"] == edit["subject_last_piece"]
        if editor == "r-rome":
            assert got["denominator"] == got["denominator_consistent"]


def test_denominators_of_both_editors_from_one_scan(tiny, env_for, tmp_path):
    """A ROME scan carries r-ROME's denominator too (denominator_consistent), and their ratio."""
    model, tok = tiny
    env = env_for(model, [LAYER], tmp_path, templates=TEMPLATES)
    rows = {}
    for editor in ("rome", "r-rome"):
        s = EditSession(model, tok, get_editor(editor, HP), out=None, stats=env.stats, templates=TEMPLATES,
                        progress=False)
        s.edit(RECORDS[1])
        rows[editor] = s.layer_rows[-1]
    got = scan(model, tok, [RECORDS[1]], LAYER, stats=env.stats, templates=TEMPLATES, progress=False).iloc[0]
    assert _close(got["denominator"], rows["rome"]["denominator"])
    assert _close(got["denominator_consistent"], rows["r-rome"]["denominator"])
    assert _close(got["denominator_ratio"], rows["rome"]["denominator"] / rows["r-rome"]["denominator"])
    # both editors record k_uᵀu as denominator_unprefixed: the scan's ROME denominator
    for editor in ("rome", "r-rome"):
        assert _close(got["denominator"], rows[editor]["denominator_unprefixed"]), editor


def test_scan_changes_no_parameter(tiny, env_for, tmp_path):
    model, tok = tiny
    before = _params(model)
    scan(model, tok, RECORDS, LAYER, stats=env_for(model, [LAYER], tmp_path).stats, templates=TEMPLATES,
         progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for n, p in after.items():
        assert torch.equal(p, before[n]), n
    assert not any(len(m._forward_hooks) for m in model.modules())


def test_batching_and_prefix_sharing_keep_values(tiny, env_for, tmp_path, caplog):
    model, tok = tiny
    stats = env_for(model, [LAYER], tmp_path).stats
    records = RECORDS * 3  # repeats: equal prompts in one batch
    ref = scan(model, tok, records, LAYER, stats=stats, templates=TEMPLATES, batch_size=1, share_prefix=False,
               progress=False).sort_values("record_index")
    for batch_size, share in ((1, True), (5, True), (64, False), (64, True)):
        with caplog.at_level(logging.WARNING, logger="collapsediag"):
            got = scan(model, tok, records, LAYER, stats=stats, templates=TEMPLATES, batch_size=batch_size,
                       share_prefix=share, progress=False).sort_values("record_index")
        # no fallback: the shared prefix cache agreed with full forwards
        assert not [r for r in caplog.records if r.name == "collapsediag"]
        for name in SIGNALS:
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, err_msg=f"{name} {batch_size} {share}")
    # repeated records give the same numbers
    vals = ref["denominator"].to_numpy()
    np.testing.assert_allclose(vals[: len(RECORDS)], vals[len(RECORDS):2 * len(RECORDS)], rtol=1e-5)


def test_common_prefix_leaves_the_last_token():
    from collapsediag.signals.scan import _common_prefix, _groups

    assert _common_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 7]]) == 2
    assert _common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    groups = _groups([[[9], [1, 2, 3, 4]], [[8], [1, 2, 3, 5, 6]]], share=True)
    assert groups == {(): [(0, 0, [9]), (1, 0, [8])], (1, 2, 3): [(0, 1, [4]), (1, 1, [5, 6])]}


def test_without_statistics_identity(tiny):
    model, tok = tiny
    df = scan(model, tok, RECORDS[:2], LAYER, stats={}, templates=TEMPLATES, progress=False)
    assert df.attrs["stats"] is None
    row = df.iloc[0]
    # u = k̄/‖k̄‖: k̄ᵀu = ‖k̄‖, and √(kᵀk) = ‖k‖
    assert _close(row["denominator_consistent"], row["key_norm_mean"])
    assert _close(row["key_mahalanobis_unprefixed"], row["key_norm_unprefixed"])
    assert _close(row["denominator"], row["key_cosine"] * row["key_norm_unprefixed"])


def test_bad_records_are_reported_and_ranked_last(tiny, env_for, tmp_path, caplog):
    model, tok = tiny
    records = [BAD[0], RECORDS[0], BAD[1], RECORDS[1], BAD[2], BAD[3], RECORDS[2]]
    with caplog.at_level(logging.WARNING, logger="collapsediag"):
        df = scan(model, tok, records, LAYER, stats=env_for(model, [LAYER], tmp_path).stats, templates=TEMPLATES,
                  progress=False)
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == len(records)
    assert df["risk_rank"].tolist() == list(range(1, len(records) + 1))
    ok = df[df["status"] == "ok"]
    assert sorted(ok["case_id"]) == ["11", "12", "13"]
    assert ok[list(SIGNALS)].notna().all().all()
    assert (ok["denominator"].abs().diff().dropna() >= 0).all()
    bad = df[df["status"] != "ok"]
    assert bad["risk_rank"].min() > ok["risk_rank"].max()
    assert bad[list(SIGNALS)].isna().all().all()
    assert set(bad["case_id"]) == {"bad-not-in-prompt", "bad-empty-target", "bad-missing-subject", "5"}
    assert bad.set_index("case_id").loc["bad-not-in-prompt", "status"].startswith("RecordError")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4
    for cid in ("bad-not-in-prompt", "bad-empty-target", "bad-missing-subject"):
        assert sum(cid in w for w in warnings) == 1


def test_left_padding_is_refused(tiny):
    model, tok = tiny
    tok.padding_side = "left"
    try:
        with pytest.raises(Exception, match="right padding"):
            scan(model, tok, RECORDS[:1], LAYER, stats={}, templates=TEMPLATES, progress=False)
    finally:
        tok.padding_side = "right"


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_write_read_round_trip(tok, env_for, tmp_path, ext):
    from tests.conftest import make_model

    model = make_model("llama", len(tok))
    df = scan(model, tok, RECORDS + BAD[:2], LAYER, stats=env_for(model, [LAYER], tmp_path).stats,
              templates=TEMPLATES, progress=False)
    path = write_scan(df, tmp_path / f"scan.{ext}")
    assert (tmp_path / f"scan.{ext}.meta.json").exists()
    assert json.loads((tmp_path / f"scan.{ext}.meta.json").read_text())["layer"] == LAYER
    back = read_scan(path)
    pd.testing.assert_frame_equal(back, df)
    assert back.attrs == df.attrs
    for key in ("model", "model_fingerprint", "layer", "editor", "seed", "context_templates", "stats"):
        assert key in back.attrs
    if ext == "parquet":
        import pyarrow.parquet as pq

        (tmp_path / f"scan.{ext}.meta.json").unlink()  # the file's own metadata is enough
        assert b"collapsediag.scan" in pq.read_schema(path).metadata
        assert read_scan(path).attrs == df.attrs


def test_cache_fallback_gives_the_same_values(tiny, env_for, tmp_path, caplog, monkeypatch):
    """Where the model's attention cache cannot be trusted, every sequence runs in full (one warning)."""
    import importlib

    scan_mod = importlib.import_module("collapsediag.signals.scan")  # the module (collapsediag.scan is the function)
    model, tok = tiny
    stats = env_for(model, [LAYER], tmp_path).stats
    ref = scan(model, tok, RECORDS, LAYER, stats=stats, templates=TEMPLATES, progress=False)
    monkeypatch.setattr(scan_mod, "_prefix_cache", lambda *a: None)
    with caplog.at_level(logging.WARNING, logger="collapsediag"):
        got = scan(model, tok, RECORDS, LAYER, stats=stats, templates=TEMPLATES, progress=False)
    assert len([r for r in caplog.records if r.name == "collapsediag"]) == 1
    for name in SIGNALS:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5)


def test_empty_and_all_bad(tiny):
    model, tok = tiny
    empty = scan(model, tok, [], LAYER, stats={}, templates=TEMPLATES, progress=False)
    assert list(empty.columns) == list(COLUMNS) and len(empty) == 0
    bad = scan(model, tok, BAD, LAYER, stats={}, templates=TEMPLATES, progress=False)
    assert (bad["status"] != "ok").all() and bad["denominator"].isna().all()


def test_scan_command_writes_every_layer_sorted_by_risk(tok, tmp_path, capsys):
    from collapsediag.cli import main
    from tests.conftest import corpus_texts, make_model

    model = make_model("llama", len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(corpus_texts(300)))
    out = tmp_path / "scan.csv"
    code = main(["scan", "--model", str(tmp_path / "model"), "--data", f"facts:{facts}", "--layers", "1", "2",
                 "--out", str(out), "--stats-corpus", str(corpus), "--stats-tokens", "6000",
                 "--cache-dir", str(tmp_path / "cache"), "--top", "3", "-q"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "risk_rank" in printed and f"{2 * len(RECORDS)} rows" in printed
    df = read_scan(out)
    assert len(df) == 2 * len(RECORDS) and sorted(df["layer"].unique()) == [1, 2]
    assert df["risk_rank"].is_monotonic_increasing
    assert df.attrs["layer"] == [1, 2] and set(df.attrs["stats"]) == {"1", "2"}
    for layer, g in df.groupby("layer"):
        assert g.sort_values("risk_rank")["denominator"].abs().is_monotonic_increasing
    assert main(["scan", "--data", f"facts:{facts}", "--layers", "1", "--out", str(tmp_path / "x.txt")]) == 2
