"""ROME and r-ROME algebra on tiny GPT-2 (Conv1D) and Llama (Linear) models."""
from __future__ import annotations

import pytest
import torch

from collapsediag.arch import bias_vector, get_module, weight_matrix
from collapsediag.editors import apply_deltas, get_editor
from collapsediag.editors.keys import keys_at_subject
from collapsediag.editors.target import optimise_target
from collapsediag.errors import EditError
from collapsediag.recorder import Recorder
from collapsediag.requests import EditRequest

REQ = EditRequest(case_id=7, subject="Danielle Darrieux", prompt="The mother tongue of {} is",
                  target_new="English", target_true="French")
HP = {"layer": 1, "v_num_grad_steps": 6}


def _params(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _module_out(model, name, key):
    mod = get_module(model, name)
    b = bias_vector(mod)
    out = weight_matrix(mod).double() @ key.double()
    return out + b.double() if b is not None else out


@pytest.mark.parametrize("editor", ["rome", "r-rome"])
def test_edit_writes_target_value(tiny, env_for, tmp_path, editor):
    model, tok = tiny
    ed = get_editor(editor, HP)
    env = env_for(model, [1], tmp_path)
    name = env.arch.rewrite_name(1)
    deltas = ed.compute(model, tok, [REQ], env, Recorder())
    ks = keys_at_subject(model, tok, name, REQ, env.templates)
    v_star = optimise_target(model, tok, REQ, env.templates, name, ed.hparams.target_settings(), env.arch).target
    key = ks.unprefixed if editor == "rome" else ks.mean
    with apply_deltas(model, deltas):
        got = _module_out(model, name, key)
    rel = (got - v_star.double()).norm() / v_star.double().norm()
    assert rel < 1e-4


def test_compute_is_pure_and_revert_is_bitwise(tiny, env_for, tmp_path):
    model, tok = tiny
    before = _params(model)
    ed = get_editor("rome", HP)
    deltas = ed.compute(model, tok, [REQ], env_for(model, [1], tmp_path), Recorder())
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n
    handle = apply_deltas(model, deltas)
    assert not torch.equal(model.state_dict()[deltas[0].module + ".weight"], before[deltas[0].module + ".weight"])
    handle.revert()
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n


def test_square_conv1d_orientation(tok, env_for, tmp_path):
    """A square GPT-2 c_proj (n_inner == n_embd) cannot be oriented by shape: the module type decides."""
    from tests.conftest import make_model

    model = make_model("gpt2", len(tok), n_inner=32)
    env = env_for(model, [1], tmp_path)
    ed = get_editor("rome", HP)
    name = env.arch.rewrite_name(1)
    deltas = ed.compute(model, tok, [REQ], env, Recorder())
    ks = keys_at_subject(model, tok, name, REQ, env.templates)
    v_star = optimise_target(model, tok, REQ, env.templates, name, ed.hparams.target_settings(), env.arch).target
    with apply_deltas(model, deltas):
        good = (_module_out(model, name, ks.unprefixed) - v_star.double()).norm() / v_star.double().norm()
        # the hooked forward pass agrees with the algebra: the stored Conv1D weight really changed as Wᵀ
        out = keys_at_subject(model, tok, name, REQ, env.templates).values[0].double()
    assert good < 1e-4
    assert (out - v_star.double()).norm() / v_star.double().norm() < 1e-4
    wrong = weight_matrix(get_module(model, name)).double() + deltas[0].dense().double().T
    b = bias_vector(get_module(model, name)).double()
    assert ((wrong @ ks.unprefixed.double() + b) - v_star.double()).norm() / v_star.double().norm() > 1e-2


def _independent_keys(model, tok, name, texts_and_idx):
    """Keys read with a plain torch hook, not collapsediag's Trace."""
    keys = []
    mod = get_module(model, name)
    for text, idx in texts_and_idx:
        box = {}

        def hook(_m, inputs, _o, box=box):
            box.setdefault("k", inputs[0].detach())

        h = mod.register_forward_hook(hook)
        try:
            with torch.no_grad():
                model(**tok(text, return_tensors="pt"))
        finally:
            h.remove()
        keys.append(box["k"][0, idx].double())
    return torch.stack(keys)


@pytest.mark.parametrize("editor", ["rome", "r-rome"])
def test_recorded_denominator(tiny, env_for, tmp_path, editor):
    model, tok = tiny
    env = env_for(model, [1], tmp_path)
    rec = Recorder()
    get_editor(editor, HP).compute(model, tok, [REQ], env, rec)
    name = env.arch.rewrite_name(1)
    items = []
    for t in env.templates:
        text = t.format(REQ.prompt).format(REQ.subject)
        end = text.index(REQ.subject) + len(REQ.subject)
        offs = tok(text, return_offsets_mapping=True)["offset_mapping"]
        items.append((text, max(i for i, (a, b) in enumerate(offs) if a < end and b > a)))
    keys = _independent_keys(model, tok, name, items)
    c_inv = torch.linalg.inv(env.stats[1].mom2.double())
    k_bar = keys.mean(0)
    u = c_inv @ k_bar
    u = u / u.norm()
    expected = keys[0] @ u if editor == "rome" else k_bar @ u
    got = rec.layers[1]["denominator"]
    assert abs(got - float(expected)) <= 1e-6 * max(1.0, abs(float(expected)))
    assert abs(rec.layers[1]["denominator_consistent"] - float(k_bar @ u)) <= 1e-6 * max(1.0, abs(float(k_bar @ u)))


def test_rome_refuses_batches(tiny, env_for, tmp_path):
    model, tok = tiny
    with pytest.raises(EditError, match="one fact at a time"):
        get_editor("rome", HP).compute(model, tok, [REQ, REQ], env_for(model, [1], tmp_path), Recorder())
