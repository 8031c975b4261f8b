"""One target optimisation for a whole batch equals the requests optimised one at a time."""
from __future__ import annotations

import pytest
import torch

from collapsediag.arch import arch_for
from collapsediag.editors import get_editor, target
from collapsediag.editors.prompts import stack_batches, target_batch
from collapsediag.editors.target import (CACHE_VERSION, TargetCache, TargetSettings, optimise_target,
                                        optimise_targets)
from collapsediag.recorder import Recorder
from collapsediag.requests import EditRequest

from conftest import make_model
from tests.test_memit import REQS

MORE = REQS + [EditRequest(case_id=9, subject="Paris", prompt="{} is the capital of", target_new="London music",
                           target_true="France")]
TEMPLATES = ["{}", "The city of music. {}", "Because you said so and more. {}"]


def _both(model, tok, settings, module, reqs=MORE):
    arch = arch_for(model)
    one = [optimise_target(model, tok, r, TEMPLATES, module, settings, arch) for r in reqs]
    together = optimise_targets(model, tok, reqs, TEMPLATES, module, settings, arch)
    return one, together


def _assert_same(one, together, rtol=1e-4):
    for a, b in zip(one, together):
        assert a.steps == b.steps and a.mpes_step == b.mpes_step
        assert torch.allclose(a.init, b.init, rtol=rtol, atol=1e-6)
        assert torch.allclose(a.delta, b.delta, rtol=rtol, atol=1e-5 * float(a.delta.norm()))
        assert b.loss == pytest.approx(a.loss, rel=rtol, abs=1e-7)
        assert b.kl == pytest.approx(a.kl, rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("kind, rows", [("gpt2", 32), ("llama", 32), ("llama", 5)])
def test_batched_targets_equal_one_at_a_time_with_different_stops(tok, kind, rows, monkeypatch):
    model = make_model(kind, len(tok), initializer_range=0.3)  # large weights: δ moves the loss
    arch = arch_for(model)
    monkeypatch.setattr(target, "ROWS_PER_PASS", rows)  # 5 rows: requests split across passes
    settings = TargetSettings(steps=12, lr=0.5, weight_decay=0.1, clamp_norm_factor=100.0)
    start = [optimise_target(model, tok, r, TEMPLATES, arch.block_name(1), TargetSettings(steps=1), arch).loss
             for r in MORE]
    end = [optimise_target(model, tok, r, TEMPLATES, arch.block_name(1), settings, arch).loss for r in MORE]
    # an early-stop threshold that the request with the largest fall crosses midway
    q = max(range(len(MORE)), key=lambda i: start[i] - end[i])
    monkeypatch.setattr(target, "EARLY_STOP", (start[q] + end[q]) / 2)
    one, together = _both(model, tok, settings, arch.block_name(1))
    assert len({o.steps for o in one}) > 1 and 0 < one[q].steps < 11, [o.steps for o in one]
    _assert_same(one, together)


def test_batched_targets_keep_each_requests_clamp_and_mpes(tok):
    model = make_model("llama", len(tok), initializer_range=0.3)
    arch = arch_for(model)
    clamped = TargetSettings(steps=6, lr=1.0, clamp_norm_factor=0.05)
    one, together = _both(model, tok, clamped, arch.block_name(1))
    for o, t in zip(one, together):  # every δ sits on its own request's clamp sphere
        assert float(t.delta.norm()) == pytest.approx(0.05 * float(t.init.norm()), rel=1e-4)
    _assert_same(one, together)
    model = make_model("llama", len(tok))
    mpes = TargetSettings(steps=40, lr=0.5, weight_decay=0.0, clamp_norm_factor=10.0, kl_factor=0.0, mpes=2)
    city = EditRequest(case_id=7, subject="Tokyo", prompt="The city of {}", target_new="city", target_true="music")
    one, together = _both(model, tok, mpes, arch.block_name(1), [city] + MORE)
    assert one[0].mpes_step is not None and any(o.mpes_step is None for o in one)  # stops at different steps
    _assert_same(one, together)


@pytest.mark.parametrize("editor", ["memit", "emmet", "alphaedit", "encore", "d4s"])
def test_batched_editor_updates_equal_one_at_a_time(tiny, env_for, tmp_path, editor):
    model, tok = tiny
    env = env_for(model, [0, 1, 2], tmp_path)
    hp = {"layers": [1, 2], "z_num_grad_steps": 6}
    deltas = {}
    for batched in (True, False):
        rec = Recorder()
        ed = get_editor(editor, {**hp, "batch_target": batched})
        deltas[batched] = ed.compute(model, tok, REQS, env, rec)
        steps = rec.layers[2]["v_steps"]
    assert steps > 0
    for a, b in zip(deltas[True], deltas[False]):
        dw_a, dw_b = a.left @ a.right.T, b.left @ b.right.T
        assert (dw_a - dw_b).norm() <= 1e-4 * dw_b.norm()


def test_stacked_batch_rows_know_their_request(tok):
    batches = [target_batch(tok, r, TEMPLATES) for r in MORE]
    sb = stack_batches(tok, batches)
    assert len(sb.ids) == sum(len(b.ids) for b in batches) and sb.n_requests == len(MORE)
    for q, b in enumerate(batches):
        assert int((sb.request == q).sum()) == len(b.ids)
        assert int((sb.token[sb.request[sb.rows] == q] >= 0).sum()) == b.n_tok
        assert int(sb.request[sb.first_row[q]]) == q
        first = sb.ids[sb.first_row[q], :int(sb.mask[sb.first_row[q]].sum())]
        assert first.tolist() == b.ids[0, :int(b.mask[0].sum())].tolist()  # the first template's row
    parts = sb.passes(5)
    assert sum(len(p.ids) for p in parts) == len(sb.ids) and max(len(p.ids) for p in parts) == 5
    assert sum(len(p.rows) for p in parts) == len(sb.rows)
    # a request's NLL weights sum to 1 over its target tokens (the mean over prompts and tokens)
    w = torch.zeros(len(MORE)).index_add(0, sb.request[sb.rows][sb.token >= 0], sb.weight[sb.token >= 0])
    assert torch.allclose(w, torch.ones(len(MORE)))


def test_cache_reuses_targets_of_a_batch(tok):
    model = make_model("llama", len(tok))
    arch = arch_for(model)
    cache = TargetCache()
    settings = TargetSettings(steps=3)
    first = cache.get_many(model, tok, MORE[:2], TEMPLATES, arch.block_name(1), settings, arch)
    again = cache.get_many(model, tok, MORE[:3], TEMPLATES, arch.block_name(1), settings, arch)
    assert (cache.hits, cache.misses) == (2, 3)
    assert again[0] is first[0] and again[1] is first[1]


def test_a_cache_on_disk_gives_another_process_the_same_targets(tok, tmp_path):
    model = make_model("llama", len(tok))
    arch = arch_for(model)
    settings = TargetSettings(steps=3)
    first = TargetCache(tmp_path / "targets").get_many(model, tok, MORE[:2], TEMPLATES, arch.block_name(1),
                                                       settings, arch)
    assert len(list((tmp_path / "targets").glob("*.pt"))) == 2
    fresh = TargetCache(tmp_path / "targets")  # as a later process would open it
    again = fresh.get_many(model, tok, MORE[:2], TEMPLATES, arch.block_name(1), settings, arch)
    assert (fresh.hits, fresh.misses) == (2, 0)
    for a, b in zip(first, again):
        assert torch.equal(a.delta, b.delta) and torch.equal(a.init, b.init) and a.steps == b.steps
    with torch.no_grad():  # other weights: other keys, nothing read from disk
        arch_w = model.get_submodule(arch.rewrite_name(0)).weight
        arch_w.add_(0.01)
    other = TargetCache(tmp_path / "targets")
    other.get_many(model, tok, MORE[:1], TEMPLATES, arch.block_name(1), settings, arch)
    assert (other.hits, other.misses) == (0, 1)


def test_keys_of_a_batch_equal_each_requests_keys(tok, monkeypatch):
    from collapsediag.editors import keys as keys_mod

    model = make_model("llama", len(tok))
    module = arch_for(model).rewrite_name(1)
    alone = [keys_mod.keys_at_subject(model, tok, module, r, TEMPLATES) for r in MORE]
    monkeypatch.setattr(keys_mod, "ROWS_PER_FORWARD", 5)  # rows of one request in two forwards
    together = keys_mod.keys_at_subjects(model, tok, module, MORE, TEMPLATES)
    for a, b in zip(alone, together):
        assert b.keys.shape == (len(TEMPLATES), a.keys.shape[1])
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
    assert not torch.allclose(together[0].keys, together[1].keys)


def test_the_disk_cache_key_holds_the_model_the_mode_and_the_version(tok, tmp_path):
    model = make_model("llama", len(tok))
    arch = arch_for(model)
    settings = TargetSettings(steps=3)
    TargetCache(tmp_path / "t").get_many(model, tok, MORE[:1], TEMPLATES, arch.block_name(1), settings, arch)
    one_at_a_time = TargetCache(tmp_path / "t")
    one_at_a_time.get_many(model, tok, MORE[:1], TEMPLATES, arch.block_name(1), settings, arch, batched=False)
    assert (one_at_a_time.hits, one_at_a_time.misses) == (0, 1)
    with torch.no_grad():  # a weight no editor rewrites (the embeddings): another model, nothing reused
        model.get_input_embeddings().weight.mul_(1.5)
    other = TargetCache(tmp_path / "t")
    other.get_many(model, tok, MORE[:1], TEMPLATES, arch.block_name(1), settings, arch)
    assert (other.hits, other.misses) == (0, 1)
    key = other.key(model, MORE[0], TEMPLATES, arch.block_name(1), settings, arch)
    assert key[0] == CACHE_VERSION
