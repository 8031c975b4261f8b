"""D4S and AlphaEdit: their algebra against independent solutions, purity, state across edits and resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from collapsediag import EditSession, load_run
from collapsediag.arch import get_module, weight_matrix
from collapsediag.editors import get_editor
from collapsediag.editors.alphaedit import alphaedit_solve, null_space_basis
from collapsediag.editors.d4s import d4s_increment
from collapsediag.editors.memit import memit_solve
from collapsediag.errors import EditError
from collapsediag.recorder import Recorder
from collapsediag.stats import LayerStats

from collapsediag.stats import StatsCache, TextCorpus

from tests.conftest import corpus_texts, make_model
from tests.test_memit import REQS, _spd

RECORDS = [{"case_id": r.case_id, "subject": r.subject, "prompt": r.prompt, "target_new": r.target_new,
            "target_true": r.target_true} for r in REQS]


def _random(d: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(d, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2])
def test_d4s_steps_sum_to_one_batched_solve(n):
    d_in, d_out, lam, t = 10, 6, 2.0, 4
    c = _spd(d_in, 5)
    moved, kk = torch.zeros(d_out, d_in, dtype=torch.float64), torch.zeros(d_in, d_in, dtype=torch.float64)
    total = torch.zeros(d_out, d_in, dtype=torch.float64)
    ks, rs = [], []
    for s in range(t):
        k, r = _random(d_in, n, 10 + s), _random(d_out, n, 20 + s)
        left, right, diag = d4s_increment(k, r, moved, lam * c, kk)
        assert right.shape == (d_in, n) and left.shape == (d_out, n)
        total += left @ right.T
        moved, kk = moved + r @ k.T, kk + k @ k.T
        ks.append(k)
        rs.append(r)
        assert diag["cache_trace"] == pytest.approx(float(kk.trace()))
        ev = torch.linalg.eigvalsh(lam * c + kk)
        assert diag["condition"]() == pytest.approx(float(ev[-1] / ev[0]), rel=1e-6)
        assert 0 < diag["denominator"] < 1
    left, right, _ = memit_solve(torch.cat(ks, 1), torch.cat(rs, 1), c, lam)
    want = left @ right.T
    assert (total - want).norm() / want.norm() < 1e-9


def test_alphaedit_solve_matches_the_projected_formula_and_spares_preserved_keys():
    d_in, d_out, n, alpha = 12, 5, 3, 0.5
    c = _spd(d_in, 7)
    stats = LayerStats(0, c, 100)
    values, vectors = torch.linalg.eigh(c)
    threshold = float(values[d_in // 2])
    basis = null_space_basis(stats, threshold)
    assert basis.shape == (d_in, d_in // 2)
    keys, resid, kp = _random(d_in, n, 1), _random(d_out, n, 2), _random(d_in, 4, 3)
    kk_prev = kp @ kp.T
    left, right, diag = alphaedit_solve(keys, resid, basis, kk_prev, alpha)
    dw = left @ right.T
    p = basis @ basis.T
    a = p @ (keys @ keys.T + kk_prev) + alpha * torch.eye(d_in, dtype=torch.float64)
    want = torch.linalg.solve(a, p @ keys @ resid.T).T  # the reference form, ΔWᵀ = A⁻¹ P K Rᵀ
    assert (dw - want).norm() / want.norm() < 1e-9
    assert diag["projector_rank"] == d_in // 2
    preserved = vectors[:, d_in // 2:] @ _random(d_in - d_in // 2, 6, 4)  # keys in C's large-eigenvalue span
    assert (dw @ preserved).norm() / (dw.norm() * preserved.norm()) < 1e-4
    with pytest.raises(EditError, match="rank 0"):
        alphaedit_solve(keys, resid, basis[:, :0], kk_prev, alpha)


def _session(model, tok, env, name, hp, out):
    return EditSession(model, tok, get_editor(name, hp), out=out, stats=env.stats, templates=env.templates,
                       progress=False)


@pytest.mark.parametrize("name", ["d4s", "alphaedit"])
def test_stateful_editor_is_pure_with_state(tiny, env_for, tmp_path, name):
    model, tok = tiny
    env = env_for(model, [1, 2], tmp_path)
    hp = {"layers": [1, 2], "z_num_grad_steps": 3}
    hp.update({"mom2_update_weight": 1.0} if name == "d4s" else {"nullspace_threshold": 1e9})
    s = _session(model, tok, env, name, hp, None)
    s.edit(RECORDS[0])  # the model is now edited and the editor holds state
    before = {n: p.clone() for n, p in model.state_dict().items()}
    rec = Recorder()
    deltas = s.editor.compute(model, tok, [REQS[1]], s.env, rec)
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n
    assert [d.layer for d in deltas] == [1, 2]
    assert {"denominator", "condition", "z_error", "cache_trace"} <= set(rec.layers[1])
    if name == "alphaedit":
        assert rec.layers[1]["projector_rank"] == weight_matrix(get_module(model, env.arch.rewrite_name(1))).shape[1]


def test_d4s_sequence_equals_one_batched_solve_on_a_model(tiny, env_for, tmp_path):
    """t single D4S edits leave W₀ + (ΣRKᵀ)(λC + ΣKKᵀ)⁻¹ over the recorded keys and residuals."""
    model, tok = tiny
    env = env_for(model, [1, 2], tmp_path)
    lam = 0.5
    s = _session(model, tok, env, "d4s", {"layers": [1, 2], "z_num_grad_steps": 3, "mom2_update_weight": lam},
                 tmp_path / "run")
    rows = s.run(RECORDS, progress=False)
    assert all(r["status"] == "ok" for r in rows)
    run = load_run(tmp_path / "run")
    for layer in (1, 2):
        arrays = [run.factors(b) for b in range(3)]
        keys = torch.from_numpy(np.concatenate([a[f"state_keys_{layer}"] for a in arrays], 1))
        resid = torch.from_numpy(np.concatenate([a[f"state_resid_{layer}"] for a in arrays], 1))
        left, right, _ = memit_solve(keys, resid, env.stats[layer].mom2.double(), lam)
        want = left @ right.T
        got = weight_matrix(get_module(model, env.arch.rewrite_name(layer))).double() - s.w0[layer].double()
        assert want.norm() > 1e-2 * s.w0[layer].norm()  # a real change, not float noise
        assert (got - want).norm() / want.norm() < 1e-5
    traces = run.layers[run.layers["layer"] == 1]["cache_trace"].tolist()
    assert traces == sorted(traces) and traces[0] > 0


@pytest.mark.parametrize("name", ["d4s", "alphaedit"])
def test_stateful_editor_resumes_to_the_same_weights(tok, env_for, tmp_path, name):
    hp = {"layers": [1, 2], "z_num_grad_steps": 3}
    hp.update({"mom2_update_weight": 1.0} if name == "d4s" else {"nullspace_threshold": 1e9})
    full_model = make_model("llama", len(tok))
    env = env_for(full_model, [1, 2], tmp_path / "stats")
    _session(full_model, tok, env, name, hp, tmp_path / "full").run(RECORDS, progress=False)

    cut_model = make_model("llama", len(tok))
    _session(cut_model, tok, env, name, hp, tmp_path / "cut").run(RECORDS[:2], progress=False)
    fresh = make_model("llama", len(tok))
    resumed = EditSession.resume(tmp_path / "cut", fresh, tok, RECORDS, cache=StatsCache(tmp_path / "stats"),
                                 corpus=TextCorpus.from_texts(corpus_texts(300)), progress=False)
    assert resumed.n_edits == 2 and resumed.editor.commit() == {}
    resumed.run(RECORDS[2:], progress=False)
    for k, v in fresh.state_dict().items():
        assert torch.allclose(v, full_model.state_dict()[k], rtol=1e-5, atol=1e-7), k


def test_restore_clears_the_running_state(tiny, env_for, tmp_path):
    """After restore, a D4S step starts again from W₀: the same edit gives the same weights as the first time."""
    model, tok = tiny
    env = env_for(model, [1], tmp_path)
    s = _session(model, tok, env, "d4s", {"layers": [1], "z_num_grad_steps": 2, "mom2_update_weight": 1.0}, None)
    s.edit(RECORDS[0])
    first = weight_matrix(get_module(model, env.arch.rewrite_name(1))).clone()
    s.restore()
    assert s.editor.sums == {}
    s.edit(RECORDS[0])
    assert torch.allclose(weight_matrix(get_module(model, env.arch.rewrite_name(1))), first, rtol=1e-6, atol=1e-8)


def test_d4s_measures_every_step_on_the_unedited_weights(tok, env_for, tmp_path):
    """Step 2's keys and residuals equal those a fresh D4S finds for that record alone on W₀."""
    hp = {"layers": [1, 2], "z_num_grad_steps": 3, "mom2_update_weight": 1.0}
    model = make_model("gpt2", len(tok))
    env = env_for(model, [1, 2], tmp_path)
    _session(model, tok, env, "d4s", hp, tmp_path / "run").run(RECORDS[:2], progress=False)
    saved = load_run(tmp_path / "run").factors(1)
    state = {k: v for k, v in saved.items() if k.startswith("state_")}
    fresh = get_editor("d4s", hp)
    fresh.compute(make_model("gpt2", len(tok)), tok, [REQS[1]], env, Recorder())
    arrays = fresh.commit()
    for key in ("keys_1", "resid_1"):
        np.testing.assert_allclose(state[f"state_{key}"], arrays[key], rtol=1e-5, atol=1e-6)
    assert not np.allclose(state["state_resid_1"], load_run(tmp_path / "run").factors(0)["state_resid_1"])


def test_target_cache_is_shared_while_the_weights_are_the_same(tok, env_for, tmp_path):
    from collapsediag.editors.target import TargetCache, optimise_target

    hp = {"layers": [1, 2], "z_num_grad_steps": 3, "mom2_update_weight": 1.0}
    model = make_model("llama", len(tok))
    env = env_for(model, [1, 2], tmp_path)
    cache = TargetCache()
    kw = dict(stats=env.stats, templates=env.templates, progress=False, target_cache=cache)
    s = EditSession(model, tok, get_editor("memit", hp), **kw)
    s.run(RECORDS, batch_size=3)
    s.restore()
    assert (cache.hits, cache.misses) == (0, 3)
    s = EditSession(model, tok, get_editor("d4s", hp), **kw)
    s.run(RECORDS)  # every D4S step measures on W₀: all three targets come from the batch run
    assert (cache.hits, cache.misses) == (3, 3)
    cached = {n: p.clone() for n, p in model.state_dict().items()}
    s.restore()
    plain = EditSession(model, tok, get_editor("d4s", hp), stats=env.stats, templates=env.templates, progress=False)
    plain.run(RECORDS)
    for n, p in model.state_dict().items():
        assert torch.equal(p, cached[n]), n
    block = env.arch.block_name(2)
    settings = get_editor("memit", hp).hparams.target_settings()
    got = cache.get(model, tok, REQS[0], env.templates, block, settings, env.arch)  # weights now edited: miss
    assert cache.misses == 4
    want = optimise_target(model, tok, REQS[0], env.templates, block, settings, env.arch)
    assert torch.equal(got.target, want.target)


def test_d4s_residuals_once_or_remeasured(tiny, env_for, tmp_path):
    """The reference asks the last layer for the whole gap Z − H(W₀); re-measuring asks it for what is left."""
    model, tok = tiny
    env = env_for(model, [1, 2], tmp_path)
    out = {}
    for again in (False, True):
        ed = get_editor("d4s", {"layers": [1, 2], "z_num_grad_steps": 3, "mom2_update_weight": 1.0,
                                "remeasure_residuals": again})
        assert ed.residual_once is (not again)
        ed.compute(model, tok, [REQS[0]], env, Recorder())
        out[again] = ed.commit()
    np.testing.assert_allclose(out[False]["resid_1"], out[True]["resid_1"], rtol=1e-6)  # first layer: the same
    assert not np.allclose(out[False]["resid_2"], out[True]["resid_2"])
    assert np.linalg.norm(out[True]["resid_2"]) < np.linalg.norm(out[False]["resid_2"])
