"""Watching an editor collapsediag does not own: a hand-written ROME, independent of collapsediag's editors,
applied straight to the weights, gives the same denominators and norms as collapsediag's own ROME run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from collapsediag import EditSession, load_run, watch
from collapsediag.arch import get_module, weight_matrix
from collapsediag.editors import get_editor
from collapsediag.errors import CollapseDiagError
from tests.conftest import make_model

REQ = {"case_id": "a1", "subject": "Angola", "prompt": "{} is located in", "target_new": "Italy", "target_true": "Africa"}
TEMPLATES = ["{}", "The city of music. {}", "Because you said so. {}"]


def hand_rome(model, tok, module_name, req, templates, c, v_star):
    """ROME's rank-one update written from the paper: keys by a forward hook, u = C⁻¹k̄ / ‖C⁻¹k̄‖,
    ΔW = (v* − W k_u) uᵀ / (k_uᵀ u), added to the weight in place. Returns (k_u, k̄, u)."""
    module = model.get_submodule(module_name)
    keys, values = [], []
    for t in templates:
        filled = t.format(req["prompt"])
        text = filled.format(req["subject"])
        prefix = filled[:filled.index("{}")] + req["subject"]
        pos = len(tok(prefix)["input_ids"]) - 1
        seen = {}
        handle = module.register_forward_hook(lambda m, i, o: seen.update(k=i[0][0, pos], v=o[0, pos]))
        with torch.no_grad():
            model(input_ids=torch.tensor([tok(text)["input_ids"]]))
        handle.remove()
        keys.append(seen["k"].double())
        values.append(seen["v"].double())
    k_u, k_bar = keys[0], torch.stack(keys).mean(0)
    u = torch.linalg.solve(c, k_bar)
    u = u / u.norm()
    delta = torch.outer((v_star - values[0]) / (k_u @ u), u)
    with torch.no_grad():
        module.weight += delta.to(module.weight.dtype)
    return k_u, k_bar, u


def test_watched_hand_rome_matches_collapsediag_rome(tok, env_for, tmp_path):
    native_model = make_model("llama", len(tok))
    env = env_for(native_model, [1], tmp_path / "stats", templates=TEMPLATES)
    s = EditSession(native_model, tok, get_editor("rome", {"layer": 1, "v_num_grad_steps": 4}), out=tmp_path / "native",
                    stats=env.stats, templates=TEMPLATES, progress=False)
    s.edit(REQ)
    native = load_run(tmp_path / "native")
    row = native.layers.iloc[0]
    f = native.factors(0)
    name = env.arch.rewrite_name(1)

    model = make_model("llama", len(tok))  # the same unedited weights
    value = torch.from_numpy(f["left_1"][:, 0]).double() * row["denominator"]  # v* − W k_u, from the native run
    w = watch(model, tok, layers=[1], out=tmp_path / "watched", stats=env.stats, templates=TEMPLATES, progress=False)
    with w:
        w.begin(REQ)
        w0 = weight_matrix(get_module(model, name)).detach().double().clone()
        module = model.get_submodule(name)
        holder = {}
        h = module.register_forward_hook(lambda m, i, o: holder.update(v=o[0].double()))
        with torch.no_grad():
            model(input_ids=torch.tensor([tok(REQ["prompt"].format(REQ["subject"]))["input_ids"]]))
        h.remove()
        pos = len(tok(REQ["subject"])["input_ids"]) - 1
        v_star = holder["v"][pos] + value
        hand_rome(model, tok, name, REQ, TEMPLATES, env.stats[1].mom2.double(), v_star)
        w.step(REQ)
    watched = load_run(tmp_path / "watched")
    got = watched.layers.iloc[0]
    assert got["update_rank"] == 1
    for col in ("denominator_unprefixed", "denominator_consistent", "key_cosine", "delta_fro", "weight_fro",
                "update_ratio", "weight_sigma1", "drift_sigma1", "drift_concentration"):
        assert got[col] == pytest.approx(row[col], rel=1e-4), col
    e = watched.edits.iloc[0]
    assert e["efficacy"] == native.edits.iloc[0]["efficacy"] and e["p_new_before"] == pytest.approx(
        native.edits.iloc[0]["p_new_before"], rel=1e-5)
    assert watched.config["editor"] == "watched"
    rebuilt = watched.model_at(0, model=make_model("llama", len(tok)))
    assert torch.allclose(weight_matrix(get_module(rebuilt, name)).double(),
                          weight_matrix(get_module(model, name)).double(), atol=1e-6)
    assert not torch.equal(w0, weight_matrix(get_module(model, name)).double())


def test_wrap_steps_after_the_edit_function_and_checkpoints(tok, env_for, tmp_path):
    model = make_model("gpt2", len(tok))
    env = env_for(model, [1], tmp_path / "stats")
    name = env.arch.rewrite_name(1)
    g = torch.Generator().manual_seed(0)

    def my_edit(m, request, scale=0.05):  # a rank-two change, as a batched editor would make
        w = weight_matrix(get_module(m, name))
        with torch.no_grad():
            w += scale * torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)

    w = watch(model, tok, layers=[1], out=tmp_path / "run", stats=env.stats, templates=TEMPLATES, eval_every=2,
              eval_texts=["The city of music is known for its river."], generation_prompts=[], progress=False)
    edit = w.wrap(my_edit)
    with w:
        for i, subject in enumerate(("Angola", "Tokyo", "Paris")):
            edit(model, dict(REQ, case_id=f"c{i}", subject=subject))
    run = load_run(tmp_path / "run")
    assert run.layers["update_rank"].tolist() == [2, 2, 2]
    assert run.layers["denominator_unprefixed"].isna().all()  # only rank-one changes have ROME's denominators
    assert run.evals["edit_index"].tolist() == [-1, 1, 2]
    assert run.evals.iloc[0]["perplexity"] != run.evals.iloc[1]["perplexity"]  # the baseline is the unedited model
    with pytest.raises(CollapseDiagError, match="watched"):
        w.editor.compute()
    bad = dict(REQ, case_id="nan")
    with torch.no_grad():
        weight_matrix(get_module(model, name))[0, 0] = float("nan")
    with pytest.raises(CollapseDiagError, match="non-finite"):
        w.step(bad)
    assert len(load_run(tmp_path / "run").edits) == 3  # nothing recorded is lost
    assert np.isfinite(run.layers["weight_fro"]).all()
