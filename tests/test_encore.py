"""ENCORE (ALGORITHMS.md §14): its solve against the normal equations and an independent MEMIT-seq solve,
and MPES in the shared target optimisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from collapsediag import EditSession, load_run
from collapsediag.arch import get_module, weight_matrix
from collapsediag.editors import get_editor
from collapsediag.editors.encore import encore_solve
from collapsediag.editors.prompts import stack_batches
from collapsediag.editors.target import (TargetSettings, all_top_per_request, mpes_count, optimise_target,
                                          target_batch)
from collapsediag.errors import HParamError
from collapsediag.requests import EditRequest

from tests.test_memit import _spd
from tests.test_sequential_editors import RECORDS, _random


def test_encore_update_satisfies_its_normal_equations():
    """ΔW minimises λ_p‖ΔW K₀‖² + ‖ΔW K_p‖² + ‖ΔW K − R‖² + λ_n‖ΔW‖²: ΔW (λ_pC + λ_nI + K_pK_pᵀ + KKᵀ) = R Kᵀ."""
    d_in, d_out, n = 9, 5, 3
    c, kp = _spd(d_in, 1), _random(d_in, 4, 2)
    k, r = _random(d_in, n, 3), _random(d_out, n, 4)
    lam_p, lam_n = 3.0, 0.7
    left, right, diag = encore_solve(k, r, c, lam_p, lam_n, kp @ kp.T)
    dw = left @ right.T
    a = lam_p * c + lam_n * torch.eye(d_in, dtype=torch.float64) + kp @ kp.T + k @ k.T
    assert torch.allclose(dw @ a, r @ k.T, atol=1e-10)
    # and it is the minimiser: the objective's gradient is zero, a perturbation raises it
    def objective(x):
        return (lam_p * torch.trace(x @ c @ x.T) + (x @ kp).pow(2).sum() + (x @ k - r).pow(2).sum()
                + lam_n * x.pow(2).sum())
    assert objective(dw) < objective(dw + 1e-3 * _random(d_out, d_in, 5))
    assert diag["denominator"] > 0 and diag["cache_trace"] == pytest.approx(float(kp.pow(2).sum() + k.pow(2).sum()))


def test_encore_norm_penalty_shrinks_the_update():
    d_in, d_out = 9, 5
    c, k, r = _spd(d_in, 1), _random(d_in, 2, 3), _random(d_out, 2, 4)
    norms = [float((lambda lr: (lr[0] @ lr[1].T).norm())(encore_solve(k, r, c, 1.0, lam_n, None)))
             for lam_n in (0.0, 1.0, 10.0)]
    assert norms[0] > norms[1] > norms[2]


def test_encore_without_norm_penalty_and_mpes_is_memit_seq_on_a_model(tiny, env_for, tmp_path):
    """λ_n = 0, MPES off: each batch's update is R Kᵀ (λC + Σ_{earlier} K_pK_pᵀ + KKᵀ)⁻¹, solved here
    independently (torch.linalg.solve) from the keys and factors the run stored."""
    model, tok = tiny
    env = env_for(model, [1, 2], tmp_path)
    lam = 0.5
    hp = {"layers": [1, 2], "z_num_grad_steps": 3, "mom2_update_weight": lam, "update_norm_lambda": 0.0, "mpes": 0}
    s = EditSession(model, tok, get_editor("encore", hp), out=tmp_path / "run", stats=env.stats,
                    templates=env.templates, progress=False)
    rows = s.run(RECORDS, batch_size=1, progress=False)
    assert all(r["status"] == "ok" for r in rows)
    run = load_run(tmp_path / "run")
    for layer in (1, 2):
        c = env.stats[layer].mom2.double()
        kk = torch.zeros_like(c)
        for b in range(len(RECORDS)):
            f = run.factors(b)
            keys = torch.from_numpy(f[f"state_keys_{layer}"]).double()
            resid = torch.from_numpy(f[f"left_{layer}"]).double()  # left = R for this family
            want = torch.linalg.solve(lam * c + kk + keys @ keys.T, keys @ resid.T).T  # R Kᵀ A⁻¹ (A symmetric)
            got = resid @ torch.from_numpy(f[f"right_{layer}"]).double().T
            assert (got - want).norm() / want.norm() < 1e-4, (layer, b)
            kk = kk + keys @ keys.T
    assert np.isnan(run.layers["v_mpes_step"]).all()


def test_mpes_stops_early_and_records_the_step(tiny, env_for, tmp_path):
    """A one-token target soon becomes the argmax on every prefixed prompt: MPES stops after 2 such steps, the
    plain optimisation runs on to its step cap (and lowers the loss further)."""
    model, tok = tiny
    env = env_for(model, [1], tmp_path)
    req = EditRequest(case_id=0, subject="Tokyo", prompt="The city of {}", target_new="city", target_true="music")
    base = dict(steps=40, lr=0.5, weight_decay=0.0, clamp_norm_factor=10.0, kl_factor=0.0)
    module = env.arch.block_name(1)
    plain = optimise_target(model, tok, req, env.templates, module, TargetSettings(**base), env.arch)
    early = optimise_target(model, tok, req, env.templates, module, TargetSettings(**base, mpes=2), env.arch)
    assert plain.mpes_step is None and plain.steps == 39
    assert early.mpes_step is not None and early.steps == early.mpes_step < plain.steps
    assert early.loss > plain.loss


def test_all_top_per_request_ignores_the_bare_prompt(tok):
    req = EditRequest(case_id=0, subject="Tokyo", prompt="The city of {}", target_new="city", target_true="music")
    other = EditRequest(case_id=1, subject="Paris", prompt="{} is in", target_new="city", target_true="music")
    templates = ["{}", "A. {}", "B. {}"]
    sb = stack_batches(tok, [target_batch(tok, req, templates), target_batch(tok, other, templates)])
    assert sb.prefixed[sb.request == 0].tolist().count(True) == 2  # two prefixed prompts, the bare one and KL not
    tok_pos = (sb.token >= 0).nonzero().squeeze(1)
    rows, token = sb.rows[tok_pos], sb.token[tok_pos]
    logp = torch.full((len(tok_pos), len(tok)), -10.0)
    logp[torch.arange(len(tok_pos)), token] = 0.0  # every target token on top ...
    assert all_top_per_request(logp, sb, tok_pos).tolist() == [True, True]
    bare = (sb.request[rows] == 0) & ~sb.prefixed[rows]
    logp[bare, token[0] + 1] = 1.0  # ... the bare prompt missing does not count
    assert all_top_per_request(logp, sb, tok_pos).tolist() == [True, True]
    pre = ((sb.request[rows] == 1) & sb.prefixed[rows]).nonzero()[0]
    logp[pre, token[pre] + 1] = 1.0  # a prefixed prompt of request 1 misses: only request 1 fails
    assert all_top_per_request(logp, sb, tok_pos).tolist() == [True, False]


def test_mpes_setting_accepts_encore_sign():
    assert mpes_count(-3) == 3 and mpes_count(2) == 2 and mpes_count(0) == 0
    with pytest.raises(ValueError):
        mpes_count(1.5)
    with pytest.raises(HParamError, match="mpes"):
        get_editor("memit", {"mpes": 1.5})
    assert get_editor("rome", {"mpes": -2}).hparams.target_settings().mpes == 2
    assert get_editor("encore").hparams.target_settings().mpes == 2
