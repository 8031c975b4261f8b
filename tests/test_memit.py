"""MEMIT and EMMET algebra, checked against independent solutions, on tiny GPT-2 and Llama models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from collapsediag.editors import apply_deltas, get_editor
from collapsediag.editors.keys import keys_at_subject, outputs_at_subject
from collapsediag.editors.memit import emmet_solve, memit_solve
from collapsediag.recorder import Recorder
from collapsediag.requests import EditRequest

REQS = [EditRequest(case_id=i, subject=s, prompt=p, target_new=n, target_true=t) for i, (s, p, n, t) in enumerate([
    ("Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
    ("Angola", "{} is located in", "Italy", "Africa"),
    ("Tokyo", "{} is a citizen of", "Spain", "Japan"),
])]


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (3 * d)


def test_memit_solve_is_the_regularised_least_squares_minimiser():
    d_in, d_out, n, lam = 12, 7, 4, 3.5
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    resid = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    c = _spd(d_in, 1)
    left, right, diag = memit_solve(keys, resid, c, lam)
    dw = (left @ right.T).numpy()
    # independent: min ‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ) as one stacked least-squares problem in ΔWᵀ
    chol = np.linalg.cholesky(c.numpy())
    a = np.vstack([keys.numpy().T, np.sqrt(lam) * chol.T])
    b = np.vstack([resid.numpy().T, np.zeros((d_in, d_out))])
    ref = np.linalg.lstsq(a, b, rcond=None)[0].T
    assert np.linalg.norm(dw - ref) / np.linalg.norm(ref) < 1e-6
    schur = keys.T @ torch.linalg.solve(lam * c + keys @ keys.T, keys)
    assert diag["denominator"] == pytest.approx(float(torch.linalg.eigvalsh(schur)[0]), rel=1e-9)
    ev = np.linalg.eigvalsh((lam * c + keys @ keys.T).numpy())
    assert diag["condition"]() == pytest.approx(ev[-1] / ev[0], rel=1e-4)  # lazy: computed only when recorded


def test_conditions_from_c_eigendecomposition_equal_the_dense_ones():
    d, n, lam, mu = 200, 3, 50.0, 0.5
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(d, n, generator=g, dtype=torch.float64)
    resid = torch.randn(5, n, generator=g, dtype=torch.float64)
    c = _spd(d, 5) + 1e-3 * torch.eye(d, dtype=torch.float64)
    eig = torch.linalg.eigh(c)
    calls = []

    def eigh():
        calls.append(1)
        return eig

    plain, fast = memit_solve(keys, resid, c, lam)[2], memit_solve(keys, resid, c, lam, eigh)[2]
    assert not calls  # lazy: nothing is decomposed unless the condition is recorded
    ev = torch.linalg.eigvalsh(lam * c + keys @ keys.T)
    assert fast["condition"]() == pytest.approx(float(ev[-1] / ev[0]), rel=1e-4) and calls
    assert fast["condition"]() == pytest.approx(plain["condition"](), rel=1e-4)
    plain = emmet_solve(keys, resid, c, lam, mu, 0.1)[2]
    fast = emmet_solve(keys, resid, c, lam, mu, 0.1, lambda: (float(eig[0][0]), float(eig[0][-1])))[2]
    ev = torch.linalg.eigvalsh(lam * c + mu * torch.eye(d, dtype=torch.float64))
    assert fast["condition_c"]() == pytest.approx(float(ev[-1] / ev[0]), rel=1e-9)
    assert plain["condition_c"]() == pytest.approx(float(ev[-1] / ev[0]), rel=1e-4)


def test_emmet_meets_its_constraints_and_is_rank_one_for_one_key():
    d_in, d_out, n = 12, 7, 5
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    resid = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    c = _spd(d_in, 3)
    left, right, diag = emmet_solve(keys, resid, c, 1.0, 0.0, 0.0)
    dw = left @ right.T
    assert (dw @ keys - resid).norm() / resid.norm() < 1e-5  # (W + ΔW)K = WK + R = Z
    assert not diag["pinv_fallback"]
    k, r = keys[:, :1], resid[:, :1]
    left, right, _ = emmet_solve(k, r, c, 1.0, 0.0, 0.1)  # the ridge is not used for one key
    c_inv_k = torch.linalg.solve(c, k)
    rank_one = r @ c_inv_k.T / float(k.T @ c_inv_k)
    assert (left @ right.T - rank_one).norm() / rank_one.norm() < 1e-9


def test_emmet_falls_back_to_pinv_for_repeated_keys():
    d_in, d_out = 10, 4
    k = torch.randn(d_in, 1, dtype=torch.float64)
    keys = torch.cat([k, k], dim=1)
    resid = torch.randn(d_out, 1, dtype=torch.float64).repeat(1, 2)
    left, right, diag = emmet_solve(keys, resid, _spd(d_in, 4), 1.0, 0.0, 0.0)
    assert diag["pinv_fallback"]
    assert torch.isfinite(left).all() and ((left @ right.T) @ keys - resid).norm() / resid.norm() < 1e-6


@pytest.mark.parametrize("editor", ["memit", "emmet"])
def test_batched_editor_is_pure_and_moves_hidden_state(tiny, env_for, tmp_path, editor):
    model, tok = tiny
    env = env_for(model, [0, 1, 2], tmp_path)
    hp = {"layers": [1, 2], "z_num_grad_steps": 4}
    if editor == "memit":
        hp["mom2_update_weight"] = 1.0
    ed = get_editor(editor, hp)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    rec = Recorder()
    deltas = ed.compute(model, tok, REQS, env, rec)
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n
    assert [d.layer for d in deltas] == [1, 2] and all(d.left.shape[1] == len(REQS) for d in deltas)
    assert {"denominator", "condition", "z_error"} <= set(rec.layers[1])
    assert "v_delta_norm" in rec.layers[2]
    block = env.arch.block_name(2)
    h0 = outputs_at_subject(model, tok, block, REQS)
    with apply_deltas(model, deltas):
        h1 = outputs_at_subject(model, tok, block, REQS)
    assert (h1 - h0).norm() > 1e-3 * h0.norm()
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n


def test_emmet_single_layer_writes_the_targets(tiny, env_for, tmp_path):
    """With one layer and no ridge, ΔW maps each mixed key exactly onto z − h (its residual)."""
    from collapsediag.arch import get_module, weight_matrix
    from collapsediag.editors.target import optimise_target

    model, tok = tiny
    env = env_for(model, [1], tmp_path)
    ed = get_editor("emmet", {"layers": [1], "z_num_grad_steps": 3, "emmet_lambda": 0.0})
    deltas = ed.compute(model, tok, REQS[:2], env, Recorder())
    name, block = env.arch.rewrite_name(1), env.arch.block_name(1)
    keys = torch.stack([keys_at_subject(model, tok, name, r, env.templates).mixed for r in REQS[:2]]).double().T
    z = torch.stack([optimise_target(model, tok, r, env.templates, block, ed.hparams.target_settings(),
                                     env.arch).target
                     for r in REQS[:2]]).double()
    h = outputs_at_subject(model, tok, block, REQS[:2]).double()
    w0 = weight_matrix(get_module(model, name)).double().clone()
    with apply_deltas(model, deltas):
        w1 = weight_matrix(get_module(model, name)).double()
    got, want = (w1 - w0) @ keys, (z - h).T
    assert (got - want).norm() / want.norm() < 1e-4


def test_memit_in_a_session_and_cli_layers(tiny, env_for, tmp_path):
    from collapsediag import EditSession, load_run
    from collapsediag.cli import parse_hparams
    from collapsediag.errors import CollapseDiagError

    model, tok = tiny
    env = env_for(model, [1, 2], tmp_path)
    ed = get_editor("memit", parse_hparams(["z_num_grad_steps=3", "mom2_update_weight=2"], [1, 2], "memit"))
    s = EditSession(model, tok, ed, out=tmp_path / "run", stats=env.stats, templates=env.templates, progress=False)
    s.run([{"case_id": r.case_id, "subject": r.subject, "prompt": r.prompt, "target_new": r.target_new,
            "target_true": r.target_true} for r in REQS[:2]], progress=False)
    run = load_run(tmp_path / "run")
    assert (run.edits["status"] == "ok").all()
    assert run.layers[["edit_index", "layer"]].values.tolist() == [[0, 1], [0, 2], [1, 1], [1, 2]]
    assert run.layers["denominator"].notna().all() and run.layers["z_error"].notna().all()
    rebuilt = run.model_at(1, model=__import__("tests.conftest", fromlist=["make_model"]).make_model(
        model.config.model_type, len(tok)))
    for k, v in rebuilt.state_dict().items():
        assert torch.allclose(v, model.state_dict()[k], rtol=1e-6, atol=0), k
    with pytest.raises(CollapseDiagError, match="one layer"):
        parse_hparams([], [1, 2], "rome")
